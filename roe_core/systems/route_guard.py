"""A guard for RoE's routers: run a layer whenever the router's input does not look like training.

A router is a linear map of the two routing tokens (after the layer's input norm); on wordings or images
unlike its training inputs its run/skip logits are extrapolations. The guard keeps, per layer, the mean
and variance of that input over training examples, and at inference runs layer i for an example whose
input is further than `tau` from them (mean over features of the squared z-score; about 1 for a typical
training input). tau is set as a quantile of the training examples' own distances, chosen on val.

    guard = RouteGuard.fit(model, batches_of_decoder_inputs)          # statistics over training inputs
    guard.tau = guard.quantile_tau(0.99)                              # 1% of training inputs trip it
    model.guard = guard                                               # decide() now consults it
    guard.save(folder); RouteGuard.load(folder)                       # guard.safetensors + its tau
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..runtime.weights import packed_path, read_metadata, read_raw, weights_exist

GUARD_NAME = "guard.safetensors"


class RouteGuard:
    def __init__(self, mean: Tensor, var: Tensor, train_dist: Tensor, tau: float | None = None):
        self.mean, self.var = mean.float(), var.float().clamp(min=1e-6)       # (L, 2d)
        self.train_dist = train_dist.float()                                 # (N, L): the training inputs' own
        self.tau = tau

    @staticmethod
    def features(model, i: int, h: Tensor, num_routing: int) -> Tensor:
        """What router i reads: both routing tokens after layer i's input norm, concatenated. (B, 2d)"""
        rt = model.layers[i].input_layernorm(h[:, :num_routing])
        return torch.cat([rt[:, 0], rt[:, -1]], dim=-1).float()

    def distance(self, i: int, x: Tensor) -> Tensor:
        """(B,) mean squared z-score of router i's inputs x (B, 2d)."""
        if self.mean.device != x.device:            # once: the statistics follow the model to its device
            self.mean, self.var = self.mean.to(x.device), self.var.to(x.device)
        return ((x - self.mean[i]) ** 2 / self.var[i]).mean(-1)

    def trips(self, i: int, x: Tensor) -> Tensor:
        """(B,) bool: layer i must run (the input is further than tau)."""
        if self.tau is None:
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return self.distance(i, x) > self.tau

    def quantile_tau(self, q: float) -> float:
        """The tau that a fraction 1 - q of training inputs exceed, pooled over layers."""
        if not 0.0 < q < 1.0:
            raise ValueError(f"q must be in (0, 1), not {q}")
        return float(torch.quantile(self.train_dist.flatten(), q))

    @classmethod
    @torch.no_grad()
    def fit(cls, model, inputs) -> "RouteGuard":
        """Statistics of each router's input over `inputs` (an iterable of DecoderInputs), with the routes
        the routers take on them (the inputs a router sees at inference)."""
        from .roe import prefill
        feats: list[list[Tensor]] = [[] for _ in range(model.num_layers)]
        old, model.guard = model.guard, None
        model.guard_recorder = feats
        try:
            for x in inputs:
                prefill(model, x, "auto")
        finally:
            model.guard_recorder, model.guard = None, old
        if not feats[0]:
            raise ValueError("no inputs to fit the guard on")
        X = [torch.cat(f) for f in feats]                                   # L x (N, 2d)
        mean = torch.stack([x.mean(0) for x in X])
        var = torch.stack([x.var(0, unbiased=False) for x in X])
        guard = cls(mean, var, torch.zeros(0))
        guard.train_dist = torch.stack([guard.distance(i, X[i]) for i in range(len(X))], 1)
        return guard

    def save(self, folder: str | Path) -> None:
        save_file({"mean": self.mean.cpu().contiguous(), "var": self.var.cpu().contiguous(),
                   "train_dist": self.train_dist.cpu().contiguous()},
                  str(Path(folder, GUARD_NAME)), metadata={"tau": json.dumps(self.tau)})
        packed_path(Path(folder, GUARD_NAME)).unlink(missing_ok=True)    # a packed copy of an older guard: stale

    @classmethod
    def load(cls, folder: str | Path) -> "RouteGuard | None":
        """The folder's guard, or None when it has none."""
        path = Path(folder, GUARD_NAME)
        if not weights_exist(path):
            return None
        tau = json.loads(read_metadata(path).get("tau", "null"))
        t = read_raw(path)
        return cls(t["mean"], t["var"], t["train_dist"], tau)
