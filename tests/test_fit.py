"""roe_core.fit (issue 34): RoE's parts and the fixed path's fitted to a model's own dense answers."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.testing import assert_close

from roe_core.fit import STATIC_DIR, FitConfig, fit_parts, fitted_folders, folder_inputs
from roe_core.fit import record, standins
from roe_core.fit.core import split
from roe_core.runtime.conversation import InputError
from roe_core.runtime.tiny import tiny_llava
from roe_core.systems import load_base
from roe_core.systems.roe import RoEConfig, RoEModel, RoEPipeline, generate
from roe_core.systems.static import StaticPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

QS = ["What colour is the circle?", "How many?", "Is there a large red square left of the small blue circle?",
      "Describe the picture.", "Where is the triangle?", "Which shape is biggest?"]
SMALL = dict(n_val=8, n_evidence=16, batch_size=8, max_new_tokens=5, calib_steps=3)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()) for _ in range(6)]
    return [(imgs[i % 6], QS[(i * 5) % 6]) for i in range(32)]


@pytest.fixture(scope="module")
def loaded():
    return load_base("tiny", "cpu")


@pytest.fixture(scope="module")
def fitted(loaded, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    return out, fit_parts(loaded, inputs, out, FitConfig(**SMALL))


def test_a_stand_in_is_the_least_squares_solution(loaded, inputs):
    """The moments the dense pass accumulates give, at full rank and no ridge, torch.linalg.lstsq's map
    from rmsnorm(h_in) to h_out - h_in over the same tokens; at rank r the best rank-r fitted values."""
    base = loaded.base
    d = base.config.text_config.hidden_size
    model = RoEModel(base, RoEConfig(num_layers=6, hidden_size=d, adapter_rank=2 * d))
    enc = RoEPipeline.make_encoder(loaded)
    seen = {}
    i = 3

    def grab(mod, args, out):
        if args[0].shape[1] > 1:
            seen.setdefault("h", []).append((args[0].detach().clone(), out.detach().clone()))
    hook = model.layers[i].register_forward_hook(grab)
    _, m = record.dense_pass(model, enc, inputs[:8], 8, 3, True, None, "k")
    hook.remove()
    h_in, h_out = seen["h"][0]                                        # the prefill of the one batch
    convs = [enc.encode([(q, None)]) for _, q in inputs[:8]]
    b = enc.collate(convs, [im for im, _ in inputs[:8]], last_turn_only=True)
    rows = torch.cat([torch.ones(8, 2, dtype=torch.bool), b.token_ok], 1)
    eps = model.layers[0].input_layernorm.variance_epsilon
    N = standins.rms_normalise(h_in[rows], eps).double()
    D = (h_out[rows] - h_in[rows]).double()
    want = N @ torch.linalg.lstsq(N, D).solution

    down, up = standins.solve(m.ntn[i], m.ntd[i], rank=d, ridge=0.0)
    standins.write_adapter(model.adapters[i], down, up)
    with torch.no_grad():
        got = model.adapters[i](h_in[rows]) - h_in[rows]
    assert_close(got.double(), want, rtol=1e-3, atol=1e-4)
    assert standins.explained(m, i, down, up) == pytest.approx(1 - float((D - want).pow(2).sum() / D.pow(2).sum()),
                                                                abs=1e-4)
    r = 5                                                             # reduced rank: the best rank-r fitted values
    down, up = standins.solve(m.ntn[i], m.ntd[i], rank=r, ridge=0.0)
    U, S, Vh = torch.linalg.svd(want, full_matrices=False)
    assert_close((N.float() @ down.T @ up.T).double(), U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], rtol=1e-3, atol=1e-3)


def test_fitted_parts_save_load_and_equal_dense_with_every_layer(loaded, fitted, inputs, hf_greedy):
    out, summary = fitted
    folders = fitted_folders(out)
    assert set(folders) == {"roe", STATIC_DIR}
    pipe = RoEPipeline.from_base(loaded, parts=folders["roe"])
    saved = load_file(f"{folders['roe']}/roe.safetensors")
    for k, v in pipe.model.roe_state_dict().items():
        assert torch.equal(v, saved[k].to(v.dtype)), k
    assert pipe.model.config.router_bias and pipe.threshold == pytest.approx(summary["threshold"])
    assert pipe.model.config.adapter_rank == 2 * summary["stand_in_rank"]
    # every layer run: the unmodified transformers model's greedy tokens
    convs = [pipe.encoder.encode([(q, None)]) for _, q in inputs[:4]]
    b = pipe.encoder.collate(convs, [im for im, _ in inputs[:4]], last_turn_only=True)
    gen = generate(pipe.model, b, "dense", 6, stop_ids=set())
    assert gen.tokens == hf_greedy(loaded.base, b, 6)
    static = StaticPipeline.from_base(loaded, parts=folders[STATIC_DIR])
    assert static.model.config.skipped == summary["static_skipped"]
    for i in summary["static_skipped"]:
        for k, v in static.model.adapters[str(i)].state_dict().items():
            assert_close(v.float(), pipe.model.adapters[i].state_dict()[k].float(), rtol=1e-2, atol=1e-2)
    s = json.loads((out / "fit.json").read_text())
    assert s["n_inputs"] == 32 and s["n_val"] == 8 and s["n_fit"] == 24
    assert 0 < s["val_mean_layers"] <= 6 and s["val_agreement"] >= 0.0


def test_the_fit_is_deterministic_for_a_seed(loaded, inputs, tmp_path):
    a = fit_parts(loaded, inputs, tmp_path / "a", FitConfig(**SMALL, cache=False))
    b = fit_parts(loaded, inputs, tmp_path / "b", FitConfig(**SMALL, cache=False))
    assert a["threshold"] == b["threshold"] and a["static_skipped"] == b["static_skipped"]
    ta, tb = load_file(str(tmp_path / "a/roe/roe.safetensors")), load_file(str(tmp_path / "b/roe/roe.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    c = fit_parts(loaded, inputs, tmp_path / "c", FitConfig(**{**SMALL, "seed": 1}, cache=False))
    tc = load_file(str(tmp_path / "c/roe/roe.safetensors"))
    assert not torch.equal(ta["routing_tokens"], tc["routing_tokens"])
    assert split(32, 8, 0) != split(32, 8, 1)


def test_a_cancelled_fit_resumes_from_its_cache(loaded, inputs, tmp_path):
    """checkpoint() may raise to cancel; a rerun continues from out/cache and ends where an uninterrupted
    fit ends."""
    calls = [0]

    def cancel_late():
        calls[0] += 1
        if calls[0] == 2:                                             # in the dense pass's second batch
            raise KeyboardInterrupt("cancelled")
    with pytest.raises(KeyboardInterrupt):
        fit_parts(loaded, inputs, tmp_path / "r", FitConfig(**SMALL), checkpoint=cancel_late)
    assert (tmp_path / "r/cache").is_dir() and not (tmp_path / "r/fit.json").exists()
    stages = []
    got = fit_parts(loaded, inputs, tmp_path / "r", FitConfig(**SMALL), progress=lambda s, d, t: stages.append((s, d)))
    want = fit_parts(loaded, inputs, tmp_path / "w", FitConfig(**SMALL, cache=False))
    assert ("dense answers (fit)", 0) not in stages and ("dense answers (fit)", 8) in stages   # batch 1 was cached
    assert got["threshold"] == want["threshold"]
    ta, tb = load_file(str(tmp_path / "r/roe/roe.safetensors")), load_file(str(tmp_path / "w/roe/roe.safetensors"))
    assert all(torch.allclose(ta[k], tb[k], atol=1e-5) for k in ta)


def test_a_llava_folder_written_by_save_pretrained_is_fitted_and_its_parts_reload(tmp_path, inputs):
    base, tok, proc = tiny_llava(seed=3)
    folder = tmp_path / "my-llava"
    for part in (base, tok, proc):
        part.save_pretrained(folder)
    images = tmp_path / "images"
    images.mkdir()
    for k, (im, _) in enumerate(inputs[:6]):
        im.save(images / f"{k}.png")
    ins = folder_inputs(images, QS[:4])
    assert len(ins) == 24
    loaded = load_base(str(folder), "cpu")
    s = fit_parts(loaded, ins, tmp_path / "fit", FitConfig(**{**SMALL, "n_evidence": 8}, export_answers=True))
    assert s["n_inputs"] == 24
    own = json.loads((tmp_path / "fit/own_answers/data.json").read_text())
    assert len(own) == s["n_fit"] and (tmp_path / "fit/own_answers/images" / own[0]["image"]).is_file()
    again = load_base(str(folder), "cpu")
    pipe = RoEPipeline.from_base(again, parts=str(tmp_path / "fit/roe"))
    assert pipe.model.config.base_model == str(folder)
    ans = pipe.answer(ins[0][0], ins[0][1], max_new_tokens=4)
    assert len(ans.trace.route) == 6


def test_bad_inputs_say_what_is_wrong(loaded, inputs, tmp_path):
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_parts(loaded, inputs[:8], tmp_path / "x", FitConfig(**SMALL))
    with pytest.raises(ValueError, match="empty question"):
        fit_parts(loaded, [(inputs[0][0], "  ")] * 20, tmp_path / "y", FitConfig(**SMALL))
    with pytest.raises(ValueError, match="evidence"):
        FitConfig(evidence="vibes")
    with pytest.raises(InputError, match="no images"):
        folder_inputs(tmp_path, ["Q?"])


def test_bench_quick_includes_the_fitted_systems(tmp_path):
    from roe_core import bench
    r = bench.run(model="tiny", quick=True, fresh=True, out=tmp_path, n=8, timing_n=2, max_new_tokens=3, shifted_n=4,
                  wide_n=4, curve_n=0, uniformity_n=2, fitted="auto")    # the CLI's default with --quick
    fit_names = {"roe_fit", STATIC_DIR + "_fit"}
    assert fit_names <= set(r["systems"])
    assert r["systems"]["roe_fit"]["label"] == "RoE (fitted)"
    table = r["fitted"]
    assert fit_names <= set(table["systems"]) and {"roe", STATIC_DIR} <= set(table["systems"])
    for v in table["systems"].values():
        assert 0 <= v["test_accuracy"] <= 1 and v["reworded_val_accuracy"] is not None and v["std_layers"] >= 0
    assert table["fit"]["n_inputs"] == 32 and (tmp_path / "fitted/roe/roe_config.json").is_file()
    md = (tmp_path / "results.md").read_text()
    assert "Fitted parts against trained ones" in md and "RoE (fitted)" in md


def test_bench_cli_quick_fits_on_the_fly_unless_told(monkeypatch):
    import importlib
    bench_run = importlib.import_module("roe_core.bench.run")
    seen = {}
    monkeypatch.setattr(bench_run, "run", lambda *a, **kw: seen.update(kw) or {})
    monkeypatch.setattr(bench_run, "markdown", lambda r: "")
    bench_run.main(["--quick", "--model", "tiny"])
    assert seen["fitted"] == "auto"
    bench_run.main(["--model", "tiny", "--fitted", "runs/fit"])
    assert seen["fitted"] == "runs/fit"
    bench_run.main(["--model", "tiny"])
    assert seen["fitted"] == "none"


def test_llava_inputs_read_a_json_with_its_image_folder(tmp_path):
    """A LLaVA JSON's human turns, images from the folder given (one image object per record); a missing image
    or folder says which."""
    from roe_core.fit import llava_inputs
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(images / "a.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
             {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "One."}]
    js = tmp_path / "data.json"
    js.write_text(json.dumps([{"image": "a.png", "conversations": turns}]))
    got = llava_inputs(js, images)
    assert [q for _, q in got] == ["What colour?", "How many?"] and got[0][0] is got[1][0]
    assert got[0][0].getpixel((0, 0)) == (255, 0, 0)
    assert [q for _, q in llava_inputs(js, images, limit=1)] == ["What colour?"]
    with pytest.raises(InputError, match="not found in"):
        llava_inputs(js, tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        llava_inputs(js, tmp_path / "nowhere")
