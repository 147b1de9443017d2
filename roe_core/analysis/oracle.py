"""The oracle route: per example, how few layers (RoE's adapters standing in for the rest) still give
the dense path's answer. Its mean and spread of layers run are the headroom of per-example routing,
to set beside RoE's routes and the fixed path's k.

    python -m roe_core.analysis.oracle --n 160 --split val --out bench/oracle

Greedy removal, one layer at a time, in the order of the dense path's Fig. 1 L1 for that example (the
layer that changes its input least first): a layer is skipped for good when the answer with it skipped
(and every layer skipped so far) is still exactly the dense answer. All examples of a batch try their
next candidate in the same batched generation (forced routes, one per example). Never the test split
by default: routes found here may supervise a router.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import torch

from ..scenes.questions import Question, test_questions
from .evaluate import batches


@torch.inference_mode()
def oracle_routes(pipe, qs: list[Question], batch_size: int = 16, max_new_tokens: int = 24,
                  progress: bool = True) -> dict:
    """Per question: the dense answer, the oracle route (True = run) and RoE's own route and answer."""
    from ..systems.roe import prefill_l1
    out = {"dense": [], "route": [], "roe_route": [], "roe_answer": []}
    chunks = batches(qs, batch_size)
    for n, chunk in enumerate(chunks):
        items = [(q.image, q.question, q.history) for q in chunk]
        batch = pipe.batch(items)
        dense = [a.text for a in pipe.answer_collated(items, batch, route="dense", max_new_tokens=max_new_tokens)]
        auto = pipe.answer_collated(items, batch, route="auto", max_new_tokens=max_new_tokens)
        l1 = prefill_l1(pipe.model, batch, "dense").float().cpu()             # (B, L)
        B, L = l1.shape
        order = l1.argsort(dim=1)
        run = torch.ones(B, L, dtype=torch.bool)
        rows = torch.arange(B)
        for t in range(L):
            cand = run.clone()
            cand[rows, order[:, t]] = False
            got = [a.text for a in pipe.answer_collated(items, batch, route=cand, max_new_tokens=max_new_tokens)]
            keep = torch.tensor([g == d for g, d in zip(got, dense)])
            run[keep] = cand[keep]
        out["dense"] += dense
        out["route"] += run.tolist()
        out["roe_route"] += [a.trace.route for a in auto]
        out["roe_answer"] += [a.text for a in auto]
        if progress:
            done = sum(map(sum, out["route"])) / len(out["route"])
            print(f"batch {n + 1}/{len(chunks)}: oracle mean layers so far {done:.2f}", flush=True)
    return out


def summarise(qs: list[Question], res: dict, L: int) -> dict:
    layers = [sum(r) for r in res["route"]]
    roe_layers = [sum(r) for r in res["roe_route"]]
    by_type: dict[str, list[int]] = {}
    for q, n in zip(qs, layers):
        by_type.setdefault(q.qtype, []).append(n)
    return {
        "n": len(qs), "num_layers": L,
        "oracle_mean_layers": statistics.mean(layers), "oracle_std_layers": statistics.pstdev(layers),
        "oracle_histogram": dict(sorted(Counter(layers).items())),
        "oracle_distinct_routes": len({tuple(r) for r in res["route"]}),
        "oracle_min_max": [min(layers), max(layers)],
        "roe_mean_layers": statistics.mean(roe_layers), "roe_std_layers": statistics.pstdev(roe_layers),
        "roe_distinct_routes": len({tuple(r) for r in res["roe_route"]}),
        "roe_same_as_dense": statistics.mean(a == d for a, d in zip(res["roe_answer"], res["dense"])),
        "oracle_layer_run_rate": [statistics.mean(r[i] for r in res["route"]) for i in range(L)],
        "oracle_mean_layers_by_type": {k: statistics.mean(v) for k, v in sorted(by_type.items())},
    }


def markdown(s: dict, command: str) -> str:
    lines = [f"# Oracle routes ({s['n']} questions)", "", f"`{command}`", "",
             "Fewest layers per example (greedy removal in the dense path's L1 order, RoE's adapters standing "
             "in) that keep the dense answer exactly, beside RoE's own routes on the same questions.", "",
             "| | mean layers | std | distinct routes |", "|---|---|---|---|",
             f"| oracle | {s['oracle_mean_layers']:.1f} of {s['num_layers']} | {s['oracle_std_layers']:.2f} | "
             f"{s['oracle_distinct_routes']} |",
             f"| RoE (auto) | {s['roe_mean_layers']:.1f} | {s['roe_std_layers']:.2f} | {s['roe_distinct_routes']} |", "",
             f"RoE gives the dense answer on {s['roe_same_as_dense']:.1%} of these questions; the oracle on all "
             "by construction.", "", "Oracle layers by type: " +
             ", ".join(f"{k} {v:.1f}" for k, v in s["oracle_mean_layers_by_type"].items()), "",
             "Histogram of oracle layers run: " + ", ".join(f"{k}: {v}" for k, v in s["oracle_histogram"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--roe", default=None, help="RoE parts folder (default: the shipped ones)")
    ap.add_argument("--split", default="val", choices=["val", "train"])
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="bench/oracle")
    args = ap.parse_args(argv)
    from ..systems import load_system
    pipe = load_system("roe", args.model, args.roe, device="cpu")
    qs = test_questions(args.n, split=args.split)
    res = oracle_routes(pipe, qs, args.batch_size)
    s = summarise(qs, res, pipe.num_layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m roe_core.analysis.oracle " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    (out / "results.json").write_text(json.dumps({"summary": s, "command": command, **res}, indent=1))
    (out / "results.md").write_text(markdown(s, command))
    print(markdown(s, command))
    return s


if __name__ == "__main__":
    main()
