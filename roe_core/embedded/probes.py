"""Research probes of the embedded decoder (`python -m roe_core.embedded skip-probe [--per-layer]`):
how much answer cross-entropy skipping layers costs, with and without RoE's adapters."""
from __future__ import annotations

import torch

from ..runtime.loading import train_autocast
from ..systems import registry
from .base import ASSETS, build_base, make_encoder


def _val_batch(n: int):
    """(base, a collated batch of n val conversations with their answers)."""
    from ..scenes import make_split, render
    base, tok = build_base(None)
    enc = make_encoder(base, tok)
    samples = make_split("val", n)
    batch = enc.collate([enc.encode([(qa.question, qa.answer) for qa in s.turns]) for s in samples],
                        [render(s.scene, 256) for s in samples])
    return base, batch


def skip_probe(n: int = 8, seeds: int = 3) -> dict:
    """How fragile the decoder is to skipping: answer CE on n val conversations with every layer, and
    with random hard routes at P(skip) = 0.3 (stage 0 of RoE) through fresh adapters, Xavier-initialised
    (the method) or zero-initialised up-projections (a plain skip)."""
    from ..systems.roe import RoEModel
    from ..train import RouteSchedule, TrainConfig, roe_loss
    base, batch = _val_batch(n)
    torch.manual_seed(0)
    roe = RoEModel(base)
    schedule = RouteSchedule(TrainConfig(steps=100, rho=0.3))
    out = {}
    with torch.no_grad():
        out["dense_ce"] = roe_loss(roe, batch, lambda i, lg: torch.zeros(lg.shape[:2]), 0.3, 1.0)["ce"].item()
        for init in ("xavier", "zero_up"):
            if init == "zero_up":
                for a in roe.adapters:
                    a.up.weight.zero_()
            ces = []
            for seed in range(seeds):
                torch.manual_seed(seed)
                ces.append(roe_loss(roe, batch, lambda i, lg: schedule.weights(lg, 0), 0.3, 1.0)["ce"].item())
            out[f"random_skip30_ce_{init}"] = ces
    return out


def layer_skip_probe(n: int = 16) -> dict:
    """Answer CE on n val conversations with one decoder layer skipped at a time, through the shipped
    adapter and as a plain skip (identity); then the k layers cheapest alone skipped together."""
    from ..systems.roe import RoEModel
    from ..train import roe_loss
    base, batch = _val_batch(n)
    roe = RoEModel.from_roe_folder(base, ASSETS / registry.get("roe").parts_folder).float()
    ups = [a.up.weight.detach().clone() for a in roe.adapters]

    def ce(skip: set[int], plain: bool = False) -> float:
        for a, w in zip(roe.adapters, ups):
            a.up.weight.data.copy_(w.mul(0) if plain else w)   # zero up-projection: x + 0, a plain skip
        fixed = lambda i, lg: torch.full(lg.shape[:2], float(i in skip))   # noqa: E731
        with torch.no_grad(), train_autocast():
            return roe_loss(roe, batch, fixed, 0.3, 1.0)["ce"].item()

    single = [{"layer": i, "adapter": ce({i}), "plain": ce({i}, True)} for i in range(roe.num_layers)]
    order = sorted(range(roe.num_layers), key=lambda i: min(single[i]["adapter"], single[i]["plain"]))
    together = {k: {"layers": sorted(order[:k]), "adapter": ce(set(order[:k])), "plain": ce(set(order[:k]), True)}
                for k in (3, 6, 9, 12)}
    return {"dense_ce": ce(set()), "single": single, "cheapest_together": together}
