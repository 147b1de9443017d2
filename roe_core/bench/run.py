"""Dense vs RoE, side by side in one run, on the scene test split.

    python -m roe_core.bench                 # embedded model, 1,008 test questions
    python -m roe_core.bench --quick         # < 60 s on 2 cores
    python -m roe_core.bench --model tiny --quick --out /tmp/bench

Writes <out>/results.json and <out>/results.md. Accuracy is exact match (scenes.answers_match) with
greedy decoding. Speed: examples per second of prefill + the whole answer; RoE and dense are timed
in interleaved rounds (RoE, dense, RoE, dense, ...) after an untimed warm-up, and the median round
is reported. speedup_bs16 uses batches of 16 examples whose routes differ.

ideal_speedup counts multiply-adds (parameters touched per token): decoder layers executed, adapters
of skipped layers, plus what every path runs (vision tower, projector, LM head on generated tokens).
It is what the route would give if time were proportional to arithmetic. ideal_speedup_layers counts
the decoder layers and adapters only.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import scenes
from ..systems.pipeline import RoEPipeline
from ..systems.roe import generate


@dataclass
class Question:
    image: object
    question: str
    history: list[tuple[str, str]]
    gold: str
    qtype: str


def test_questions(n: int, image_size: int = 256, split: str = "test") -> list[Question]:
    """The first n questions of a fixed split (test by default), each with its conversation so far (gold answers)."""
    out = []
    for seed in scenes.split_seeds(split, n):   # every sample has >= 1 turn: n samples suffice
        if len(out) >= n:
            break
        s = scenes.make_sample(seed)
        img = scenes.render(s.scene, image_size)
        hist = []
        for qa in s.turns:
            out.append(Question(img, qa.question, list(hist), qa.answer, qa.qtype))
            hist.append((qa.question, qa.answer))
    return out[:n]


def shifted_questions(n: int) -> list[Question]:
    """The first n questions of the shifted split (scenes.make_shifted_split): held-out phrasings,
    sizes, aspect ratios, JPEG, outline widths and background tones; one question per scene."""
    return [Question(s.image(), s.turns[0].question, [], s.turns[0].answer, s.turns[0].qtype)
            for s in scenes.make_shifted_split(n)]


def accuracy_by_type(qs: list[Question], d_ok, r_ok, r_tr) -> dict:
    rows = defaultdict(lambda: defaultdict(list))
    for q, dk, rk, tr in zip(qs, d_ok, r_ok, r_tr):
        t = rows[q.qtype]
        t["dense"].append(dk), t["roe"].append(rk), t["layers"].append(tr.layers_executed)
    return {k: {"n": len(v["dense"]), "difficulty": scenes.DIFFICULTY.get(k),
                "dense_accuracy": statistics.mean(v["dense"]), "roe_accuracy": statistics.mean(v["roe"]),
                "mean_layers_executed": statistics.mean(v["layers"])}
            for k, v in sorted(rows.items(), key=lambda kv: (scenes.DIFFICULTY.get(kv[0], 9), kv[0]))}


def _batches(xs, size):
    return [xs[i:i + size] for i in range(0, len(xs), size)]


def evaluate(pipe: RoEPipeline, qs: list[Question], route: str, batch_size: int, max_new_tokens: int,
             threshold: float | None = None):
    from tqdm.auto import tqdm
    preds, traces = [], []
    for chunk in tqdm(_batches(qs, batch_size), desc=f"accuracy, {route} route", unit="batch"):
        answers = pipe.answer_batch([(q.image, q.question, q.history) for q in chunk], route=route,
                                    threshold=threshold, max_new_tokens=max_new_tokens)
        preds += [a.text for a in answers]
        traces += [a.trace for a in answers]
    correct = [scenes.answers_match(p, q.gold) for p, q in zip(preds, qs)]
    return preds, correct, traces


def time_rounds(pipe: RoEPipeline, batches, repeats: int, max_new_tokens: int,
                threshold: float | None = None) -> dict[str, list[float]]:
    """Seconds per round over all batches, RoE and dense interleaved; one untimed warm-up round each."""
    from tqdm.auto import tqdm
    times = {"auto": [], "dense": []}
    for r in tqdm(range(repeats + 1), desc=f"timing, batches of {batches[0].input_ids.shape[0]}", unit="round"):
        for route in ("auto", "dense"):
            t0 = time.perf_counter()
            for b in batches:
                generate(pipe.model, b, route, max_new_tokens, pipe.encoder.stop_ids, threshold)
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            if r > 0:
                times[route].append(time.perf_counter() - t0)
    return times


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def ideal_speedups(pipe: RoEPipeline, traces, qs_tokens: list[tuple[int, int]]) -> tuple[float, float]:
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


def run(model: str = "embedded", roe: str | None = None, n: int = 1008, quick: bool = False,
        out: str | Path = "bench", device: str = "auto", max_new_tokens: int = 24, repeats: int = 5,
        timing_n: int = 48, batch_size: int = 16, threshold: float | None = None, shifted_n: int = 400) -> dict:
    if quick:
        n, repeats, timing_n, shifted_n = min(n, 24), 2, 8, min(shifted_n, 16)
    torch.manual_seed(0)
    pipe = RoEPipeline.load(model, roe=roe, device=device)
    qs = test_questions(n)
    t0 = time.perf_counter()
    d_pred, d_ok, d_tr = evaluate(pipe, qs, "dense", batch_size, max_new_tokens)
    r_pred, r_ok, r_tr = evaluate(pipe, qs, "auto", batch_size, max_new_tokens, threshold)
    sq = shifted_questions(shifted_n)
    s_pred, s_dense_ok, _ = evaluate(pipe, sq, "dense", batch_size, max_new_tokens)
    s_rpred, s_ok, s_tr = evaluate(pipe, sq, "auto", batch_size, max_new_tokens, threshold)
    eval_s = time.perf_counter() - t0

    # speed: the first timing_n questions, one at a time and in batches of 16 (mixed routes)
    tq = qs[:timing_n]
    items = [(q.image, q.question, q.history) for q in tq]
    bs1 = time_rounds(pipe, [pipe.batch([it]) for it in items], repeats, max_new_tokens, threshold)
    bs16 = time_rounds(pipe, [pipe.batch(c) for c in _batches(items, 16)], repeats, max_new_tokens, threshold)
    routes16 = {tuple(t.route) for t in r_tr[:timing_n]}
    med = {k: {r: statistics.median(v) for r, v in d.items()} for k, d in (("bs1", bs1), ("bs16", bs16))}

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
    results = {
        "model": model, "roe_parts": pipe.info.get("roe"), "device": str(pipe.device),
        "dtype": pipe.info.get("dtype"), "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(), "quick": quick, "n_questions": len(qs),
        "max_new_tokens": max_new_tokens, "num_layers": L, "eval_seconds": eval_s,
        "threshold": pipe.model.config.threshold if threshold is None else threshold,
        "dense": {"accuracy": statistics.mean(d_ok), "layers_executed": L},
        "roe": {
            "accuracy": statistics.mean(r_ok),
            "skip_ratio": statistics.mean(t.skip_ratio for t in r_tr),
            "layers_executed": statistics.mean(t.layers_executed for t in r_tr),
            "distinct_routes": len({tuple(t.route) for t in r_tr}),
            "layer_run_rate": [statistics.mean(t.route[i] for t in r_tr) for i in range(L)],
        },
        "speedup_bs1": med["bs1"]["dense"] / med["bs1"]["auto"],
        "speedup_bs16": med["bs16"]["dense"] / med["bs16"]["auto"],
        "ideal_speedup": ideal,
        "ideal_speedup_layers": ideal_layers,
        "timing": {
            "n_examples": len(tq), "repeats": repeats, "distinct_routes_in_timed_set": len(routes16),
            "bs1_seconds": bs1, "bs16_seconds": bs16,
            "bs1_examples_per_s": {r: len(tq) / s for r, s in med["bs1"].items()},
            "bs16_examples_per_s": {r: len(tq) / s for r, s in med["bs16"].items()},
            # each path generates its own full answer; answers of different lengths cost differently
            "mean_new_tokens": {"auto": statistics.mean(t.new_tokens for t in r_tr[:timing_n]),
                                "dense": statistics.mean(t.new_tokens for t in d_tr[:timing_n])},
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
    results["speedup_bs1_fraction_of_ideal"] = results["speedup_bs1"] / ideal
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    return results


def markdown(r: dict) -> str:
    lines = [
        f"# RoE benchmark ({r['model']}, {r['device']}, {r['dtype']}, {r['n_questions']} test questions"
        f"{', quick' if r['quick'] else ''}, router threshold {r['threshold']:g})", "",
        "| | dense | RoE |", "|---|---|---|",
        f"| accuracy (exact match) | {r['dense']['accuracy']:.3f} | {r['roe']['accuracy']:.3f} |",
        f"| layers executed (mean of {r['num_layers']}) | {r['num_layers']} | {r['roe']['layers_executed']:.2f} |",
        f"| skip ratio | 0 | {r['roe']['skip_ratio']:.3f} |",
        f"| distinct routes | 1 | {r['roe']['distinct_routes']} |",
        f"| examples/s, batch 1 | {r['timing']['bs1_examples_per_s']['dense']:.2f} | {r['timing']['bs1_examples_per_s']['auto']:.2f} |",
        f"| examples/s, batch 16 (mixed routes) | {r['timing']['bs16_examples_per_s']['dense']:.2f} | {r['timing']['bs16_examples_per_s']['auto']:.2f} |",
        "", f"speedup_bs1 = **{r['speedup_bs1']:.3f}**, speedup_bs16 = **{r['speedup_bs16']:.3f}**, "
        f"ideal_speedup = {r['ideal_speedup']:.3f} (layers only: {r['ideal_speedup_layers']:.3f}); "
        f"bs1 reaches {100 * r['speedup_bs1_fraction_of_ideal']:.0f}% of ideal. Mean answer length in the timed set: "
        f"RoE {r['timing']['mean_new_tokens']['auto']:.1f}, dense {r['timing']['mean_new_tokens']['dense']:.1f} tokens.", "",
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
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--roe", default=None)
    ap.add_argument("--n", type=int, default=1008, help="test questions (fixed seed)")
    ap.add_argument("--quick", action="store_true", help="24 questions, 8 timed, fewer repeats: < 60 s on 2 cores")
    ap.add_argument("--out", default="bench")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timing-n", type=int, default=48)
    ap.add_argument("--shifted-n", type=int, default=400, help="questions of the shifted split (0: none)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="run a layer iff p_run > this (default: the RoE parts' own, roe_config.json)")
    args = ap.parse_args(argv)
    r = run(args.model, args.roe, args.n, args.quick, args.out, args.device, args.max_new_tokens,
            args.repeats, args.timing_n, threshold=args.threshold, shifted_n=args.shifted_n)
    print(markdown(r))


if __name__ == "__main__":
    main()
