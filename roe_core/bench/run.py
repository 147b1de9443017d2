"""Every routing system side by side in one run, on the scene test split.

    python -m roe_core.bench                                 # embedded model, every shipped system
    python -m roe_core.bench --systems dense,roe,static      # the same, named
    python -m roe_core.bench --quick                         # a smoke run, < 2 min on 2 cores
    python -m roe_core.bench --model tiny --quick --out /tmp/bench

Writes <out>/results.json and <out>/results.md. Accuracy is exact match (scenes.answers_match) with
greedy decoding, the same for every system. Speed: examples per second of prefill + the whole
answer, batch 1 and batches of 16; every system is timed in the same interleaved rounds (dense, RoE,
RoE's own every-layer path, MoE-LLaVA, dense, ...) after an untimed warm-up round, and the median
round is reported.

Per system, under `systems.<name>`: accuracy, by-type accuracy, shifted-split accuracy, examples/s,
parameters in total and active per token; MoE systems add the expert load per MoE layer (image vs
text tokens, top-1) and the load-balancing figure l_aux. Top level: RoE's own figures (against its
every-layer path: speedup_bs1/_bs16, ideal_speedup, by type and difficulty, routes) and
`speedup_<a>_vs_<b>` / `accuracy_<a>_minus_<b>` for each pair a system's paper compares (registry
`paper`), beside the papers' figures.

ideal_speedup counts multiply-adds (parameters touched per token): decoder layers executed, adapters
of skipped layers, plus what every path runs (vision tower, projector, LM head on generated tokens).
It is what the route would give if time were proportional to arithmetic. ideal_speedup_layers counts
the decoder layers and adapters only.
"""
from __future__ import annotations

import argparse
import json
import sys
import platform
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from .. import scenes
from ..analysis.evaluate import batches as _batches
from ..analysis.evaluate import evaluate as _evaluate
from ..analysis.experts import expert_similarity, expert_stats, uniformity
from ..scenes.questions import Question, shifted_questions, test_questions, wide_questions
from ..systems import load_base, load_systems, registry, shipped_systems
from ..systems.pipeline import Pipeline
from .fitted import fitted_markdown, fitted_pipelines, fitted_table
from .fitted import label as fitted_label

def accuracy_by_type(qs: list[Question], d_ok, r_ok, r_tr) -> dict:
    rows = defaultdict(lambda: defaultdict(list))
    for q, dk, rk, tr in zip(qs, d_ok, r_ok, r_tr):
        t = rows[q.qtype]
        t["dense"].append(dk), t["roe"].append(rk), t["layers"].append(tr.layers_executed)
    return {k: {"n": len(v["dense"]), "difficulty": scenes.DIFFICULTY.get(k),
                "dense_accuracy": statistics.mean(v["dense"]), "roe_accuracy": statistics.mean(v["roe"]),
                "mean_layers_executed": statistics.mean(v["layers"])}
            for k, v in sorted(rows.items(), key=lambda kv: (scenes.DIFFICULTY.get(kv[0], 9), kv[0]))}


def route_options(pipe: Pipeline, route: str | None = None, threshold: float | None = None) -> dict:
    """The answer keywords of a routed system (registry: `routed`): its route and threshold; {} otherwise."""
    return {"route": route or "auto", "threshold": threshold} if pipe.spec.routed else {}


def evaluate(pipe: Pipeline, qs: list[Question], route: str | None, batch_size: int, max_new_tokens: int,
             threshold: float | None = None):
    """(predictions, correct, traces) of a system on questions, in batches. route/threshold: a routed
    system's (ignored by the others)."""
    opts = route_options(pipe, route, threshold)
    label = pipe.system + (f", {opts['route']} route" if opts else "")
    return _evaluate(pipe, qs, batch_size, max_new_tokens, progress=f"accuracy, {label}", **opts)


def time_rounds(paths: dict, batches, repeats: int, max_new_tokens: int) -> dict[str, list[float]]:
    """Seconds per round over all batches for each path {name: generate(batch, max_new_tokens)},
    the paths interleaved within every round; one untimed warm-up round."""
    from tqdm.auto import tqdm
    times = {k: [] for k in paths}
    for r in tqdm(range(repeats + 1), desc=f"timing, batches of {batches[0].input_ids.shape[0]}", unit="round"):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            for b in batches:
                fn(b, max_new_tokens)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    return times


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def ideal_speedups(pipe: Pipeline, traces, qs_tokens: list[tuple[int, int]]) -> tuple[float, float]:
    """(whole model, layers only) multiply-add ratios dense / RoE over the evaluated examples."""
    m = pipe.model
    p_layer = statistics.mean(param_count(layer) for layer in m.layers)
    p_adapter = statistics.mean(param_count(a) for a in m.adapters)
    p_head = m.base.lm_head.weight.numel()
    llava = m.base.model
    n_img = pipe.encoder.num_image_tokens
    p_vision = (param_count(llava.vision_tower) + param_count(llava.multi_modal_projector)) * n_img
    dense = roe = dense_l = roe_l = 0.0
    L = m.num_layers
    for tr, (n_prompt, n_new) in zip(traces, qs_tokens):
        n_tok = n_prompt + n_new
        e = tr.layers_executed
        fixed = p_vision + (n_new + 1) * p_head
        dense_l += n_tok * L * p_layer
        roe_l += n_tok * (e * p_layer + (L - e) * p_adapter)
        dense += n_tok * L * p_layer + fixed
        roe += n_tok * (e * p_layer + (L - e) * p_adapter) + fixed
    return dense / roe, dense_l / roe_l


def timing_paths(pipes: dict[str, Pipeline], threshold: float | None) -> dict:
    """What each timed path runs. A routed system (RoE) is timed on its route and on its own every-layer
    path (the reference of its speedup_bs1, under "<name>_dense_route"); the others as they answer."""
    paths = {}
    for name, pipe in pipes.items():
        if pipe.spec.routed:
            paths[name] = lambda b, m, p=pipe: p.generate(b, m, route="auto", threshold=threshold)
            paths[f"{name}_dense_route"] = lambda b, m, p=pipe: p.generate(b, m, route="dense")
        else:
            paths[name] = lambda b, m, p=pipe: p.generate(b, m)
    return paths


def run(model: str = "embedded", roe: str | None = None, n: int = 1008, quick: bool = False,
        out: str | Path = "bench", device: str = "auto", max_new_tokens: int = 24, repeats: int = 5,
        timing_n: int = 48, batch_size: int = 16, threshold: float | None = None, shifted_n: int = 400,
        systems: list[str] | None = None, parts: dict[str, str] | None = None,
        uniformity_n: int = 240, command: str | None = None, curve_n: int = 240, fresh: bool = False,
        fitted: str | None = None, wide_n: int | None = None, oracle: str | Path | None = "bench/oracle") -> dict:
    """Every system on the test split (see the module's docstring). roe / parts: parts folders other than
    the shipped ones ({system: folder}; roe= is parts["roe"]). command: how this run was started,
    recorded in the results (main() passes its own command line). curve_n: test questions of the
    fixed-path curve (fixed_curve; 0: none). fresh: untrained parts for systems the model has none for
    (asked for explicitly: smoke runs on the tiny model); without it such systems refuse (NotFittedError).
    fitted: a roe_core.fit folder, "auto" (fitted here on the fly; the CLI's default with --quick) or "none"
    (None: the default): its systems run as `<system>_fit` beside the others (bench/fitted.py), in a table of
    the systems that skip layers with reworded val (wide_n questions: default 240 with fitted systems, else
    0; wide_n > 0 without them gives the table for the others alone)."""
    if quick:
        n, repeats, timing_n, shifted_n, uniformity_n = min(n, 24), 2, 8, min(shifted_n, 16), min(uniformity_n, 8)
    fitted = fitted or "none"
    wide_n = (240 if fitted != "none" else 0) if wide_n is None else wide_n
    if quick:
        curve_n, wide_n = min(curve_n, 16), min(wide_n, 16)
    systems = list(systems or shipped_systems(model))
    unknown = [s for s in systems if s not in registry.SYSTEMS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}: choose from {', '.join(registry.names())}")
    parts = {**(parts or {}), **({"roe": roe} if roe else {})}
    torch.manual_seed(0)
    loaded = load_base(model, device)
    pipes = load_systems(systems, loaded=loaded, parts=parts, fresh=fresh)
    fit_pipes, fit_summary = fitted_pipelines(loaded, fitted, quick, Path(out))
    evaluated = {**pipes, **fit_pipes}           # the registered systems, then the fitted ones (<system>_fit)
    any_pipe = next(iter(pipes.values()))
    qs = test_questions(n)
    sq = shifted_questions(shifted_n)
    t0 = time.perf_counter()
    ev, ev_shifted = {}, {}
    for name, pipe in evaluated.items():
        ev[name] = evaluate(pipe, qs, None, batch_size, max_new_tokens, threshold)
        ev_shifted[name] = evaluate(pipe, sq, None, batch_size, max_new_tokens, threshold)
    routed = next((n for n, p in pipes.items() if p.spec.routed), None)
    roe_pipe = pipes.get(routed) if routed else None
    if roe_pipe is not None and "dense" not in pipes:   # RoE's every-layer path stands in for the dense model
        ev["dense"] = evaluate(roe_pipe, qs, "dense", batch_size, max_new_tokens)
        ev_shifted["dense"] = evaluate(roe_pipe, sq, "dense", batch_size, max_new_tokens)
    eval_s = time.perf_counter() - t0

    # speed: the first timing_n questions, one at a time and in batches of 16 (RoE: mixed routes)
    tq = qs[:timing_n]
    items = [(q.image, q.question, q.history) for q in tq]
    paths = timing_paths(evaluated, threshold)
    bs1 = time_rounds(paths, [any_pipe.batch([it]) for it in items], repeats, max_new_tokens)
    bs16 = time_rounds(paths, [any_pipe.batch(c) for c in _batches(items, 16)], repeats, max_new_tokens)
    med = {k: {p: statistics.median(v) for p, v in d.items()} for k, d in (("bs1", bs1), ("bs16", bs16))}
    eps = {k: {p: len(tq) / v for p, v in d.items()} for k, d in med.items()}

    results = {
        "model": model, "systems_run": systems, "device": str(any_pipe.device), "dtype": any_pipe.info.get("dtype"),
        "cpu_threads": torch.get_num_threads(), "machine": platform.machine(), "quick": quick,
        "n_questions": len(qs), "max_new_tokens": max_new_tokens, "eval_seconds": eval_s,
        "num_layers": any_pipe.info.get("num_layers"),
        "timing": {"n_examples": len(tq), "repeats": repeats, "bs1_seconds": bs1, "bs16_seconds": bs16,
                   "bs1_examples_per_s": eps["bs1"], "bs16_examples_per_s": eps["bs16"]},
        "dense": {"accuracy": statistics.mean(ev["dense"][1]), "layers_executed": any_pipe.info.get("num_layers")},
        "systems": {},
        "paper": {n: registry.get(n).paper for n in pipes if registry.get(n).paper},
    }
    for name, pipe in evaluated.items():
        preds, ok, traces = ev[name]
        _, s_ok, _ = ev_shifted[name]
        by_type = defaultdict(list)
        for q, k in zip(qs, ok):
            by_type[q.qtype].append(k)
        layers = statistics.mean(t.layers_executed for t in traces)
        counts = pipe.parameter_counts(layers)
        row = {"label": fitted_label(name, pipe), "parts": pipe.info.get("parts"), "accuracy": statistics.mean(ok),
               "layers_executed": layers,
               "by_type": {k: statistics.mean(v) for k, v in sorted(by_type.items())},
               "shifted_accuracy": statistics.mean(s_ok) if sq else None,
               "examples_per_s_bs1": eps["bs1"][name], "examples_per_s_bs16": eps["bs16"][name],
               "params": counts.to_dict()}
        if pipe.spec.moe:
            row.update(expert_stats(pipe, qs, traces))
            row["expert_similarity_per_layer"] = expert_similarity(pipe, qs)
            row["uniformity"] = uniformity(pipe, qs[:uniformity_n], ok, batch_size, max_new_tokens)
        results["systems"][name] = row
    if roe_pipe is not None:
        results.update(roe_results(roe_pipe, routed, qs, sq, ev, ev_shifted, eps, med, threshold, len(tq)))
        fixed = next(((n, p.skip_order()) for n, p in pipes.items() if p.skip_order()), None)
        if fixed and curve_n:
            results["fixed_curve"] = fixed_curve(roe_pipe, qs[:curve_n], fixed[0], fixed[1], threshold,
                                                 batch_size, max_new_tokens)
    if fit_pipes or wide_n:
        wq = wide_questions(wide_n, "val") if wide_n else []
        results["fitted"] = fitted_table(evaluated, ev, ev_shifted, qs, sq, wq, batch_size, max_new_tokens, threshold,
                                         fit_summary, Path(oracle) if oracle else None)
    sy = results["systems"]
    for a, b in paper_pairs(pipes):
            results[f"accuracy_{a}_minus_{b}"] = sy[a]["accuracy"] - sy[b]["accuracy"]
            results[f"speedup_{a}_vs_{b}"] = {k: eps[k][a] / eps[k][b] for k in ("bs1", "bs16")}
    results["command"] = command
    results["date"] = time.strftime("%Y-%m-%d")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    return results


CURVE_THRESHOLDS = (0.4, 0.5, 0.6)


def fixed_curve(pipe: Pipeline, qs: list[Question], name: str, order: list[int], threshold: float | None,
                batch_size: int, max_new_tokens: int) -> dict:
    """Per-example routing against fixed paths with the same adapters: RoE's threshold sweep and, through
    RoE's pipeline, the path skipping the first k layers of `name`'s order (its skip_order()) for every
    input, at every third k from a fifth to half the layers and at RoE's own mean. At equal mean layers (the fixed
    curve interpolated at RoE's) the difference is what routing per example adds."""
    from ..analysis.sweep import sweep_fixed, sweep_thresholds
    L = pipe.num_layers
    own = pipe.model.threshold_or(threshold)
    routed = sweep_thresholds(pipe, qs, sorted({*CURVE_THRESHOLDS, own}), batch_size, max_new_tokens)
    at = next(p for p in routed if p.threshold is not None and abs(p.threshold - own) < 1e-9)
    k_roe = round(L - at.mean_layers_executed)
    ks = sorted({*range(L // 5, L // 2 + 1, 3), max(0, min(L - 1, k_roe))})
    fixed = sweep_fixed(pipe, qs, order, ks, batch_size, max_new_tokens)
    pts = sorted((p.mean_layers_executed, p.accuracy) for p in fixed)

    def interp(x):
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 <= x <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return None
    same = interp(at.mean_layers_executed)
    return {"n_questions": len(qs), "order_from": name, "order": order, "threshold": own,
            "roe": [p.to_dict() for p in routed], "fixed": [p.to_dict() for p in fixed],
            "roe_layers": at.mean_layers_executed, "roe_accuracy": at.accuracy,
            "fixed_accuracy_at_roe_layers": same,
            "roe_minus_fixed_at_equal_layers": None if same is None or at.accuracy is None else at.accuracy - same}


def paper_pairs(systems) -> list[tuple[str, str]]:
    """(system, other) pairs that a system's paper compares and that both ran here (registry `paper`)."""
    return [(a, b) for a in systems if a in registry.SYSTEMS for b in registry.get(a).paper.get("versus", {})
            if b in systems]


def roe_results(pipe: Pipeline, name: str, qs, sq, ev, ev_shifted, eps, med, threshold, n_timed: int) -> dict:
    """A routed system's own figures (under "roe": RoE's, the project's method): routes, skip ratio,
    speed against its every-layer path, ideal speedup, by question type and difficulty, the shifted split."""
    d_pred, d_ok, d_tr = ev["dense"]
    r_pred, r_ok, r_tr = ev[name]
    s_pred, s_dense_ok, _ = ev_shifted["dense"]
    s_rpred, s_ok, s_tr = ev_shifted[name]
    lengths = [(len(pipe.encoder.encode(list(q.history) + [(q.question, None)]).input_ids),
                len(pipe.encoder.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1)
               for q, a in zip(qs, r_pred)]
    ideal, ideal_layers = ideal_speedups(pipe, r_tr, lengths)
    by_level = defaultdict(lambda: defaultdict(list))
    for q, dk, rk, tr in zip(qs, d_ok, r_ok, r_tr):
        level = by_level[scenes.DIFFICULTY.get(q.qtype)]
        level["types"].append(q.qtype)
        level["dense"].append(dk), level["roe"].append(rk), level["layers"].append(tr.layers_executed)
    L = pipe.model.num_layers
    r = {
        "roe_parts": pipe.info.get("parts"),
        "threshold": pipe.model.threshold_or(threshold),
        "roe": {
            "accuracy": statistics.mean(r_ok),
            "skip_ratio": statistics.mean(t.skip_ratio for t in r_tr),
            "layers_executed": statistics.mean(t.layers_executed for t in r_tr),
            "distinct_routes": len({tuple(t.route) for t in r_tr}),
            "layer_run_rate": [statistics.mean(t.route[i] for t in r_tr) for i in range(L)],
            # per example: how many layers each answer ran (the spread per-example routing exists for)
            "layers_executed_std": statistics.pstdev(t.layers_executed for t in r_tr),
            "layers_executed_histogram": {str(k): v for k, v in sorted(
                Counter(t.layers_executed for t in r_tr).items())},
        },
        # against RoE's own every-layer path, timed in the same rounds
        "speedup_bs1": med["bs1"][f"{name}_dense_route"] / med["bs1"][name],
        "speedup_bs16": med["bs16"][f"{name}_dense_route"] / med["bs16"][name],
        "ideal_speedup": ideal,
        "ideal_speedup_layers": ideal_layers,
        "roe_timing": {
            "bs1_examples_per_s": {"auto": eps["bs1"][name], "dense": eps["bs1"][f"{name}_dense_route"]},
            "bs16_examples_per_s": {"auto": eps["bs16"][name], "dense": eps["bs16"][f"{name}_dense_route"]},
            # each path generates its own full answer; answers of different lengths cost differently
            "mean_new_tokens": {"auto": statistics.mean(t.new_tokens for t in r_tr[:n_timed]),
                                "dense": statistics.mean(t.new_tokens for t in d_tr[:n_timed])},
        },
        "by_type": accuracy_by_type(qs, d_ok, r_ok, r_tr),
        # the question types pooled by their difficulty (scenes.DIFFICULTY: 1 easy ... 3 hard)
        "by_difficulty": {
            str(k): {"n": len(v["dense"]), "types": sorted(set(v["types"])),
                     "dense_accuracy": statistics.mean(v["dense"]), "roe_accuracy": statistics.mean(v["roe"]),
                     "mean_layers_executed": statistics.mean(v["layers"])}
            for k, v in sorted(by_level.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        },
        "examples": [{"question": q.question, "qtype": q.qtype, "gold": q.gold, "dense": dp, "roe": rp,
                      "layers_executed": tr.layers_executed}
                     for q, dp, rp, tr in list(zip(qs, d_pred, r_pred, r_tr))[:12]],
        # the shifted split (scenes.make_shifted_split), beside the test split: never trained on
        "shifted": {
            "n_questions": len(sq),
            "dense": {"accuracy": statistics.mean(s_dense_ok) if sq else None},
            "roe": {"accuracy": statistics.mean(s_ok) if sq else None,
                    "skip_ratio": statistics.mean(t.skip_ratio for t in s_tr) if sq else None,
                    "layers_executed": statistics.mean(t.layers_executed for t in s_tr) if sq else None},
            "by_type": accuracy_by_type(sq, s_dense_ok, s_ok, s_tr),
            "examples": [{"question": q.question, "qtype": q.qtype, "gold": q.gold, "dense": dp, "roe": rp}
                         for q, dp, rp in list(zip(sq, s_pred, s_rpred))[:12]],
        },
    }
    r["speedup_bs1_fraction_of_ideal"] = r["speedup_bs1"] / ideal
    return r


def _f(v, fmt=".3f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(r: dict) -> str:
    sy = r["systems"]
    names = list(sy)
    lines = [f"# Benchmark: {', '.join(sy[n]['label'] for n in names)} ({r['model']}, {r['device']}, {r['dtype']}, "
             f"{r['n_questions']} test questions{', quick' if r['quick'] else ''})", "",
             *([f"Command: `{r['command']}` ({r.get('date', '')}; {r.get('machine', '')})", ""] if r.get("command") else []),
             "| | " + " | ".join(sy[n]["label"] for n in names) + " |", "|---" * (len(names) + 1) + "|"]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(n, sy[n]) for n in names) + " |")
    row("accuracy (exact match)", lambda n, v: f"{v['accuracy']:.3f}")
    row("shifted split accuracy", lambda n, v: _f(v["shifted_accuracy"]))
    row("examples/s, batch 1", lambda n, v: f"{v['examples_per_s_bs1']:.2f}")
    row("examples/s, batch 16", lambda n, v: f"{v['examples_per_s_bs16']:.2f}")
    row("parameters, total (M)", lambda n, v: f"{v['params']['total'] / 1e6:.1f}")
    row("parameters active per token (M)", lambda n, v: f"{v['params']['active'] / 1e6:.1f}")
    row("decoder layers run per token", lambda n, v: f"{v.get('layers_executed', r['num_layers']):.1f} of "
                                                     f"{r['num_layers']}")
    if any("l_aux_sum" in v for v in sy.values()):
        row("l_aux per MoE layer (balanced 1.0)", lambda n, v: f"{v['l_aux_sum'] / len(v['l_aux_per_layer']):.3f}"
            if "l_aux_sum" in v else "-")
    for a, b in paper_pairs(names):
        la, lb = sy[a]["label"], sy[b]["label"]
        sp, d = r[f"speedup_{a}_vs_{b}"], r[f"accuracy_{a}_minus_{b}"]
        pa = registry.get(a).paper
        v = pa["versus"][b]
        eps = v.get("examples_per_s")
        lines += ["", f"| {la} vs {lb} | here | the {la} paper |", "|---|---|---|",
                  f"| accuracy, {la} minus {lb} (points) | {100 * d:+.1f} | {v['accuracy_points']:+.1f} |",
                  f"| speed, {la} / {lb}, batch 1 | {sp['bs1']:.2f}x | "
                  + (f"{v['speedup']}x" if "speedup" in v else "-")
                  + (f" ({eps[0]} vs {eps[1]} examples/s)" if eps else "") + " |",
                  f"| speed, {la} / {lb}, batch 16 | {sp['bs16']:.2f}x | - |", "", f"The paper's figures: {pa['source']}."]
        if d < 0:
            lines += ["", f"**{lb} is more accurate than {la} here, by {-100 * d:.1f} points.**"]
    lines += ["", "| type | " + " | ".join(sy[n]["label"] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for t in sorted({t for n in names for t in sy[n]["by_type"]}):
        lines.append(f"| {t} | " + " | ".join(_f(sy[n]["by_type"].get(t)) for n in names) + " |")
    moes = [n for n in names if "expert_load" in sy[n]]
    if moes:
        lines += ["", "Expert uniformity and router rigidity (EvoMoE's evidence; means over MoE layers). The EvoMoE "
                  "paper: shuffling MoE-LLaVA's router logits at eval costs nothing, and its image and text tokens get "
                  "similar expert distributions.", "",
                  "| system | accuracy (first n) | with router scores shuffled | expert-output cosine similarity "
                  "| image-vs-text divergence (JS, bits) |", "|---|---|---|---|---|"]
        for n in moes:
            v = sy[n]
            u = v["uniformity"]
            lines.append(f"| {v['label']} | {_f(u['accuracy'])} (n={u['n']}) | {_f(u['accuracy_shuffled_routers'])} "
                         f"| {statistics.mean(v['expert_similarity_per_layer']):.3f} "
                         f"| {statistics.mean(v['rigidity_js_per_layer']):.3f} |")
    for n in moes:
        m = sy[n]
        lines += ["", f"{m['label']} per MoE layer: top-1 share of each expert (image tokens | text tokens), "
                  "their divergence, expert-output similarity, l_aux:", "",
                  "| MoE layer | image | text | JS | cos sim | l_aux |", "|---|---|---|---|---|---|"]
        for i, layer in enumerate(m["moe_layers"]):
            img = " ".join(f"{x:.2f}" for x in m["expert_load"]["image"][i])
            txt = " ".join(f"{x:.2f}" for x in m["expert_load"]["text"][i])
            lines.append(f"| {layer} | {img} | {txt} | {m['rigidity_js_per_layer'][i]:.3f} "
                         f"| {m['expert_similarity_per_layer'][i]:.3f} | {m['l_aux_per_layer'][i]:.3f} |")
    if "roe" in r:
        lines += ["", roe_markdown(r)]
    if "fitted" in r:
        lines += ["", fitted_markdown(r["fitted"], r["num_layers"])]
    if "fixed_curve" in r:
        lines += ["", fixed_curve_markdown(r["fixed_curve"], sy[r["fixed_curve"]["order_from"]]["label"], r["num_layers"])]
    return "\n".join(lines) + "\n"


def fixed_curve_markdown(c: dict, label: str, L: int) -> str:
    d = c["roe_minus_fixed_at_equal_layers"]
    verdict = ("-" if d is None else f"**{100 * d:+.1f} points**"
               + ("" if d >= 0.02 else " (per-example routing does not beat the fixed path by 2 points here)"))
    lines = [f"## Per-example routes against fixed paths, the same adapters ({c['n_questions']} test questions)", "",
             f"RoE's threshold swept, and the path that skips the first k layers of {label}'s order "
             f"({', '.join(map(str, c['order'][:12]))}, ...) for every input, both with RoE's adapters standing in. "
             f"At RoE's own threshold {c['threshold']:g} ({c['roe_layers']:.2f} layers): RoE {_f(c['roe_accuracy'])}, "
             f"the fixed path interpolated at the same layers {_f(c['fixed_accuracy_at_roe_layers'])}: RoE minus fixed "
             f"{verdict}. RoE's adapters were trained on RoE's own routes: where the fixed path skips layers RoE "
             f"rarely skips, they stand in untrained, so this curve is a lower bound for a fixed path. The fair "
             f"comparison is {label}'s row in the first table (its own adapters, trained on the same data).", "",
             "| path | layers run (of %d) | accuracy | same answer as every layer |" % L, "|---|---|---|---|"]
    for p in c["roe"][1:]:
        lines.append(f"| RoE, threshold {p['threshold']:g} | {p['mean_layers_executed']:.2f} | {_f(p['accuracy'])} "
                     f"| {p['agreement_with_dense']:.3f} |")
    for p in c["fixed"][1:]:
        lines.append(f"| fixed, k = {p['fixed_k']} | {p['mean_layers_executed']:.0f} | {_f(p['accuracy'])} "
                     f"| {p['agreement_with_dense']:.3f} |")
    return "\n".join(lines)


def roe_markdown(r: dict) -> str:
    t = r["roe_timing"]
    lines = [
        f"## RoE against its own every-layer path (router threshold {r['threshold']:g})", "",
        "| | every layer | RoE |", "|---|---|---|",
        f"| accuracy (exact match) | {r['dense']['accuracy']:.3f} | {r['roe']['accuracy']:.3f} |",
        f"| layers executed (mean of {r['num_layers']}) | {r['num_layers']} | {r['roe']['layers_executed']:.2f} |",
        f"| skip ratio | 0 | {r['roe']['skip_ratio']:.3f} |",
        f"| distinct routes | 1 | {r['roe']['distinct_routes']} |",
        f"| layers run per example: standard deviation | 0 | {r['roe']['layers_executed_std']:.2f} |",
        "| layers run per example: histogram (layers: answers) | - | " + ", ".join(
            f"{k}: {v}" for k, v in r["roe"]["layers_executed_histogram"].items()) + " |",
        f"| examples/s, batch 1 | {t['bs1_examples_per_s']['dense']:.2f} | {t['bs1_examples_per_s']['auto']:.2f} |",
        f"| examples/s, batch 16 (mixed routes) | {t['bs16_examples_per_s']['dense']:.2f} | {t['bs16_examples_per_s']['auto']:.2f} |",
        "", f"speedup_bs1 = **{r['speedup_bs1']:.3f}**, speedup_bs16 = **{r['speedup_bs16']:.3f}**, "
        f"ideal_speedup = {r['ideal_speedup']:.3f} (layers only: {r['ideal_speedup_layers']:.3f}); "
        f"bs1 reaches {100 * r['speedup_bs1_fraction_of_ideal']:.0f}% of ideal. Mean answer length in the timed set: "
        f"RoE {t['mean_new_tokens']['auto']:.1f}, dense {t['mean_new_tokens']['dense']:.1f} tokens.", "",
        "| type | difficulty | n | dense acc | RoE acc | mean layers executed |", "|---|---|---|---|---|---|",
    ]
    for k, v in r["by_type"].items():
        lines.append(f"| {k} | {v['difficulty']} | {v['n']} | {v['dense_accuracy']:.3f} | {v['roe_accuracy']:.3f} "
                     f"| {v['mean_layers_executed']:.2f} |")
    lines += ["", "| difficulty | types | n | dense acc | RoE acc | mean layers executed |", "|---|---|---|---|---|---|"]
    for k, v in r["by_difficulty"].items():
        lines.append(f"| {k} | {', '.join(v['types'])} | {v['n']} | {v['dense_accuracy']:.3f} | {v['roe_accuracy']:.3f} "
                     f"| {v['mean_layers_executed']:.2f} |")
    sh = r.get("shifted")
    if sh and sh["n_questions"]:
        lines += ["", f"Shifted split ({sh['n_questions']} questions never trained on: held-out phrasings, 96-1024 px, "
                  f"aspect 1:2-2:1, JPEG 60-90, other outline widths and background tones): dense "
                  f"**{sh['dense']['accuracy']:.3f}**, RoE **{sh['roe']['accuracy']:.3f}** at "
                  f"{sh['roe']['skip_ratio']:.3f} skipped.", "",
                  "| type | n | dense acc | RoE acc | mean layers executed |", "|---|---|---|---|---|"]
        for k, v in sh["by_type"].items():
            lines.append(f"| {k} | {v['n']} | {v['dense_accuracy']:.3f} | {v['roe_accuracy']:.3f} "
                         f"| {v['mean_layers_executed']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--systems", default=None,
                    help=f"comma-separated, of {','.join(registry.names())} (default: every system the model has parts for)")
    for spec in registry.SYSTEMS.values():      # --roe, --moe-llava, ...: one per system with parts
        if spec.has_parts:
            ap.add_argument(f"--{spec.name.replace('_', '-')}", dest=f"parts_{spec.name}", default=None,
                            help=f"{spec.label} parts folder (default: the shipped ones)")
    ap.add_argument("--uniformity-n", type=int, default=240,
                    help="MoE systems: test questions re-answered with shuffled router scores")
    ap.add_argument("--n", type=int, default=1008, help="test questions (fixed seed)")
    ap.add_argument("--quick", action="store_true", help="24 questions, 8 timed, fewer repeats: a smoke run")
    ap.add_argument("--out", default="bench")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timing-n", type=int, default=48)
    ap.add_argument("--shifted-n", type=int, default=400, help="questions of the shifted split (0: none)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="run a layer iff p_run > this (default: the RoE parts' own, roe_config.json)")
    ap.add_argument("--fitted", default=None,
                    help="a roe_core.fit folder whose systems run as <system>_fit, 'auto' to fit on the fly (the "
                         "default with --quick), 'none' (the default otherwise)")
    ap.add_argument("--wide-n", type=int, default=None,
                    help="the fitted table's reworded val questions (default 240 with fitted systems, else 0: no table)")
    ap.add_argument("--curve-n", type=int, default=240,
                    help="test questions of the fixed-path curve (RoE's thresholds vs a fixed path at each k; 0: none)")
    args = ap.parse_args(argv)
    parts = {n: getattr(args, f"parts_{n}") for n, s in registry.SYSTEMS.items()
             if s.has_parts and getattr(args, f"parts_{n}")}
    r = run(args.model, None, args.n, args.quick, args.out, args.device, args.max_new_tokens,
            args.repeats, args.timing_n, threshold=args.threshold, shifted_n=args.shifted_n,
            systems=[x.strip() for x in args.systems.split(",") if x.strip()] if args.systems else None,
            parts=parts, uniformity_n=args.uniformity_n, curve_n=args.curve_n,
            fitted=args.fitted or ("auto" if args.quick else "none"), wide_n=args.wide_n,
            command=" ".join(["python -m roe_core.bench", *(argv if argv is not None else sys.argv[1:])]))
    print(markdown(r))


if __name__ == "__main__":
    main()
