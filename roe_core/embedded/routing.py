"""The routing systems' stages over the shipped dense model, each on its trainer in roe_core.train
(all on `train.loop.fit`), and how their parts ship into assets/embedded/<parts folder>/ (the folder
is the system's `parts_folder` in roe_core.systems.registry).

    roe            RoE's three stages on fresh parts (+ the decoder's LoRA in stage 2)
    refine         stage 2 continued from the shipped RoE parts, T = 1, lambda 1: routes per example
    moe-llava      MoE-LLaVA's MoE-tuning from the dense model
    evomoe-evolve  EvoMoE: FFN_1 trains, experts 2..4 evolve along it
    evomoe-router  EvoMoE: the DTRs alone, experts frozen
    static         the fixed-path baseline: RoE's mean number of skipped layers, the same for every input
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ..runtime.loading import cpu_bf16_is_fast
from ..runtime.weights import weights_exist
from ..systems import registry
from .base import ASSETS, LOGS, LORA_DIR, RUNS, TRAINED_ON, add_lora, build_base, make_encoder, save_lora, write_state
from .calibrate import evaluate_routes
from .data import roe_data
from .fitting import log_row

MOE_DELTA_RANK = 16        # each tuned FFN = its upcycled weights + rank-16 deltas (the size budget: README)


def parts_dir(system: str) -> Path:
    """assets/embedded/<the system's parts folder>."""
    return ASSETS / registry.get(system).parts_folder


def _copy_curve(out: Path, name: str) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    if (out / "train_log.jsonl").is_file():
        shutil.copy(out / "train_log.jsonl", LOGS / f"{name}.jsonl")


def _data_record(args) -> str:
    wide = ", reworded and restyled (scenes.grammar, --wide-data)" if args.wide_data else ""
    return f"roe_core.scenes train split, scenes {args.roe_data_from}..{args.roe_data_from + args.n_roe_data - 1}{wide}"


# ----------------------------------------------------------------------------- RoE


def _routed_base(args):
    """(base, tokenizer, lora) for the RoE stages: with `--backbone lora` the decoder's LoRA stays a
    separate, trainable peft adapter (stage 2 trains it); otherwise it is merged and frozen."""
    lora = args.backbone == "lora" and args.backbone_lr > 0
    base, tok = build_base(None, merge_lora=not lora)
    if lora:
        add_lora(base, ASSETS / LORA_DIR)
    return base, tok, lora


def _stage_config(args, lora: bool, **overrides):
    from ..train import TrainConfig
    return TrainConfig(steps=args.steps, batch_size=args.batch_size,
                       backbone_lr=args.backbone_lr if lora else 0.0, backbone="lora" if lora else "none",
                       rho=args.rho, sparsity_weight=args.sparsity_weight, save_every=args.save_every,
                       log_every=args.log_every, bf16=cpu_bf16_is_fast(), seed=args.seed,
                       per_turn_sparsity=args.per_turn_sparsity, per_turn_ce=args.per_turn_ce,
                       rho_max=args.rho_max, distill_weight=args.distill, **overrides)


def _ship_routed(stage: str, model, base, cfg, out: Path, lora: bool, t0: float, args) -> None:
    """Copies a routed stage's result into assets/embedded (RoE parts in bf16, the LoRA when it
    trained: dense and routed answers share it), its learning curve into logs/, and records its
    route quality on val (exact match and skip ratio, routed and dense)."""
    _copy_curve(out, stage)
    ship = parts_dir("roe")
    ship.mkdir(parents=True, exist_ok=True)
    model.save_roe(ship, ship=True)      # bf16
    if lora:
        save_lora(base)
    info = {"step": args.steps, "target_steps": args.steps, "done": True, "minutes": (time.perf_counter() - t0) / 60,
            **{k: getattr(cfg, k) for k in ("lr", "backbone", "backbone_lr", "rho", "sparsity_weight", "hard_routes")}}
    ev = evaluate_routes(str(ship), args.final_eval_n)
    info.update(ev)
    write_state(stage, **info)
    log_row(f"{stage}_eval", ev)
    print(f"{stage}:", json.dumps(ev, indent=1))


def _config_record(cfg) -> dict:
    return {k: v for k, v in cfg.__dict__.items() if k not in ("save_every", "log_every")}


def stage_roe(args) -> None:
    """The three stages of roe_core.train on fresh RoE parts (+ the LoRA in stage 2)."""
    from ..systems.roe import RoEModel
    from ..train import LlavaJsonDataset, train
    js = roe_data(args.n_roe_data)
    base, tok, lora = _routed_base(args)
    torch.manual_seed(args.seed)
    model = RoEModel(base)
    model.config.base_model = "embedded"
    model.config.rho = args.rho
    cfg = _stage_config(args, lora, lr=args.lr or 4e-4, hard_routes=not args.soft_routes)
    model.config.extra.update(train_data=f"roe_core.scenes train split, first {args.n_roe_data} scenes",
                              train_steps=args.steps, trained_on=TRAINED_ON, train_config=_config_record(cfg))
    out = RUNS / "roe"
    t0 = time.perf_counter()
    train(model, make_encoder(base, tok), LlavaJsonDataset(js, js.parent / "images"), cfg, out, resume=args.resume)
    _ship_routed("roe", model, base, cfg, out, lora, t0, args)


def stage_refine(args) -> None:
    """Stage 2 continued from the shipped `roe` result, with the routers kept learning.

    The `roe` stage pushes every sample to rho with lambda 6 while T anneals to 0.01, which freezes
    the routers (p(1-p)/T vanishes): it ends with one route for every input (router outputs vary by
    ~0.01 across examples). Here T stays 1, every step takes the hard route (straight-through), and
    lambda = 1: the hinge weight exp(-5 CE_i) lets a sample the route hurts keep its layers while easy
    ones skip. Routers, routing tokens, adapters and the decoder's LoRA train together, so the
    decoder follows the routes as they spread out."""
    from ..systems.roe import RoEModel
    from ..train import LlavaJsonDataset, train
    js = roe_data(args.n_roe_data, args.roe_data_from, args.wide_data)
    base, tok, lora = _routed_base(args)
    model = RoEModel.from_roe_folder(base, parts_dir("roe"))
    model.config.extra["refine_data"] = _data_record(args)
    cfg = _stage_config(args, lora, lr=args.lr or 1e-3, stage1_start=0.0, stage2_start=0.0, t0=1.0, t_decay=1.0)
    if "refine_config" in model.config.extra:      # an earlier refine of these parts: keep its record
        model.config.extra.setdefault("earlier_refine_configs", []).append(model.config.extra["refine_config"])
    model.config.extra["refine_config"] = _config_record(cfg)
    out = RUNS / "refine"
    t0 = time.perf_counter()
    train(model, make_encoder(base, tok), LlavaJsonDataset(js, js.parent / "images"), cfg, out, resume=args.resume)
    _ship_routed("refine", model, base, cfg, out, lora, t0, args)


# ----------------------------------------------------------------------------- MoE systems


def ship_parts(model, out: Path, ship: Path) -> None:
    """A MoE system's checkpoint into assets/ with the shipping precision (systems.moe_llava.ship_keep_fp32 /
    ship_fp8: linear routers fp32, delta factors fp8 with per-row scales, the rest bf16; measured to change
    no val answer, assets/embedded/README.md)."""
    from ..runtime.weights import load_tensors
    model.load_state_dict(load_tensors(out / model.config.WEIGHTS), strict=False)
    model.save_moe(ship, ship=True)


def stage_moe_llava(args) -> None:
    """MoE-LLaVA's MoE-tuning (train.moe_llava) from the shipped dense model: the LoRA-merged decoder,
    vision tower and projector that RoE routes. The same data as the RoE parts (train split, the
    first --n-roe-data scenes, as LLaVA JSON) and batch size; --steps at least theirs."""
    from ..systems.moe_llava import MoELlavaModel
    from ..train import LlavaJsonDataset
    from ..train.moe_llava import MoETuneConfig, train_moe_llava
    folder = registry.get("moe_llava").parts_folder
    js = roe_data(args.n_roe_data, args.roe_data_from, args.wide_data)
    base, tok = build_base(None, merge_lora=True)
    torch.manual_seed(args.seed)
    model = MoELlavaModel(base, base_model="embedded", expert_delta_rank=args.delta_rank,
                          dense_delta_rank=args.delta_rank)
    cfg = MoETuneConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or 5e-4, seed=args.seed,
                        save_every=args.save_every, log_every=args.log_every, bf16=cpu_bf16_is_fast())
    model.config.extra.update(train_data=_data_record(args), trained_on=TRAINED_ON,
                              dense_base="assets/embedded (vision, align, finetune)")
    out = RUNS / folder
    t0 = time.perf_counter()
    train_moe_llava(model, make_encoder(base, tok), LlavaJsonDataset(js, js.parent / "images"), cfg, out,
                    resume=args.resume)
    _copy_curve(out, folder)
    ship_parts(model, out, parts_dir("moe_llava"))
    write_state(folder, step=args.steps, target_steps=args.steps, done=True, minutes=(time.perf_counter() - t0) / 60)


def stage_evomoe(stage: str, args) -> None:
    """EvoMoE from the shipped dense model (the LoRA-merged decoder, vision tower and projector RoE and
    MoE-LLaVA use), on the same data and batch size: `evomoe-evolve` trains FFN_1 of every MoE layer
    (rank-16 deltas) and evolves experts 2..4 along it; `evomoe-router` then trains the DTRs alone,
    experts frozen, from the evolve stage's checkpoint."""
    from ..systems.evomoe import EvoMoEModel
    from ..train import LlavaJsonDataset
    from ..train.evomoe import EvoTrainConfig, train_evomoe
    folder = registry.get("evomoe").parts_folder
    js = roe_data(args.n_roe_data, args.roe_data_from, args.wide_data)
    base, tok = build_base(None, merge_lora=True)
    torch.manual_seed(args.seed)
    which = stage.split("-")[1]
    if which == "evolve":
        model = EvoMoEModel(base, base_model="embedded", expert_delta_rank=args.delta_rank)
        model.config.extra.update(train_data=_data_record(args), trained_on=TRAINED_ON,
                                  dense_base="assets/embedded (vision, align, finetune)")
    else:
        src = RUNS / folder / "evolve"
        if not weights_exist(src / registry.get("evomoe").config_class().WEIGHTS):
            raise FileNotFoundError(f"no evolve-stage checkpoint in {src}: run `evomoe-evolve` first")
        model = EvoMoEModel.from_moe_folder(base, src)     # experts frozen from here: deltas merged
    cfg = EvoTrainConfig(stage=which, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr or (5e-4 if which == "evolve" else 1e-3), seed=args.seed,
                         save_every=args.save_every, log_every=args.log_every, bf16=cpu_bf16_is_fast())
    out = RUNS / folder / which
    t0 = time.perf_counter()
    train_evomoe(model, make_encoder(base, tok), LlavaJsonDataset(js, js.parent / "images"), cfg, out,
                 resume=args.resume)
    _copy_curve(out, f"{folder}_{which}")
    if which == "router":   # the finished system ships
        ship_parts(model, out, parts_dir("evomoe"))
    write_state(f"{folder}_{which}", step=args.steps, target_steps=args.steps, done=True,
                minutes=(time.perf_counter() - t0) / 60)


# ----------------------------------------------------------------------------- the fixed-path baseline


def roe_mean_skipped(num_layers: int) -> int:
    """The shipped RoE's mean skipped layers per answer on val at its chosen threshold (the last
    calibration, logs/calibrate.jsonl), rounded: the k a fixed path gets to match it."""
    path = LOGS / "calibrate.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: run `python -m roe_core.embedded calibrate` first, or give --skip")
    chosen = json.loads(path.read_text().splitlines()[-1])["chosen"]
    return round(chosen["skip_ratio"] * num_layers)


def stage_static(args) -> None:
    """The fixed-path baseline (train.static) on the shipped dense model (LoRA merged, frozen): k layers
    (--skip, default RoE's mean on val) chosen by --metric over the first --score-n training examples,
    their adapters started from the shipped RoE's for those layers and trained on the RoE parts' data
    with its refine's objective (CE + --distill KL to the every-layer path), --steps at least its budget."""
    from ..systems.static import StaticModel
    from ..train import LlavaJsonDataset
    from ..train.static import StaticTrainConfig, choose_layers, init_from_roe, train_static
    folder = registry.get("static").parts_folder
    js = roe_data(args.n_roe_data, args.roe_data_from, args.wide_data)
    base, tok = build_base(None, merge_lora=True)
    encoder = make_encoder(base, tok)
    dataset = LlavaJsonDataset(js, js.parent / "images")
    out = RUNS / folder
    if args.resume and (out / "static_config.json").is_file():
        model = StaticModel.from_static_folder(base, out)
    else:
        k = args.skip if args.skip is not None else roe_mean_skipped(base.config.text_config.num_hidden_layers)
        skipped, scores = choose_layers(base, encoder, dataset, k, args.metric, args.score_n)
        rank = json.loads((parts_dir("roe") / "roe_config.json").read_text())["adapter_rank"]
        model = StaticModel(base, base_model="embedded", skipped=skipped, metric=args.metric, layer_scores=scores,
                            adapter_rank=rank)
        init_from_roe(model, parts_dir("roe"))
        model.config.extra.update(train_data=_data_record(args), trained_on=TRAINED_ON, score_n=args.score_n,
                                  init_from_roe="assets/embedded/roe (the shipped RoE parts' adapters)")
        print(f"static: skipping {k} layers {skipped} ({args.metric})")
    cfg = StaticTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or 1e-3, seed=args.seed,
                            save_every=args.save_every, log_every=args.log_every, bf16=cpu_bf16_is_fast(),
                            distill=args.distill)
    t0 = time.perf_counter()
    train_static(model, encoder, dataset, cfg, out, resume=args.resume)
    _copy_curve(out, folder)
    ship = parts_dir("static")
    model.save_static(ship)
    write_state(folder, step=args.steps, target_steps=args.steps, done=True, minutes=(time.perf_counter() - t0) / 60,
                skipped=model.config.skipped, metric=model.config.metric)
