"""Training RoE (ROE_METHOD.md): three stages, soft mixing, annealed routers, the sparsity hinge.

    python -m roe_core.train --model embedded --data data/scenes/train.json --images data/scenes/images \
        --out runs/roe --steps 600 --batch-size 8 --bf16
    accelerate launch --config_file configs/fsdp8.yaml -m roe_core.train ...   # 8 GPUs (docs/distributed.md)

| stage | steps      | routing weights                                   | trained                      |
| 0     | 0-30%      | random hard routes, P(skip) = rho                 | adapters                     |
| 1     | 30-50%     | softmax((logits + [b, 0]) / T), T and b annealed  | routers, routing tokens, adapters |
| 2     | 50-100%    | b = 0, T keeps decaying to ~0.01                  | + backbone at a lower LR     |

With `hard_routes` (the default) stage 2's forward takes the hard route inference will take (skip iff
p_skip >= 0.5) and the annealed softmax only carries the gradient (straight-through). Soft mixing
lets the hinge be met by p_skip ~ 0.45 on every layer, which inference rounds to "run": on the
embedded model that collapsed the skip ratio from 0.34 (soft) to 0.05 (hard).

Checkpoints (every --save-every steps and at the end) are safetensors + JSON only, in --out:
roe_config.json + roe.safetensors (the RoE parts), backbone.safetensors (when the backbone trains),
optimizer.safetensors + trainer_state.json (to resume with --resume).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..runtime.conversation import ConversationEncoder
from ..runtime.weights import load_tensors
from ..systems.roe import RoEModel, layout_batch
from .loop import (LlavaJsonDataset, LoopConfig, add_config_args, config_from_args, fit, layer_modules,
                   named_params, train_device)


@dataclass
class TrainConfig(LoopConfig):
    lr: float = 4e-4                 # RoE parts (release: 4e-4)
    backbone_lr: float = 2e-6        # stage 2 backbone (release: 2e-6); 0 keeps it frozen
    backbone: str = "language_model"  # what "backbone" means: language_model | lora | none
    rho: float = 0.3                 # target skip ratio
    sparsity_weight: float = 1.0     # lambda
    stage1_start: float = 0.3
    stage2_start: float = 0.5
    t0: float = 10.0                 # initial router temperature
    anneal_every: float = 0.005      # fraction of training between two annealing steps
    t_decay: float = 0.95
    b_decay: float = 0.85
    hard_routes: bool = True         # stage 2: hard forward, straight-through gradient (see the docstring)
    routers_only: bool = False       # train only routers + routing tokens (refining trained parts)
    per_turn_sparsity: bool = False  # the hinge per turn (roe_loss's per_turn) instead of per sample
    per_turn_ce: bool = False        # CE_i = mean of the turns' CEs (roe_loss's per_turn_ce), not of all tokens
    rho_max: float = -1.0            # > rho: easy samples' hinge target rises towards it (roe_loss); -1: the method's rho
    distill_weight: float = 0.0      # > 0: + this x KL(dense || routed) on answer tokens (roe_loss)


class RouteSchedule:
    """Routing weights of each stage. w_skip(logits, step) -> (B, T) skip weight per turn."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.b0 = 1.0 - math.sqrt(2.0 * cfg.rho)   # P(u_skip > u_run + b0) = (1 - b0)^2 / 2 = rho

    def stage(self, step: int) -> int:
        f = step / max(1, self.cfg.steps)
        return 0 if f < self.cfg.stage1_start else (1 if f < self.cfg.stage2_start else 2)

    def anneal_count(self, step: int) -> int:
        start = self.cfg.stage1_start * self.cfg.steps
        return max(0, int((step - start) // max(1e-9, self.cfg.anneal_every * self.cfg.steps)))

    def temperature(self, step: int) -> float:
        return self.cfg.t0 * self.cfg.t_decay ** self.anneal_count(step)

    def bias(self, step: int) -> float:
        s = self.stage(step)
        return self.b0 if s == 0 else (self.b0 * self.cfg.b_decay ** self.anneal_count(step) if s == 1 else 0.0)

    def weights(self, logits: Tensor, step: int) -> Tensor:
        if self.stage(step) == 0:   # router bypassed: random hard routes
            u = torch.rand(logits.shape, device=logits.device)
            return (u[..., 1] > u[..., 0] + self.b0).to(logits.dtype)
        bias = torch.tensor([self.bias(step), 0.0], device=logits.device, dtype=torch.float32)
        soft = ((logits.float() + bias) / self.temperature(step)).softmax(-1)[..., 1]
        if self.stage(step) == 2 and self.cfg.hard_routes:
            hard = (soft >= 0.5).float()               # the inference rule: run iff p_run > 0.5
            soft = hard + soft - soft.detach()         # value: the hard route; gradient: the softmax
        return soft.to(logits.dtype)


def roe_loss(model: RoEModel, batch, w_skip_fn, rho: float, lam: float, per_turn: bool = False,
             per_turn_ce: bool = False, rho_max: float | None = None, distill: float = 0.0) -> dict[str, Tensor]:
    """Per sample: CE_i + lam * exp(-5 CE_i).detach() * max(0, rho - s_i), averaged over the batch.
    The LM head runs only where an answer token is predicted.

    rho_max (> rho; None or <= rho: the method): the hinge's target follows difficulty,
    rho_i = rho + (rho_max - rho) * exp(-5 CE_i).detach(). The method's hinge stops pushing once a
    sample skips rho, so every route settles at rho; here an easy sample (CE ~ 0) is pushed on
    towards rho_max while a hard one (CE >~ 1) keeps the target rho. Per turn with `per_turn`.

    distill (> 0): adds distill * KL(p_dense || p_routed), the mean over answer tokens of the KL
    between the every-layer path's next-token distribution (no gradient: an extra forward) and the
    routed path's, so the routes learn to change the answer distribution as little as they can.

    per_turn: the hinge is taken per turn instead, mean over a sample's turns of
    exp(-5 CE_it).detach() * max(0, rho - s_it), with CE_it over that turn's answer tokens and s_it
    the mean skip weight of that turn's route. Each turn has its own route (routed on its own
    question), so each route is pushed by its own question's difficulty rather than by the mean over
    the conversation (identical to the per-sample form for one-turn samples).

    per_turn_ce: CE_i itself is the mean over the sample's turns of each turn's token-mean CE, so
    every question weighs the same whatever its answer's length (a "Yes." turn is not outweighed by
    a 20-token description packed in the same conversation). Same as the method's CE for one-turn
    samples."""
    x = layout_batch(model, batch)
    h, w_skip, turn_valid = model.soft_forward(x, w_skip_fn)          # (B,S,d), (B,L,T), (B,T)
    target = batch.answer_mask[:, 1:]                                  # token p+1 is predicted at p
    b_idx, p_idx = target.nonzero(as_tuple=True)
    logits = model.base.lm_head(h[b_idx, p_idx])                       # (N, V)
    tok_ce = F.cross_entropy(logits.float(), batch.input_ids[b_idx, p_idx + 1], reduction="none")
    B = h.shape[0]
    tv = turn_valid.float()[:, None, :]                                # (B,1,T)
    if not per_turn_ce:                                                # CE_i: mean over the sample's answer tokens
        n_tok = torch.zeros(B, device=h.device).index_add_(0, b_idx, torch.ones_like(tok_ce))
        ce = torch.zeros(B, device=h.device).index_add_(0, b_idx, tok_ce) / n_tok.clamp(min=1)
    if per_turn or per_turn_ce:
        T = w_skip.shape[2]
        cell = b_idx * T + x.turn_ids[b_idx, p_idx + 1].clamp(min=0)     # (sample, turn) of each answer token
        n_bt = torch.zeros(B * T, device=h.device).index_add_(0, cell, torch.ones_like(tok_ce)).view(B, T)
        ce_bt = (torch.zeros(B * T, device=h.device).index_add_(0, cell, tok_ce).view(B, T)
                 / n_bt.clamp(min=1))
        ok = (turn_valid > 0) & (n_bt > 0)
        if per_turn_ce:
            ce = (ce_bt * ok).sum(1) / ok.sum(1).clamp(min=1)
    skip = (w_skip.float() * tv).sum((1, 2)) / (tv.sum((1, 2)) * w_skip.shape[1])   # s_i
    adaptive = rho_max is not None and rho_max > rho

    def target(ce_):   # the hinge's target skip ratio: rho, or rising towards rho_max for easy samples
        return rho + (rho_max - rho) * torch.exp(-5 * ce_).detach() if adaptive else rho

    sp = F.relu(target(ce) - skip)
    if per_turn:
        sp_bt = F.relu(target(ce_bt) - w_skip.float().mean(1)) * ok       # (B,T)
        reg = (torch.exp(-5 * ce_bt).detach() * sp_bt).sum(1) / ok.sum(1).clamp(min=1)
    else:
        reg = torch.exp(-5 * ce).detach() * sp
    loss = (ce + lam * reg).mean()
    out = {"ce": ce.mean().detach(), "sparsity": sp.mean().detach(), "skip_ratio": skip.mean().detach()}
    if distill > 0:
        with torch.no_grad():
            h_dense, _, _ = model.soft_forward(x, lambda i, lg: torch.zeros(lg.shape[:2], device=lg.device))
            logp_dense = F.log_softmax(model.base.lm_head(h_dense[b_idx, p_idx]).float(), -1)
        kl = F.kl_div(F.log_softmax(logits.float(), -1), logp_dense, log_target=True, reduction="batchmean")
        loss = loss + distill * kl
        out["kl"] = kl.detach()
    return {"loss": loss, **out}


def backbone_parameters(model: RoEModel, which: str) -> list[torch.nn.Parameter]:
    if which == "none":
        return []
    if which == "lora":
        return [p for n, p in model.base.named_parameters() if "lora_" in n]
    if which == "language_model":
        return list(model.lm.parameters())
    raise ValueError(f"backbone must be language_model, lora or none, not {which!r}")


def set_trainable(model: RoEModel, stage: int, backbone: list, routers_only: bool = False) -> None:
    """Stage 0: adapters. Stage 1: + routers and routing tokens. Stage 2: + backbone.
    routers_only: the routers and routing tokens alone, in every stage."""
    for p in model.parameters():
        p.requires_grad_(False)
    if routers_only:
        for p in model.routers.parameters():
            p.requires_grad_(True)
        model.routing_tokens.requires_grad_(True)
        return
    for p in model.adapters.parameters():
        p.requires_grad_(True)
    if stage >= 1:
        for p in model.routers.parameters():
            p.requires_grad_(True)
        model.routing_tokens.requires_grad_(True)
    if stage >= 2:
        for p in backbone:
            p.requires_grad_(True)


class RoEObjective:
    """RoE's three stages (set_trainable) and loss (roe_loss) for the shared loop. Parameters are looked
    up by name on the model given (under FSDP they are the sharded ones)."""
    desc = "RoE training"

    def __init__(self, model: RoEModel, cfg: TrainConfig):
        self.cfg = cfg
        self.schedule = RouteSchedule(cfg)
        backbone = backbone_parameters(model, cfg.backbone) if cfg.backbone_lr > 0 else []
        ids = {id(p) for p in backbone}
        self.backbone_names = [n for n, p in model.named_parameters() if id(p) in ids]

    def param_groups(self, model: RoEModel) -> list[dict]:
        return [{"params": model.roe_parameters(), "lr": self.cfg.lr},
                {"params": named_params(model, self.backbone_names), "lr": self.cfg.backbone_lr}]

    def set_trainable(self, model: RoEModel, step: int) -> None:
        stage = self.schedule.stage(step)
        backbone = named_params(model, self.backbone_names) if stage >= 2 else []
        set_trainable(model, stage, backbone, self.cfg.routers_only)

    def lr_factor(self, step: int) -> float:
        return 1.0

    def loss(self, model: RoEModel, batch, step: int) -> dict[str, Tensor]:
        c = self.cfg
        return roe_loss(model, batch, lambda i, lg: self.schedule.weights(lg, step), c.rho, c.sparsity_weight,
                        c.per_turn_sparsity, c.per_turn_ce, c.rho_max, c.distill_weight)

    def row(self, step: int) -> dict:
        s = self.schedule
        return {"stage": s.stage(step), "temperature": s.temperature(step), "bias": s.bias(step)}

    def save_parts(self, model: RoEModel, out: Path) -> None:
        model.save_roe(out)

    def load_parts(self, model: RoEModel, out: Path) -> None:
        model.load_state_dict(load_tensors(out / "roe.safetensors"), strict=False)    # plain or packed

    def part_names(self, model: RoEModel) -> list[str]:
        return list(model.roe_state_dict())

    def base_tensors(self, model: RoEModel) -> list[str]:
        return self.backbone_names

    def fsdp_units(self, model: RoEModel) -> list[list[torch.nn.Module]]:
        """One FSDP unit per decoder layer: the layer's modules with its router and adapter. The router
        reads the routing tokens through the layer's input norm before the layer runs (router_logits), so
        the unit is the layer's modules, not the layer: any of them running gathers the unit."""
        return [layer_modules(layer) + [model.routers[i], model.adapters[i]] for i, layer in enumerate(model.layers)]


def train(model: RoEModel, encoder: ConversationEncoder, dataset: Dataset, cfg: TrainConfig,
          out: str | Path, resume: bool = False, progress: bool = True) -> list[dict]:
    """Trains the RoE parts in place (the shared loop, loop.fit); returns the log (one dict every
    log_every steps). Checkpoints in `out`: roe_config.json + roe.safetensors, backbone.safetensors
    (when the backbone trains), optimizer.safetensors + trainer_state.json."""
    return fit(model, RoEObjective(model, cfg), encoder, dataset, cfg, out, resume, progress)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="embedded | tiny | local LLaVA folder | hub id")
    ap.add_argument("--roe", default=None, help="start from these RoE parts (folder); default: fresh")
    ap.add_argument("--data", required=True, help="LLaVA conversation JSON")
    ap.add_argument("--images", default=None, help="image folder (default: the JSON's folder)")
    ap.add_argument("--out", required=True, help="output folder (checkpoints, train_log.jsonl)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    add_config_args(ap, TrainConfig, {
        "routers_only": "train only the routers and routing tokens (e.g. refining --roe parts)",
        "per_turn_sparsity": "the sparsity hinge per turn, weighted by that turn's CE",
        "per_turn_ce": "each turn's CE weighs the same in the loss, whatever its answer's length"}, skip=("hard_routes",))
    ap.add_argument("--soft-routes", dest="hard_routes", action="store_false",
                    help="stage 2 mixes both paths softly instead of taking the hard route")
    args = ap.parse_args(argv)
    cfg = config_from_args(TrainConfig, args)

    from ..systems.roe import RoEPipeline
    pipe = RoEPipeline.load(args.model, roe=args.roe, device=train_device(), dtype="float32", fresh=True)
    pipe.model.config.base_model = args.model
    pipe.model.config.extra.update(train_data=str(args.data), train_steps=cfg.steps, rho=cfg.rho)
    dataset = LlavaJsonDataset(args.data, args.images)
    train(pipe.model, pipe.encoder, dataset, cfg, args.out, resume=args.resume)
    print(f"saved RoE parts to {args.out}")


if __name__ == "__main__":
    main()
