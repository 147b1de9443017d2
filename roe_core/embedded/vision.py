"""The vision stage: the CLIP ViT alone (no decoder) on scene targets, on `train.loop.fit`.

fit batches (cached pixels, index) items with data.VisionCollator, which stands in for the
conversation encoder (there is no text): a batch is the pixels and their vision_targets rows.
VisionObjective trains every parameter of VisionPretrainer (ViT + heads) at one LR, warm-up over 30
steps then a cosine to 0, AdamW with weight decay 0.05. The tower ships (bf16) into
assets/embedded/vision_tower.safetensors at every checkpoint; the heads live only in the checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime.loading import cpu_bf16_is_fast, train_autocast
from ..runtime.weights import read_raw, weights_exist
from ..train.loop import LoopConfig, fit
from .base import (ASSETS, MAX_COUNT, RUNS, VISION_FILE, _save_half, vision_config, vision_spec, write_state,
                   write_vision_spec)
from .data import PixelTargets, VisionCollator, vision_pixels, vision_targets
from .fitting import CurveMirror, resume_point


class VisionPretrainer(nn.Module):
    """The CLIP ViT + small heads on its last hidden states (what LLaVA reads, CLS dropped):
    per 4x4 cell (2x2 patches): shape / colour / size classes and the centre offset; per patch: the
    classes of the object it shows (dense supervision a small ViT learns from far faster); global
    counts."""

    def __init__(self):
        super().__init__()
        from transformers import CLIPVisionModel
        from ..scenes import COLOURS, SHAPES, SIZES
        self.vit = CLIPVisionModel(vision_config())   # the same module (and state dict keys) as LLaVA's vision_tower
        d = vision_spec()["clip"]["hidden_size"]
        self.n_shape, self.n_colour, self.n_size = len(SHAPES) + 1, len(COLOURS) + 1, len(SIZES) + 1
        self.cell = nn.Sequential(nn.LayerNorm(4 * d), nn.Linear(4 * d, self.n_shape + self.n_colour + self.n_size + 2))
        self.count = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, (len(SHAPES) + len(COLOURS) + len(SIZES) + 1) * MAX_COUNT))
        self.patch = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, self.n_shape + self.n_colour + self.n_size))

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        from ..scenes import GRID
        h = self.vit(pixel_values=pixel_values).last_hidden_state[:, 1:]      # (B, 64, d) = hidden_states[-1]
        B, N, d = h.shape
        g = int(math.isqrt(N))
        k = g // GRID
        cells = h.view(B, GRID, k, GRID, k, d).permute(0, 1, 3, 2, 4, 5).reshape(B, GRID * GRID, k * k * d)
        c = self.cell(cells)
        counts = self.count(h.mean(1)).view(B, -1, MAX_COUNT)
        return {"cell": c, "counts": counts, "patch": self.patch(h)}

    def losses(self, out, t) -> dict[str, Tensor]:
        c = out["cell"].float()
        a, b, cc = self.n_shape, self.n_shape + self.n_colour, self.n_shape + self.n_colour + self.n_size
        ls = F.cross_entropy(c[..., :a].flatten(0, 1), t["cell_shape"].flatten())
        lc = F.cross_entropy(c[..., a:b].flatten(0, 1), t["cell_colour"].flatten())
        lz = F.cross_entropy(c[..., b:cc].flatten(0, 1), t["cell_size"].flatten())
        occ = (t["cell_shape"] > 0).float()[..., None]                   # ignored cells (-100) excluded
        lxy = ((c[..., cc:].sigmoid() - t["cell_xy"]) ** 2 * occ).sum() / occ.sum().clamp(min=1)
        pt = out["patch"].float()
        lpatch = (F.cross_entropy(pt[..., :a].flatten(0, 1), t["patch_shape"].flatten())
                  + F.cross_entropy(pt[..., a:b].flatten(0, 1), t["patch_colour"].flatten())
                  + F.cross_entropy(pt[..., b:cc].flatten(0, 1), t["patch_size"].flatten()))
        counts_t = torch.cat([t["shape_counts"], t["colour_counts"], t["size_counts"], t["n_objects"][:, None]], 1)
        lcount = F.cross_entropy(out["counts"].float().flatten(0, 1), counts_t.flatten())
        with torch.no_grad():
            right = ((c[..., :a].argmax(-1) == t["cell_shape"]) & (c[..., a:b].argmax(-1) == t["cell_colour"])
                     & (c[..., b:cc].argmax(-1) == t["cell_size"])).float()
            valid = t["cell_shape"] >= 0
            cell_ok = (right * valid).sum() / valid.sum().clamp(min=1)
            occ_ok = (right * occ[..., 0]).sum() / occ.sum().clamp(min=1)
            count_ok = (out["counts"].argmax(-1) == counts_t).float().mean()
        return {"loss": ls + lc + lz + 10 * lxy + lcount + lpatch, "shape": ls.detach(), "colour": lc.detach(),
                "size": lz.detach(), "xy": lxy.detach(), "count": lcount.detach(), "patch": lpatch.detach(),
                "cell_acc": cell_ok, "object_acc": occ_ok, "count_acc": count_ok}


@dataclass
class VisionConfig(LoopConfig):
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30


class VisionObjective:
    """VisionPretrainer's losses for train.loop.fit. A learning-curve row holds the step's losses and
    accuracies and its LR; every 5th row (and the last) also validate()'s fields."""
    desc = "vision"

    def __init__(self, model: VisionPretrainer, cfg: VisionConfig, validate: Callable[[], dict] | None = None,
                 ship: Callable[[int], None] | None = None):
        self.cfg, self.validate, self.ship = cfg, validate, ship
        self.names = [n for n, _ in model.named_parameters()]
        self.done = 0

    def param_groups(self, model: VisionPretrainer) -> list[dict]:
        return [{"params": list(model.parameters()), "lr": self.cfg.lr}]

    def set_trainable(self, model: VisionPretrainer, step: int) -> None:
        pass                          # every parameter trains

    def lr_factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / self.cfg.steps))

    def loss(self, model: VisionPretrainer, batch, step: int) -> dict[str, Tensor]:
        return model.losses(model(batch.pixel_values), batch.targets)

    def after_step(self, model: VisionPretrainer, step: int) -> None:
        self.done = step + 1

    def row(self, step: int) -> dict:
        n, c = step + 1, self.cfg
        row = {"lr": c.lr * self.lr_factor(step)}
        if self.validate is not None and (n % (c.log_every * 5) == 0 or n == c.steps):
            row.update({f"val_{k}": v for k, v in self.validate().items()})
        return row

    def save_parts(self, model: VisionPretrainer, out) -> None:
        if self.ship is not None:
            self.ship(self.done)

    def load_parts(self, model: VisionPretrainer, out) -> None:
        pass                          # ViT + heads are all in backbone.safetensors

    def base_tensors(self, model: VisionPretrainer) -> list[str]:
        return self.names


def stage_vision(args) -> None:
    torch.manual_seed(args.seed)
    if not args.resume and args.vision_tower:
        write_vision_spec(args.vision_tower)     # a fresh tower of that kind
    if args.augment and not vision_spec()["pad_to_square"]:
        # wide and tall renders would be centre-cropped, and the targets assume the padded frame
        raise SystemExit(f"--augment needs a tower that pads to a square (vit128), not {vision_spec()['name']}")
    pv, scenes, aspects = vision_pixels(args.n_train, augment=args.augment)
    t = vision_targets(scenes, aspects)
    val_sets = {"": vision_pixels(1000, "val")}   # plain renders (the figure reported before augmenting)
    if args.augment:
        val_sets["aug_"] = vision_pixels(1000, "val", augment=True)
    val_sets = {k: (v[0], vision_targets(v[1], v[2])) for k, v in val_sets.items()}
    model = VisionPretrainer()
    out = RUNS / "vision"
    start, from_shipped = resume_point(out, "vision") if args.resume else (0, False)
    if from_shipped and weights_exist(ASSETS / VISION_FILE):   # no checkpoint: the shipped tower, fresh heads
        model.vit.load_state_dict({k: v.float() for k, v in read_raw(ASSETS / VISION_FILE).items()}, strict=False)
    cfg = VisionConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or 1e-3, seed=args.seed,
                       save_every=args.save_every, log_every=args.log_every, bf16=cpu_bf16_is_fast())
    curve = CurveMirror("vision", out, args.resume)

    def validate() -> dict:
        was_training = model.training
        model.eval()
        res = {}
        for prefix, (vpv, vt) in val_sets.items():
            rows = []
            dev = next(model.parameters()).device
            with torch.no_grad(), train_autocast():
                for i in range(0, len(vpv), 250):
                    idx = torch.arange(i, min(i + 250, len(vpv)))
                    t_idx = {k: v[idx].to(dev) for k, v in vt.items()}
                    rows.append(model.losses(model(vpv[idx].float().to(dev)), t_idx))
            res.update({prefix + k: float(sum(r[k] for r in rows) / len(rows))
                        for k in ("loss", "cell_acc", "object_acc", "count_acc", "xy")})
        model.train(was_training)
        return res

    def ship(step: int, **info) -> None:
        _save_half(model.vit.state_dict(), ASSETS / VISION_FILE)
        write_state("vision", step=step, target_steps=args.steps, done=step >= args.steps, **info)
        curve.sync()

    objective = VisionObjective(model, cfg, validate, ship)
    fit(model, objective, VisionCollator(t), PixelTargets(pv), cfg, out, resume=args.resume)
    ev = validate()
    write_state("vision", step=max(objective.done, start), target_steps=args.steps, done=True, val=ev)
    curve.sync()
    print("vision val:", ev)
