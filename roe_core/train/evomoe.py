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

from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset

from ..runtime.conversation import ConversationEncoder
from ..systems.evomoe import WEIGHTS_NAME, EvoMoEModel
from ..systems.moe_llava import moe_lm_loss
from .loop import LoopConfig, cosine_with_warmup, fit

STAGES = ("evolve", "router")


@dataclass
class EvoTrainConfig:
    stage: str = "evolve"
    steps: int = 300
    batch_size: int = 8
    lr: float = 5e-4
    warmup: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 100
    log_every: int = 10
    bf16: bool = False


class EvoObjective:
    """One EvoMoE stage for the shared loop."""

    def __init__(self, model: EvoMoEModel, cfg: EvoTrainConfig):
        if cfg.stage not in STAGES:
            raise ValueError(f"EvoMoE's stage must be one of {STAGES}, not {cfg.stage!r}")
        self.cfg = cfg
        self.desc = f"EvoMoE {cfg.stage}"
        model.set_evolving(cfg.stage == "evolve")
        self.params = model.expert0_parameters() if cfg.stage == "evolve" else model.router_parameters()
        self.last_betas: list[list[float]] = []

    def param_groups(self, model: EvoMoEModel) -> list[dict]:
        return [{"params": self.params, "lr": self.cfg.lr}]

    def set_trainable(self, model: EvoMoEModel, step: int) -> None:
        if step == 0 or not self.params[0].requires_grad:
            model.requires_grad_(False)
            for p in self.params:
                p.requires_grad_(True)

    def lr_factor(self, step: int) -> float:
        return cosine_with_warmup(step, self.cfg.steps, self.cfg.warmup)

    def loss(self, model: EvoMoEModel, batch, step: int) -> dict[str, Tensor]:
        return moe_lm_loss(model, batch)

    def after_step(self, model: EvoMoEModel, step: int) -> None:
        if self.cfg.stage == "evolve":
            self.last_betas = model.evolve()

    def row(self, step: int) -> dict:
        if self.cfg.stage == "evolve" and self.last_betas:
            n = len(self.last_betas)
            return {f"beta_{k + 2}": sum(b[k] for b in self.last_betas) / n for k in range(len(self.last_betas[0]))}
        return {}

    def save_parts(self, model: EvoMoEModel, out: Path) -> None:
        model.save_moe(out)

    def load_parts(self, model: EvoMoEModel, out: Path) -> None:
        model.load_state_dict(load_file(str(out / WEIGHTS_NAME)), strict=False)

    def base_tensors(self, model: EvoMoEModel) -> list[str]:
        return []


def train_evomoe(model: EvoMoEModel, encoder: ConversationEncoder, dataset: Dataset, cfg: EvoTrainConfig,
                 out: str | Path, resume: bool = False, progress: bool = True) -> list[dict]:
    """Trains one EvoMoE stage in place; returns its learning curve. The evolve stage's RNG for beta is
    the model's (seeded), so a resumed run draws different betas than an uninterrupted one."""
    model.config.extra.setdefault("training", {})[cfg.stage] = asdict(cfg)
    model.rng.seed(cfg.seed)
    loop = LoopConfig(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, max_grad_norm=cfg.max_grad_norm,
                      weight_decay=cfg.weight_decay, save_every=cfg.save_every, log_every=cfg.log_every,
                      bf16=cfg.bf16)
    try:
        return fit(model, EvoObjective(model, cfg), encoder, dataset, loop, out, resume, progress,
                   record={"evomoe": asdict(cfg)})
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
    for f in EvoTrainConfig.__dataclass_fields__.values():
        if f.name == "bf16":
            ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
        elif f.name == "stage":
            ap.add_argument("--stage", choices=STAGES, default="evolve")
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    cfg = EvoTrainConfig(**{k: getattr(args, k) for k in EvoTrainConfig.__dataclass_fields__})

    from ..systems.pipeline import Pipeline, load_base
    from .loop import LlavaJsonDataset
    loaded = load_base(args.model, "auto", "float32")
    if args.parts:
        model = EvoMoEModel.from_moe_folder(loaded.base, args.parts)   # experts frozen: deltas merged
    else:
        model = EvoMoEModel(loaded.base, base_model=args.model, expert_delta_rank=args.expert_delta_rank)
    model.config.extra.update(train_data=str(args.data))
    train_evomoe(model, Pipeline.make_encoder(loaded), LlavaJsonDataset(args.data, args.images), cfg, args.out,
                 resume=args.resume)
    print(f"saved EvoMoE parts ({cfg.stage} stage) to {args.out}")
