"""Routers fitted to evidence: per layer, a ridge regression from what RoE's router reads (the two routing
tokens after the layer's input norm, concatenated: 2d features) to the log of a per-example measure of
what skipping that layer costs the example (record.py: "taylor", "residual", or Fig. 1's "l1").

The fitted regression is written into RoE's own Router, Linear(2d -> 2) with a bias (RoEConfig.router_bias):

    logit_run - logit_skip = a * (predicted log cost - c)     =>   p_run = sigmoid(a * (y_hat - c))

so "run a layer iff p_run > threshold" runs it iff its predicted cost for this example is above one cut
shared by every layer (c + logit(threshold) / a): the layers predicted to cost least are skipped first,
whichever layer they are. a = 1 / std of the targets and c = their median put the useful thresholds
inside (0, 1). The ridge strength is chosen per layer by generalised cross-validation.
"""
from __future__ import annotations

import torch
from torch import Tensor

LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)     # ridge strengths tried, as a fraction of n


def log_target(s: Tensor) -> Tensor:
    """log(cost), floored at a thousandth of its median (a zero cost stays finite)."""
    s = s.float().clamp(min=0)
    floor = (s.median() * 1e-3).clamp(min=1e-12)
    return torch.log(s + floor)


def ridge_gcv(Z: Tensor, y: Tensor) -> tuple[Tensor, float, float]:
    """Ridge on standardised features Z (n, p) and centred y (n,), lambda by GCV. (w (p,), lambda, R^2 by GCV)."""
    n = Z.shape[0]
    U, S, Vh = torch.linalg.svd(Z.double(), full_matrices=False)
    Uty = U.T @ y.double()
    best = None
    for frac in LAMBDAS:
        lam = frac * n
        f = S ** 2 / (S ** 2 + lam)
        fit = U @ (f * Uty)
        rss = (y.double() - fit).pow(2).sum()
        gcv = rss / n / (1 - f.sum() / n) ** 2
        if best is None or gcv < best[0]:
            best = (gcv, lam, f)
    gcv, lam, f = best
    w = Vh.T @ ((S / (S ** 2 + lam)) * Uty)
    r2 = 1 - float(gcv) / float(y.double().pow(2).mean().clamp(min=1e-12))
    return w.float(), lam, r2


def fit_routers(feats: Tensor, target: Tensor) -> dict:
    """feats (n, L, 2d), target (n, L) log costs. Per layer: y_hat = x . w_raw + b (raw router inputs).
    Returns {"weight": (L, 2d), "bias": (L,), "r2": [L] (GCV estimate), "lambda": [L]}."""
    n, L, p = feats.shape
    W = torch.zeros(L, p)
    b = torch.zeros(L)
    r2s, lams = [], []
    for i in range(L):
        X = feats[:, i].float()
        y = target[:, i].float()
        mu, sd = X.mean(0), X.std(0)
        keep = sd > 1e-4 * sd.max().clamp(min=1e-12)
        ybar = y.mean()
        if n < 3 or not bool(keep.any()):
            W[i], b[i] = 0.0, ybar
            r2s.append(0.0), lams.append(float("nan"))
            continue
        Z = (X[:, keep] - mu[keep]) / sd[keep]
        w, lam, r2 = ridge_gcv(Z, y - ybar)
        w_raw = torch.zeros(p)
        w_raw[keep] = w / sd[keep]
        W[i] = w_raw
        b[i] = ybar - (mu * w_raw).sum()
        r2s.append(r2), lams.append(lam)
    return {"weight": W, "bias": b, "r2": r2s, "lambda": lams}


def predict(fit: dict, feats: Tensor) -> Tensor:
    """(n, L) predicted log costs for router inputs feats (n, L, 2d)."""
    return torch.einsum("nlp,lp->nl", feats.float(), fit["weight"]) + fit["bias"]


@torch.no_grad()
def write_routers(model, fit: dict, a: float, c: float) -> None:
    """Into RoE's routers (with bias): logit_run = a (x . w + b - c), logit_skip = 0."""
    for i, r in enumerate(model.routers):
        if r.proj.bias is None:
            raise ValueError("fitted routers need RoEConfig(router_bias=True)")
        dt = r.proj.weight.dtype
        r.proj.weight.zero_()
        r.proj.bias.zero_()
        r.proj.weight[0] = (a * fit["weight"][i]).to(dt)
        r.proj.bias[0] = float(a * (fit["bias"][i] - c))
