"""The fitted systems in the benchmark (issue 34): RoE's and the fixed path's parts fitted to the model's
own dense answers (roe_core.fit), under their own names (`<system>_fit`: roe_fit, and the fixed path's),
beside the shipped (trained) systems, at matched mean layers run.

    python -m roe_core.bench --fitted runs/fit            # a finished fit's folder (python -m roe_core.fit)
    python -m roe_core.bench --quick                       # fits on the fly (a few train-split inputs)
    python -m roe_core.bench --fitted none                 # without them

The table (results["fitted"], results.md "Fitted parts against trained ones"): per system the test
split, the shifted split and reworded val (scenes.wide_questions), layers run per example (mean, std,
by question type) and the fit's time; the oracle's figures (bench/oracle, val questions) beside.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from ..analysis.evaluate import evaluate as _evaluate
from ..fit import FitConfig, SUMMARY, fit_parts, fitted_folders, scene_inputs
from ..systems import registry

SUFFIX = "_fit"
QUICK_FIT = dict(n=32, cfg=dict(n_val=8, n_evidence=8, calib_steps=2, batch_size=8, max_new_tokens=8))
AUTO_FIT = dict(n=256, cfg=dict(n_val=48, n_evidence=96, calib_steps=5))


def fitted_pipelines(loaded, fitted: str | None, quick: bool, out: Path, target_layers: float = 0.0) -> tuple[dict, dict | None]:
    """({"<system>_fit": pipeline}, the fit's summary) from a fit folder, or fitted here on the fly
    ("auto": train-split scenes, a few in --quick) into <out>/fitted; ({}, None) for "none"."""
    if fitted in (None, "none"):
        return {}, None
    if fitted == "auto":
        plan = QUICK_FIT if quick else AUTO_FIT
        folder = Path(out) / "fitted"
        cfg = FitConfig(**plan["cfg"], target_layers=target_layers, base_model=str(loaded.info.get("model", "")))
        summary = fit_parts(loaded, scene_inputs(plan["n"], "train"), folder, cfg)
        summary["command"] = f"fitted on the fly by the bench: {plan['n']} train-split scenes, {plan['cfg']}"
    else:
        folder = Path(fitted)
        path = folder / SUMMARY
        summary = json.loads(path.read_text()) if path.is_file() else None
    folders = fitted_folders(folder)
    if not folders:
        raise FileNotFoundError(f"{folder} holds no fitted parts (python -m roe_core.fit --out {folder})")
    pipes = {name + SUFFIX: registry.get(name).pipeline_class().from_base(loaded, parts=f)
             for name, f in folders.items()}
    for p in pipes.values():
        p.info["parts"] = f"fitted ({folder})"
    return pipes, summary


def label(name: str, pipe) -> str:
    return f"{pipe.label} (fitted)" if name.endswith(SUFFIX) else pipe.label


def layer_stats(qs, traces) -> dict:
    layers = [t.layers_executed for t in traces]
    by_type = defaultdict(list)
    for q, n in zip(qs, layers):
        by_type[q.qtype].append(n)
    return {"mean_layers": statistics.mean(layers), "std_layers": statistics.pstdev(layers),
            "layers_by_type": {k: statistics.mean(v) for k, v in sorted(by_type.items())}}


def fitted_table(pipes: dict, ev: dict, ev_shifted: dict, qs, sq, wq, batch_size: int, max_new_tokens: int,
                 threshold: float | None, fit_summary: dict | None, oracle: Path | None = None) -> dict:
    """Per system that skips layers (routed ones and fixed paths, shipped and fitted): accuracy on test,
    shifted and reworded val, layers per example; with the fit's summary and the oracle's figures."""
    rows = {}
    for name, pipe in pipes.items():
        traces = ev[name][2]
        if not traces or not hasattr(traces[0], "route"):
            continue
        opts = {"route": "auto", "threshold": threshold} if pipe.spec.routed else {}
        w_pred, w_ok, w_tr = _evaluate(pipe, wq, batch_size, max_new_tokens, progress=f"reworded val, {name}", **opts) \
            if wq else ([], [], [])
        rows[name] = {"label": label(name, pipe), "fitted": name.endswith(SUFFIX),
                      "test_accuracy": statistics.mean(ev[name][1]),
                      "shifted_accuracy": statistics.mean(ev_shifted[name][1]) if sq else None,
                      "reworded_val_accuracy": statistics.mean(w_ok) if wq else None,
                      **layer_stats(qs, traces),
                      "shifted_mean_layers": statistics.mean(t.layers_executed for t in ev_shifted[name][2]) if sq else None,
                      "reworded_mean_layers": statistics.mean(t.layers_executed for t in w_tr) if wq else None}
    t = {"systems": rows, "n_test": len(qs), "n_shifted": len(sq), "n_reworded_val": len(wq)}
    if fit_summary:
        t["fit"] = {k: fit_summary.get(k) for k in ("n_inputs", "n_fit", "n_val", "n_evidence", "evidence",
                                                    "target_agreement", "target_layers", "threshold", "val_agreement",
                                                    "val_mean_layers", "val_std_layers", "static_k", "seconds",
                                                    "cpu_seconds", "cpu_threads", "command")}
    if oracle is not None and (oracle / "results.json").is_file():
        s = json.loads((oracle / "results.json").read_text())["summary"]
        t["oracle"] = {"n": s["n"], "split": "val", "mean_layers": s["oracle_mean_layers"],
                       "std_layers": s["oracle_std_layers"], "layers_by_type": s["oracle_mean_layers_by_type"],
                       "source": str(oracle / "results.json")}
    return t


def _f(v, fmt=".3f") -> str:
    return "-" if v is None else format(v, fmt)


def fitted_markdown(t: dict, num_layers: int) -> str:
    rows = t["systems"]
    lines = [f"## Fitted parts against trained ones ({t['n_test']} test, {t['n_shifted']} shifted, "
             f"{t['n_reworded_val']} reworded val questions)", "",
             "Fitted: roe_core.fit on the model's own dense answers (no gold answers, no training); the fixed path "
             "fitted on the same inputs at the fitted RoE's mean layers on its held-out inputs.", ""]
    fit = t.get("fit")
    if fit:
        lines += [f"Fit: {fit['n_inputs']} inputs ({fit['n_fit']} fitted, {fit['n_val']} held out; evidence "
                  f"{fit['evidence']} on {fit['n_evidence']}), {_f(fit['seconds'], '.0f')} s wall, "
                  f"{_f(fit.get('cpu_seconds'), '.0f')} CPU s; threshold {_f(fit['threshold'], '.4f')}: "
                  f"{_f(fit['val_mean_layers'], '.2f')} layers and {_f(fit['val_agreement'])} agreement with dense "
                  f"on its held-out inputs. `{fit.get('command') or ''}`", ""]
    lines += ["| system | test acc | shifted acc | reworded val acc | mean layers (test) | std | layers by type (test) |",
              "|---|---|---|---|---|---|---|"]
    for v in rows.values():
        types = ", ".join(f"{k} {x:.1f}" for k, x in v["layers_by_type"].items())
        lines.append(f"| {v['label']} | {_f(v['test_accuracy'])} | {_f(v['shifted_accuracy'])} | "
                     f"{_f(v['reworded_val_accuracy'])} | {v['mean_layers']:.2f} of {num_layers} | {v['std_layers']:.2f} | "
                     f"{types} |")
    o = t.get("oracle")
    if o:
        types = ", ".join(f"{k} {x:.1f}" for k, x in o["layers_by_type"].items())
        lines.append(f"| oracle ({o['n']} val questions, bench/oracle) | 1 vs dense by construction | - | - | "
                     f"{o['mean_layers']:.2f} | {o['std_layers']:.2f} | {types} |")
    return "\n".join(lines)
