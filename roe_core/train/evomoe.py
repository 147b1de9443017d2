"""EvoMoE's two training stages after the dense model (systems/evomoe.py), on the shared loop.

    stage "evolve": only FFN_1 of each MoE layer trains (the forward is the dense model with FFN_1);
                    after every step experts 2..E follow its trajectory (EMA, beta drawn per step)
    stage "router": the experts are frozen, only the Dynamic Token-aware Routers train, on
                    CE + 0.001 x the sum over MoE layers of l_aux (top-1)

Both: cosine learning rate after a 3% warm-up; checkpoints evomoe_config.json + evomoe.safetensors
(+ optimizer.safetensors, trainer_state.json) in the stage's folder, resumable.

    python -m roe_core.train --system evomoe --stage evolve --model <llava> --data train.json --out runs/evo
    python -m roe_core.train --system evomoe --stage router --model <llava> --parts runs/evo --data ... --out runs/evo_router
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from torch.utils.data import Dataset

from ..runtime.conversation import ConversationEncoder
from ..systems.evomoe import EvoMoEModel
from .loop import LoopConfig, add_config_args, config_from_args, fit
from .moe_llava import PartsObjective

STAGES = ("evolve", "router")


@dataclass
class EvoTrainConfig(LoopConfig):
    stage: str = "evolve"
    steps: int = 300
    lr: float = 5e-4
    warmup: float = 0.03


class EvoObjective(PartsObjective):
    """One EvoMoE stage: evolve (FFN_1 trains, the others follow it after every step) or router."""

    def __init__(self, model: EvoMoEModel, cfg: EvoTrainConfig):
        if cfg.stage not in STAGES:
            raise ValueError(f"EvoMoE's stage must be one of {STAGES}, not {cfg.stage!r}")
        model.set_evolving(cfg.stage == "evolve")
        super().__init__(model, cfg, model.expert0_parameters() if cfg.stage == "evolve" else model.router_parameters())
        self.desc = f"EvoMoE {cfg.stage}"
        self.last_betas: list[list[float]] = []

    def after_step(self, model: EvoMoEModel, step: int) -> None:
        if self.cfg.stage == "evolve":
            self.last_betas = model.evolve()

    def row(self, step: int) -> dict:
        if self.cfg.stage == "evolve" and self.last_betas:
            n = len(self.last_betas)
            return {f"beta_{k + 2}": sum(b[k] for b in self.last_betas) / n for k in range(len(self.last_betas[0]))}
        return {}


def train_evomoe(model: EvoMoEModel, encoder: ConversationEncoder, dataset: Dataset, cfg: EvoTrainConfig,
                 out: str | Path, resume: bool = False, progress: bool = True) -> list[dict]:
    """Trains one EvoMoE stage in place; returns its learning curve. The evolve stage's RNG for beta is
    the model's (seeded), so a resumed run draws different betas than an uninterrupted one."""
    model.config.extra.setdefault("training", {})[cfg.stage] = asdict(cfg)
    model.rng.seed(cfg.seed)
    try:
        return fit(model, EvoObjective(model, cfg), encoder, dataset, cfg, out, resume, progress)
    finally:
        model.set_evolving(False)


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m roe_core.train --system evomoe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="embedded | tiny | local LLaVA folder | hub id (the dense model)")
    ap.add_argument("--parts", default=None, help="router stage: the evolve stage's folder")
    ap.add_argument("--data", required=True, help="LLaVA conversation JSON")
    ap.add_argument("--images", default=None, help="image folder (default: the JSON's folder)")
    ap.add_argument("--out", required=True, help="output folder (checkpoints, train_log.jsonl)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    ap.add_argument("--expert-delta-rank", type=int, default=0, help="r > 0: experts as rank-r deltas")
    ap.add_argument("--stage", choices=STAGES, default="evolve")
    add_config_args(ap, EvoTrainConfig, skip=("stage",))
    args = ap.parse_args(argv)
    cfg = config_from_args(EvoTrainConfig, args)

    from ..systems.pipeline import Pipeline, load_base
    from .loop import LlavaJsonDataset, train_device
    loaded = load_base(args.model, train_device(), "float32")
    if args.parts:
        model = EvoMoEModel.from_moe_folder(loaded.base, args.parts)   # experts frozen: deltas merged
    else:
        model = EvoMoEModel(loaded.base, base_model=args.model, expert_delta_rank=args.expert_delta_rank)
    model.config.extra.update(train_data=str(args.data))
    train_evomoe(model, Pipeline.make_encoder(loaded), LlavaJsonDataset(args.data, args.images), cfg, args.out,
                 resume=args.resume)
    print(f"saved EvoMoE parts ({cfg.stage} stage) to {args.out}")
