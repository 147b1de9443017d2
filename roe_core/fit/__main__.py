"""python -m roe_core.fit: RoE's parts and the fixed path's fitted to a model's own dense answers.

    python -m roe_core.fit --model embedded --scenes 1000 --out runs/fit
    python -m roe_core.fit --model path/to/llava --llava-json data.json --image-folder images --out runs/fit
    python -m roe_core.fit --model path/to/llava --images photos/ --questions questions.txt --out runs/fit

Then: python app.py --model <model> --roe runs/fit/roe --static runs/fit/static (or the bench's --fitted).
A rerun with the same inputs and --out continues from out/cache/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .core import EVIDENCE, FitConfig, fit_parts
from .inputs import folder_inputs, llava_inputs, scene_inputs


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m roe_core.fit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="a registered source (embedded, tiny), a local LLaVA folder "
                                                        "or a hub id")
    src = ap.add_argument_group("inputs (one of)")
    src.add_argument("--scenes", type=int, default=None, help="this many built-in scene questions")
    src.add_argument("--split", default="train", choices=("train", "val", "test"), help="--scenes: the split")
    src.add_argument("--start", type=int, default=0, help="--scenes: first question of the split")
    src.add_argument("--llava-json", default=None, help="a LLaVA JSON file (its human turns are the questions)")
    src.add_argument("--image-folder", default=None, help="--llava-json: where its images are")
    src.add_argument("--images", default=None, help="a folder of images, each asked every question of --questions")
    src.add_argument("--questions", default=None, help="--images: a text file, one question a line")
    src.add_argument("--limit", type=int, default=None, help="at most this many inputs")
    ap.add_argument("--out", required=True, help="writes out/roe, out/static, out/fit.json (and out/cache)")
    ap.add_argument("--n-val", type=int, default=96, help="held-out inputs the threshold is calibrated on")
    ap.add_argument("--n-evidence", type=int, default=384, help="fit inputs the per-layer evidence is measured on")
    ap.add_argument("--target-agreement", type=float, default=0.9,
                    help="the threshold: the most skipping at which routed answers equal dense on this share of "
                         "the held-out inputs")
    ap.add_argument("--target-layers", type=float, default=0.0,
                    help="instead of --target-agreement: the threshold whose mean layers run on the held-out inputs "
                         "is nearest this (e.g. another system's, for a comparison at equal cost)")
    ap.add_argument("--calib-steps", type=int, default=6, help="bisection steps of the threshold search")
    ap.add_argument("--evidence", choices=EVIDENCE, default="taylor", help="what the routers learn to predict")
    ap.add_argument("--compare", default="", help="also calibrate routers on these evidence kinds (and 'fixed'), "
                                                  "comma-separated: the evidence study in fit.json")
    ap.add_argument("--rank", type=int, default=0, help="stand-in rank r (adapters of rank 2r); 0: hidden // 8")
    ap.add_argument("--ridge", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--export-answers", action="store_true",
                    help="also out/own_answers/ (data.json + images): the fit inputs with the dense answers, for a "
                         "short refinement: python -m roe_core.train --system static|roe --data out/own_answers/data.json")
    ap.add_argument("--no-cache", action="store_true", help="start afresh (ignore and do not write out/cache)")
    return ap


def read_inputs(args) -> list:
    given = [args.scenes is not None, args.llava_json is not None, args.images is not None]
    if sum(given) != 1:
        raise SystemExit("give exactly one of --scenes N, --llava-json F [--image-folder D], --images D --questions F")
    if args.scenes is not None:
        n = args.scenes if args.limit is None else min(args.scenes, args.limit)
        return scene_inputs(n, args.split, args.start)
    if args.llava_json is not None:
        return llava_inputs(args.llava_json, args.image_folder, args.limit)
    if not args.questions:
        raise SystemExit("--images needs --questions (a text file, one question a line)")
    return folder_inputs(args.images, args.questions, args.limit, args.seed)


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ROE_THREADS", str(torch.get_num_threads()))))
    from tqdm.auto import tqdm

    from ..runtime.sources import load_base
    inputs = read_inputs(args)
    loaded = load_base(args.model, args.device, args.dtype, args.seed)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            for b in bars.values():
                b.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="input" if "threshold" not in stage else "step")
        bar.n = done
        bar.refresh()

    cfg = FitConfig(n_val=args.n_val, n_evidence=args.n_evidence, target_agreement=args.target_agreement,
                    evidence=args.evidence, rank=args.rank, target_layers=args.target_layers,
                    calib_steps=args.calib_steps, ridge=args.ridge, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, cache=not args.no_cache,
                    compare=tuple(x.strip() for x in args.compare.split(",") if x.strip()), base_model=args.model,
                    export_answers=args.export_answers)
    summary = fit_parts(loaded, inputs, args.out, cfg, progress)
    for b in bars.values():
        b.close()
    summary["command"] = "python -m roe_core.fit " + " ".join(argv if argv is not None else sys.argv[1:])
    from pathlib import Path
    from .core import SUMMARY
    Path(args.out, SUMMARY).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("n_inputs", "n_fit", "n_val", "evidence", "threshold", "val_agreement",
                                              "val_mean_layers", "val_std_layers", "static_k", "seconds",
                                              "cpu_seconds")}, indent=1))
    return summary


if __name__ == "__main__":
    main()
