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
from ..runtime.weights import packed_path
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


def choose_threshold(pipe, questions, thresholds, min_skip: float = 0.3,
                     n_plain: int | None = None) -> tuple[list[dict], dict]:
    """Routed accuracy and skip ratio at each router threshold; the choice is the most accurate
    threshold whose mean skip ratio is >= min_skip (ties: the one that skips more), or the first
    threshold if none skips enough. n_plain (< len(questions)): the rows also give the accuracy of the
    first n_plain questions and of the rest (the reworded ones). Returns (rows, chosen row)."""
    from ..scenes import DIFFICULTY
    rows = []
    for t in thresholds:
        _, ok, traces = evaluate(pipe, questions, 16, 24, route="auto", threshold=t)
        layers: dict[int, list[int]] = {}
        for q, tr in zip(questions, traces):
            layers.setdefault(DIFFICULTY.get(q.qtype, 0), []).append(tr.layers_executed)
        rows.append({"threshold": t, "accuracy": sum(ok) / len(ok),
                     **_split_accuracy(ok, n_plain),
                     "skip_ratio": sum(tr.skip_ratio for tr in traces) / len(traces),
                     "layers_std": _std([tr.layers_executed for tr in traces]),
                     "distinct_routes": len({tuple(tr.route) for tr in traces}),
                     "layers_by_difficulty": {d: sum(v) / len(v) for d, v in sorted(layers.items())}})
        print(json.dumps(rows[-1]))
    ok_rows = [r for r in rows if r["skip_ratio"] >= min_skip]
    return rows, (max(ok_rows, key=lambda r: (r["accuracy"], r["skip_ratio"])) if ok_rows else rows[0])


def _split_accuracy(ok: list[bool], n_plain: int | None) -> dict:
    if not n_plain or n_plain >= len(ok):
        return {}
    return {"accuracy_plain": sum(ok[:n_plain]) / n_plain, "accuracy_wide": sum(ok[n_plain:]) / (len(ok) - n_plain)}


def _std(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


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


def calibrate(n: int = 240, thresholds=CALIBRATE_THRESHOLDS, min_skip: float = 0.3, wide_n: int = 0) -> dict:
    """Chooses the router threshold (run a layer iff p_run > t) on the *validation* split with
    choose_threshold and writes it into assets/embedded/roe/roe_config.json; the benchmark then
    measures it on test. wide_n > 0 adds that many val questions reworded and restyled
    (scenes.wide_questions) to the n plain ones, so the choice also weighs other wordings and styles."""
    from ..scenes import test_questions, wide_questions
    from ..systems.roe import RoEConfig, RoEPipeline
    folder = ASSETS / registry.get("roe").parts_folder
    pipe = RoEPipeline.load("embedded", device="cpu", dtype="float32")
    qs = test_questions(n, split="val") + (wide_questions(wide_n, split="val") if wide_n else [])
    _, dense_ok, _ = evaluate(pipe, qs, 16, 24, route="dense")
    rows, best = choose_threshold(pipe, qs, thresholds, min_skip, n_plain=n)
    cfg = RoEConfig.load(folder)
    cfg.threshold = best["threshold"]
    cfg.extra["threshold_calibration"] = {"split": "val", "n": len(qs), "wide_n": wide_n, "min_skip": min_skip,
                                          "chosen": best["threshold"]}
    cfg.save(folder)
    out = {"n": len(qs), "wide_n": wide_n, "dense_accuracy": sum(dense_ok) / len(dense_ok),
           **{f"dense_{k}": v for k, v in _split_accuracy(dense_ok, n).items()}, "sweep": rows, "chosen": best}
    write_state("calibrate", **out)
    log_row("calibrate", out)
    return out


def calibrate_guard(n: int = 240, wide_n: int = 240, quantiles=(0.9, 0.97, 0.99), fit_n: int = 256,
                    min_skip: float = 0.3) -> dict:
    """The route guard (systems.route_guard), fitted on fit_n training questions (half plain, half
    reworded and restyled: the inputs the routers were trained on) and its tau chosen on val like the
    threshold: each quantile of the training distances answers the val set (n plain + wide_n reworded)
    at the calibrated threshold; the most accurate row that skips >= min_skip wins, and "no guard" is a
    row too. Writes the guard (tau None when no guard wins) into the shipped RoE parts."""
    from ..analysis.evaluate import batches
    from ..scenes import test_questions, wide_questions
    from ..systems.roe import RoEPipeline, layout_batch
    from ..systems.route_guard import RouteGuard
    folder = ASSETS / registry.get("roe").parts_folder
    pipe = RoEPipeline.load("embedded", device="cpu", dtype="float32")
    model = pipe.model
    model.guard = None
    fit = test_questions(fit_n // 2, split="train") + wide_questions(fit_n - fit_n // 2, split="train")
    items = [(q.image, q.question, q.history) for q in fit]
    guard = RouteGuard.fit(model, (layout_batch(model, pipe.batch(chunk)) for chunk in batches(items, 16)))
    qs = test_questions(n, split="val") + (wide_questions(wide_n, split="val") if wide_n else [])
    rows = []
    for q in (None, *quantiles):
        guard.tau = None if q is None else guard.quantile_tau(q)
        model.guard = guard
        _, ok, traces = evaluate(pipe, qs, 16, 24, route="auto")
        rows.append({"quantile": q, "tau": guard.tau, "accuracy": sum(ok) / len(ok), **_split_accuracy(ok, n),
                     "skip_ratio": sum(t.skip_ratio for t in traces) / len(traces),
                     "layers_std": _std([t.layers_executed for t in traces]),
                     "distinct_routes": len({tuple(t.route) for t in traces})})
        print(json.dumps(rows[-1]))
    ok_rows = [r for r in rows if r["skip_ratio"] >= min_skip]
    best = max(ok_rows, key=lambda r: (r["accuracy"], r["skip_ratio"])) if ok_rows else rows[0]
    guard.tau = best["tau"]
    if guard.tau is not None:
        guard.save(folder)
    else:                                   # no guard helps on val: ship none
        for f in (folder / "guard.safetensors", packed_path(folder / "guard.safetensors")):
            f.unlink(missing_ok=True)
    out = {"n": len(qs), "wide_n": wide_n, "fit_n": fit_n, "threshold": model.config.threshold, "rows": rows,
           "chosen": best}
    write_state("guard", **out)
    log_row("guard", out)
    return out
