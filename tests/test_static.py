"""The fixed-path baseline (systems/static.py): k layers skipped for every input, chosen by how little they
change their input; equal to the dense model at k = 0; its choice by hand; checkpoints; training."""
import json

import pytest
import torch
from torch.testing import assert_close

from conftest import QUESTIONS
from roe_core import scenes
from roe_core.systems import load_base, load_systems
from roe_core.systems.static import StaticConfig, StaticModel, StaticPipeline, layer_scores, lowest, lowest_order
from roe_core.train.loop import LlavaJsonDataset
from roe_core.train.static import StaticTrainConfig, choose_layers, init_from_roe, main, train_static

pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 6


@pytest.fixture(scope="module")
def loaded():
    return load_base("tiny", device="cpu")


def with_model(loaded, model: StaticModel) -> StaticPipeline:
    return StaticPipeline(model, StaticPipeline.make_encoder(loaded), {"parts": "test"})


def randomised(loaded, skipped, seed=0) -> StaticModel:
    torch.manual_seed(seed)
    model = StaticModel(loaded.base, skipped=skipped)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def items(images):
    return [(images[k], q, ()) for k, q in enumerate(QUESTIONS)]


def test_k0_is_the_dense_model(loaded, images):
    pipes = load_systems(["dense", "static"], loaded=loaded, fresh=True)
    assert pipes["static"].model.config.skipped == [] and "untrained" in pipes["static"].info["parts"]
    b = pipes["dense"].batch(items(images))
    with torch.no_grad():
        ref, _ = pipes["dense"].model.prefill(b)
        got, _ = pipes["static"].model.prefill(pipes["static"].model.layout(b.input_ids, b.token_ok, b.pixel_values))
    assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert [a.text for a in pipes["static"].answer_batch(items(images), max_new_tokens=N_NEW)] == \
        [a.text for a in pipes["dense"].answer_batch(items(images), max_new_tokens=N_NEW)]


def test_it_skips_exactly_its_layers_for_every_input(loaded, images):
    model = randomised(loaded, [1, 4])
    pipe = with_model(loaded, model)
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(model.layers)]
    try:
        answers = pipe.answer_batch(items(images), max_new_tokens=N_NEW)
    finally:
        for h in hooks:
            h.remove()
    assert set(ran) == {0, 2, 3, 5}                                            # layers 1 and 4 never ran
    for a in answers:
        assert a.trace.route == [True, False, True, True, False, True]
        assert a.trace.layers_executed == 4 and a.trace.adapters_used == [1, 4]
        assert a.trace.summary().startswith("4 of 6 layers ran")
    counts = pipe.parameter_counts()
    layer = sum(p.numel() for p in model.layers[0].parameters())
    adapters = sum(p.numel() for p in model.adapter_parameters())
    assert counts.total - counts.active == 2 * layer                          # two layers never touched
    assert counts.total == sum(p.numel() for p in loaded.base.parameters()) + adapters
    # a batch equals its examples alone, and the adapters matter
    alone = [pipe.answer(*it, max_new_tokens=N_NEW).text for it in items(images)]
    assert [a.text for a in answers] == alone
    dense = load_systems(["dense"], loaded=loaded)["dense"]
    assert alone != [a.text for a in dense.answer_batch(items(images), max_new_tokens=N_NEW)]


def test_the_layer_choice_matches_a_hand_computation(loaded, images):
    """Scores by hand: the unmodified model's hidden states (output_hidden_states), one example at a time
    (no padding), mean over tokens of mean_j |h_{i+1} - h_i|_j, averaged over examples."""
    enc = StaticPipeline.make_encoder(loaded)
    singles = [enc.collate([enc.encode([(q, None)])], [images[k]]) for k, q in enumerate(QUESTIONS)]
    got = layer_scores(loaded.base, singles, "l1")
    got_cos = layer_scores(loaded.base, singles, "cosine")
    L = loaded.base.config.text_config.num_hidden_layers
    by_hand, by_hand_cos = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    with torch.no_grad():
        for b in singles:
            hs = loaded.base(input_ids=b.input_ids, pixel_values=b.pixel_values, output_hidden_states=True).hidden_states
            for i in range(L - 1):     # the last entry may carry the final norm: compare the layers before it
                by_hand[i] += (hs[i + 1] - hs[i]).abs().mean(-1).mean().double()
                by_hand_cos[i] += (1 - torch.nn.functional.cosine_similarity(hs[i + 1], hs[i], dim=-1)).mean().double()
    assert_close(torch.tensor(got[:L - 1], dtype=torch.float64), by_hand[:L - 1] / len(singles), rtol=1e-4, atol=1e-6)
    assert_close(torch.tensor(got_cos[:L - 1], dtype=torch.float64), by_hand_cos[:L - 1] / len(singles),
                 rtol=1e-4, atol=1e-6)
    assert lowest([0.3, 0.1, 0.2, 0.1], 2) == [1, 3] and lowest([0.3, 0.1, 0.2, 0.1], 0) == []
    assert lowest_order([0.3, 0.1, 0.2, 0.1]) == [1, 3, 2, 0]          # the fixed sweep's order: lowest(., k) leads
    with pytest.raises(ValueError, match="k must be"):
        lowest([0.1, 0.2], 3)


def test_bad_configs_are_clear_errors(loaded):
    with pytest.raises(ValueError, match="outside"):
        StaticModel(loaded.base, skipped=[9])
    with pytest.raises(ValueError, match="metric"):
        StaticConfig(metric="entropy")


def test_save_and_load_answer_alike(loaded, images, tmp_path):
    model = randomised(loaded, [2, 3], seed=1)
    model.config.metric, model.config.layer_scores = "cosine", [0.5] * 6
    model.save_static(tmp_path)
    saved = json.loads((tmp_path / "static_config.json").read_text())
    assert saved["skipped"] == [2, 3] and saved["metric"] == "cosine"
    back = load_systems(["static"], loaded=loaded, parts={"static": str(tmp_path)})["static"]
    assert back.model.config.skipped == [2, 3] and back.info["parts"] == str(tmp_path)
    assert back.skip_order() == [0, 1, 2, 3, 4, 5]                            # equal scores: earlier first
    for k in back.model.adapters:
        for a, b in zip(back.model.adapters[k].parameters(), model.adapters[k].parameters()):
            assert_close(a, b.to(torch.bfloat16).float())                     # stored in bf16
    want = with_model(loaded, model)
    with torch.no_grad():
        for k in model.adapters:                                               # compare at the stored precision
            for p in model.adapters[k].parameters():
                p.copy_(p.to(torch.bfloat16).float())
    assert [a.text for a in back.answer_batch(items(images), max_new_tokens=N_NEW)] == \
        [a.text for a in want.answer_batch(items(images), max_new_tokens=N_NEW)]


def test_training_chooses_layers_trains_adapters_and_resumes(loaded, tmp_path):
    data = scenes.export_llava_json("train", 8, tmp_path / "data", image_size=32)
    enc = StaticPipeline.make_encoder(loaded)
    ds = LlavaJsonDataset(data, tmp_path / "data" / "images")
    skipped, scores = choose_layers(loaded.base, enc, ds, 2, "l1", n=8, batch_size=4)
    assert skipped == lowest(scores, 2) and len(scores) == 6
    base_before = {k: v.clone() for k, v in loaded.base.state_dict().items()}
    model = StaticModel(loaded.base, skipped=skipped)
    before = [p.detach().clone() for p in model.adapter_parameters()]
    cfg = StaticTrainConfig(steps=4, batch_size=4, save_every=2, log_every=1, distill=0.5)
    log = train_static(model, enc, ds, cfg, tmp_path / "out", progress=False)
    assert len(log) == 4 and all("kl" in row and row["loss"] >= row["ce"] for row in log)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.adapter_parameters()))   # adapters trained
    assert all(torch.equal(v, base_before[k]) for k, v in loaded.base.state_dict().items())  # the base did not
    # the CLI resumes from the checkpoint: steps continue, the learning curve grows
    main(["--model", "tiny", "--data", str(data), "--images", str(tmp_path / "data" / "images"), "--out", str(tmp_path / "out"), "--resume", "--steps", "6",
          "--batch-size", "4", "--save-every", "2", "--log-every", "1"])
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["step"] == 6
    assert len((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()) == 6
    cfg_saved = json.loads((tmp_path / "out" / "static_config.json").read_text())
    assert cfg_saved["skipped"] == skipped


def test_adapters_can_start_from_roes(loaded, tmp_path):
    from roe_core.systems.roe import RoEModel
    torch.manual_seed(3)
    roe = RoEModel(loaded.base)
    roe.save_roe(tmp_path)
    model = StaticModel(loaded.base, skipped=[0, 5], adapter_rank=roe.config.adapter_rank)
    assert init_from_roe(model, tmp_path) == [0, 5]
    for i in (0, 5):
        for a, b in zip(model.adapters[str(i)].parameters(), roe.adapters[i].parameters()):
            assert_close(a, b)
    with pytest.raises(ValueError, match="rank"):
        init_from_roe(StaticModel(loaded.base, skipped=[1], adapter_rank=3), tmp_path)
