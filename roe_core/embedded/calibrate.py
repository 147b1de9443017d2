"""Validation-split checks of the shipped RoE parts and the router threshold's calibration.

    evaluate_routes(folder, n)      exact match and skip ratio on val, routed and dense
    choose_threshold(pipe, qs, ts)  the sweep and the choice rule
    calibrate(n, ts, min_skip)      writes the chosen threshold into assets/embedded/roe/roe_config.json

Questions are answered with analysis.evaluate (the benchmark's way); the benchmark then measures the
chosen threshold on the test split.
"""
from __future__ import annotations

import argparse
import json

from ..analysis.evaluate import evaluate
from ..systems import registry
from .base import ASSETS, write_state
from .fitting import log_row

CALIBRATE_THRESHOLDS = (0.5, 0.49, 0.48, 0.47, 0.46, 0.45, 0.4)


def evaluate_routes(roe_dir: str, n: int = 200) -> dict:
    """Exact match and skip ratio on n single val questions, routed and dense, and the routed path's
    mean layers executed per question type."""
    from ..scenes import Question, make_split, render
    from ..systems.roe import RoEPipeline
    pipe = RoEPipeline.load("embedded", roe=roe_dir, device="cpu", dtype="float32")
    qs = [Question(render(s.scene, 256), s.turns[0].question, [], s.turns[0].answer, s.turns[0].qtype)
          for s in make_split("val", n, n_turns=1)]
    res = {}
    for route in ("auto", "dense"):
        _, ok, traces = evaluate(pipe, qs, 25, 40, route=route)
        res[f"{route}_exact_match"] = sum(ok) / len(ok)
        res[f"{route}_skip_ratio"] = sum(t.skip_ratio for t in traces) / len(traces)
        if route == "auto":
            layers: dict[str, list[int]] = {}
            for q, t in zip(qs, traces):
                layers.setdefault(q.qtype, []).append(t.layers_executed)
            res["auto_layers_by_type"] = {k: sum(v) / len(v) for k, v in sorted(layers.items())}
    return res


def choose_threshold(pipe, questions, thresholds, min_skip: float = 0.3) -> tuple[list[dict], dict]:
    """Routed accuracy and skip ratio at each router threshold; the choice is the most accurate
    threshold whose mean skip ratio is >= min_skip (ties: the one that skips more), or the first
    threshold if none skips enough. Returns (rows, chosen row)."""
    from ..scenes import DIFFICULTY
    rows = []
    for t in thresholds:
        _, ok, traces = evaluate(pipe, questions, 16, 24, route="auto", threshold=t)
        layers: dict[int, list[int]] = {}
        for q, tr in zip(questions, traces):
            layers.setdefault(DIFFICULTY.get(q.qtype, 0), []).append(tr.layers_executed)
        rows.append({"threshold": t, "accuracy": sum(ok) / len(ok),
                     "skip_ratio": sum(tr.skip_ratio for tr in traces) / len(traces),
                     "distinct_routes": len({tuple(tr.route) for tr in traces}),
                     "layers_by_difficulty": {d: sum(v) / len(v) for d, v in sorted(layers.items())}})
        print(json.dumps(rows[-1]))
    ok_rows = [r for r in rows if r["skip_ratio"] >= min_skip]
    return rows, (max(ok_rows, key=lambda r: (r["accuracy"], r["skip_ratio"])) if ok_rows else rows[0])


def _thresholds(text: str) -> tuple[float, ...]:
    """'0.52,0.5,0.48' -> (0.52, 0.5, 0.48); each in [0, 1]."""
    try:
        ts = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be comma-separated numbers, got {text!r}") from None
    if not ts or any(not 0.0 <= t <= 1.0 for t in ts):
        raise argparse.ArgumentTypeError(f"thresholds must be numbers in [0, 1], got {text!r}")
    return ts


def _fraction(text: str) -> float:
    """'0.32' -> 0.32, a number in [0, 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--min-skip must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"--min-skip must be a number in [0, 1), got {text!r}")
    return v


def calibrate(n: int = 240, thresholds=CALIBRATE_THRESHOLDS, min_skip: float = 0.3) -> dict:
    """Chooses the router threshold (run a layer iff p_run > t) on the *validation* split with
    choose_threshold and writes it into assets/embedded/roe/roe_config.json; the benchmark then
    measures it on test."""
    from ..scenes import test_questions
    from ..systems.roe import RoEConfig, RoEPipeline
    folder = ASSETS / registry.get("roe").parts_folder
    pipe = RoEPipeline.load("embedded", device="cpu", dtype="float32")
    qs = test_questions(n, split="val")
    _, dense_ok, _ = evaluate(pipe, qs, 16, 24, route="dense")
    rows, best = choose_threshold(pipe, qs, thresholds, min_skip)
    cfg = RoEConfig.load(folder)
    cfg.threshold = best["threshold"]
    cfg.extra["threshold_calibration"] = {"split": "val", "n": len(qs), "min_skip": min_skip, "chosen": best["threshold"]}
    cfg.save(folder)
    out = {"n": len(qs), "dense_accuracy": sum(dense_ok) / len(dense_ok), "sweep": rows, "chosen": best}
    write_state("calibrate", **out)
    log_row("calibrate", out)
    return out
