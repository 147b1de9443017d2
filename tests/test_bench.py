"""The benchmark runs end to end in --quick mode on a tiny model and writes every key."""
import json

import pytest

from roe_core import bench
from roe_core.systems import SYSTEMS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_bench_writes_every_key(tmp_path):
    r = bench.run(model="tiny", quick=True, fresh=True, out=tmp_path, n=24, timing_n=4, max_new_tokens=4)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(r))
    for key in ("speedup_bs1", "speedup_bs16", "ideal_speedup", "by_type"):
        assert key in saved
    for key in ("accuracy", "skip_ratio", "distinct_routes"):
        assert key in saved["roe"]
    assert "accuracy" in saved["dense"]
    assert saved["n_questions"] == 24
    assert 0.0 <= saved["roe"]["skip_ratio"] <= 1.0
    hist = saved["roe"]["layers_executed_histogram"]               # per example: the spread of layers run
    assert sum(hist.values()) == 24 and saved["roe"]["layers_executed_std"] >= 0
    assert sum(int(k) * v for k, v in hist.items()) / 24 == pytest.approx(saved["roe"]["layers_executed"])
    assert "layers run per example: histogram" in (tmp_path / "results.md").read_text()
    assert saved["speedup_bs1"] > 0 and saved["ideal_speedup"] >= 1.0
    assert sum(v["n"] for v in saved["by_type"].values()) == 24
    assert set(saved["by_type"]) <= set(bench.scenes.QTYPES)
    # the per-difficulty rows pool the per-type rows: n adds up, layers are the n-weighted mean
    levels = saved["by_difficulty"]
    assert sum(v["n"] for v in levels.values()) == 24
    for k, v in levels.items():
        rows = [saved["by_type"][t] for t in v["types"]]
        assert all(row["difficulty"] == int(k) for row in rows) and sum(row["n"] for row in rows) == v["n"]
        assert v["mean_layers_executed"] == pytest.approx(
            sum(row["n"] * row["mean_layers_executed"] for row in rows) / v["n"])
    assert (tmp_path / "results.md").read_text().startswith("# Benchmark: Dense, RoE, MoE-LLaVA")
    assert saved["threshold"] == 0.5
    # the shifted split beside the test split (quick: 16 questions)
    sh = saved["shifted"]
    assert sh["n_questions"] == 16 and sum(v["n"] for v in sh["by_type"].values()) == 16
    assert 0.0 <= sh["dense"]["accuracy"] <= 1.0 and 0.0 <= sh["roe"]["accuracy"] <= 1.0
    assert 0.0 <= sh["roe"]["skip_ratio"] <= 1.0
    assert "Shifted split (16 questions" in (tmp_path / "results.md").read_text()
    # every system, the same keys, side by side (tiny: every system, fresh parts)
    sy = saved["systems"]
    assert list(sy) == list(SYSTEMS) == saved["systems_run"]
    for name, v in sy.items():
        for key in ("accuracy", "by_type", "shifted_accuracy", "examples_per_s_bs1", "examples_per_s_bs16", "params"):
            assert key in v, (name, key)
        assert v["examples_per_s_bs1"] > 0 and v["examples_per_s_bs16"] > 0
        assert v["params"]["total"] >= v["params"]["active"] > 0
        assert sum(1 for _ in v["by_type"]) == len(saved["by_type"])
    assert sy["roe"]["accuracy"] == saved["roe"]["accuracy"] and sy["dense"]["accuracy"] == saved["dense"]["accuracy"]
    moe = sy["moe_llava"]
    assert moe["params"]["active"] > sy["dense"]["params"]["active"]          # top-2 of 4 experts in 3 of 6 layers
    assert moe["params"]["total"] > moe["params"]["active"]
    assert moe["moe_layers"] == [0, 2, 4] and len(moe["l_aux_per_layer"]) == 3
    assert moe["l_aux_sum"] >= 0.99 * len(moe["moe_layers"])                   # >= 1 per layer, 1 when balanced
    for kind in ("image", "text"):
        assert len(moe["expert_load"][kind]) == 3
        assert all(abs(sum(row) - 1) < 1e-6 for row in moe["expert_load"][kind])
    # fresh MoE parts are exact copies of the dense FFNs: the same answers as the dense model
    assert moe["accuracy"] == sy["dense"]["accuracy"]
    assert set(saved["speedup_roe_vs_moe_llava"]) == {"bs1", "bs16"}
    assert saved["accuracy_roe_minus_moe_llava"] == sy["roe"]["accuracy"] - moe["accuracy"]
    md = (tmp_path / "results.md").read_text()
    assert "| RoE vs MoE-LLaVA | here | the RoE paper |" in md and "1.61x" in md and "+3.3" in md
    assert "| EvoMoE vs MoE-LLaVA | here | the EvoMoE paper |" in md and "+1.0" in md
    assert saved["accuracy_evomoe_minus_moe_llava"] == sy["evomoe"]["accuracy"] - moe["accuracy"]
    assert saved["paper"]["roe"]["versus"]["moe_llava"]["speedup"] == 1.61
    assert "static" in sy and sy["static"]["layers_executed"] == saved["num_layers"]   # fresh: nothing skipped


def test_bench_runs_a_chosen_subset_of_systems(tmp_path):
    r = bench.run(model="tiny", quick=True, fresh=True, out=tmp_path, n=4, timing_n=2, max_new_tokens=2, shifted_n=0,
                  systems=["dense", "moe_llava"])
    assert list(r["systems"]) == ["dense", "moe_llava"] and "roe" not in r and "speedup_roe_vs_moe_llava" not in r
    with pytest.raises(ValueError, match="unknown systems"):
        bench.run(model="tiny", quick=True, fresh=True, out=tmp_path, n=2, systems=["gpt"])


def test_bench_threshold_moves_the_routes(tmp_path):
    # p_run is a probability: a threshold of 1 skips every layer, 0 runs every one
    hi = bench.run(model="tiny", quick=True, fresh=True, out=tmp_path / "hi", n=4, timing_n=1, max_new_tokens=2, threshold=1.0)
    lo = bench.run(model="tiny", quick=True, fresh=True, out=tmp_path / "lo", n=4, timing_n=1, max_new_tokens=2, threshold=0.0)
    assert hi["threshold"] == 1.0 and hi["roe"]["skip_ratio"] == 1.0
    assert lo["roe"]["skip_ratio"] == 0.0 and lo["roe"]["accuracy"] == lo["dense"]["accuracy"]


def test_threshold_choice_needs_the_skip_target():
    from roe_core.embedded.calibrate import choose_threshold
    from roe_core.systems.roe import RoEPipeline
    pipe = RoEPipeline.load("tiny", device="cpu", fresh=True)
    qs = bench.test_questions(4, image_size=32, split="val")
    # threshold 1 skips every layer, 0 runs every one
    rows, best = choose_threshold(pipe, qs, (1.0, 0.0), min_skip=0.5)
    assert [r["skip_ratio"] for r in rows] == [1.0, 0.0]
    n_layers = pipe.info["num_layers"]
    from roe_core.scenes import DIFFICULTY
    levels = {DIFFICULTY[q.qtype] for q in qs}
    assert set(rows[0]["layers_by_difficulty"]) == levels   # mean layers run per difficulty level
    assert set(rows[0]["layers_by_difficulty"].values()) == {0.0}
    assert set(rows[1]["layers_by_difficulty"].values()) == {float(n_layers)}
    assert best["threshold"] == 1.0                       # the only one that skips enough
    rows, best = choose_threshold(pipe, qs, (0.0, 1.0), min_skip=1.01)
    assert best["threshold"] == 0.0                       # none skips enough: the first
    # no skip floor: the most accurate, and on a tie the one that skips more
    _, best = choose_threshold(pipe, qs, (0.0, 1.0), min_skip=0.0)
    run_all, skip_all = rows
    assert best["accuracy"] == max(run_all["accuracy"], skip_all["accuracy"])
    if run_all["accuracy"] == skip_all["accuracy"]:
        assert best["threshold"] == 1.0


def test_calibrate_thresholds_flag_parses_and_rejects():
    import argparse
    from roe_core.embedded.calibrate import CALIBRATE_THRESHOLDS, _thresholds
    assert _thresholds("0.54, 0.5,0.48") == (0.54, 0.5, 0.48)
    assert 0.5 in CALIBRATE_THRESHOLDS
    for bad in ("0.5,x", "1.5", "", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match="thresholds"):
            _thresholds(bad)
    from roe_core.embedded.calibrate import _fraction
    assert _fraction("0.32") == 0.32
    for bad in ("x", "1", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match="--min-skip"):
            _fraction(bad)


def test_the_fixed_curve_compares_routing_with_fixed_paths_on_the_same_adapters(tiny_roe, images):
    from roe_core.bench.run import fixed_curve, fixed_curve_markdown
    from roe_core.scenes.questions import Question
    L = tiny_roe.num_layers
    qs = [Question(images[k % 4], "How many objects are there?", [], "Two." if k % 2 else "One.", "count")
          for k in range(6)]
    order = list(reversed(range(L)))
    c = fixed_curve(tiny_roe, qs, "static", order, None, 4, 2)
    assert c["order"] == order and c["n_questions"] == 6 and c["threshold"] == tiny_roe.threshold
    assert [p["fixed_k"] for p in c["fixed"][1:]] == sorted(p["fixed_k"] for p in c["fixed"][1:])
    assert all(p["mean_layers_executed"] == L - p["fixed_k"] for p in c["fixed"][1:])
    assert c["fixed"][0]["mean_layers_executed"] == L and c["roe"][0]["threshold"] is None
    d = c["roe_minus_fixed_at_equal_layers"]
    assert d is None or d == pytest.approx(c["roe_accuracy"] - c["fixed_accuracy_at_roe_layers"])
    md = fixed_curve_markdown(c, "Static", L)
    assert "fixed, k =" in md and "RoE, threshold" in md
