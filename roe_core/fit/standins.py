"""Stand-ins for skipped layers, fitted in closed form (ReplaceMe / LinearPatch style): per decoder layer,
the linear map from the layer's normalised input to the change it makes,

    h_out - h_in  ~=  rmsnorm(h_in) @ W          (W: d x d, least squares over calibration tokens)

accumulated as normal equations (N^T N and N^T D, d x d each per layer: memory never grows with the number
of tokens or inputs), solved with a small ridge, then cut to rank r by reduced-rank regression (the rank-r
map with the least squared error on the same tokens: W V_r V_r^T, V_r the top eigenvectors of the fitted
values' covariance W^T N^T N W).

A rank-r linear map is exactly a SkipAdapter of rank 2r, x + up(relu(down(norm(x)))), since
relu(z) - relu(-z) = z: down = [A; -A], up = [B, -B]. So RoE and the fixed path load fitted stand-ins as
they load trained adapters.

    m = Moments(num_layers, d)                   # m.add(i, n (M, d), delta (M, d)) per layer and batch
    A, B = solve(m.ntn[i], m.ntd[i], rank=72)    # down (r, d), up (d, r): delta ~= n @ A.T @ B.T
    write_adapter(adapter, A, B)                 # into a SkipAdapter of rank 2r
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def rms_normalise(h: Tensor, eps: float) -> Tensor:
    """What SkipAdapter's RMSNorm (weight 1) gives, in fp32."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class Moments:
    """Per layer: N^T N, N^T D (fp32, d x d), sum ||D||^2 and the token count."""

    def __init__(self, num_layers: int, d: int, device="cpu"):
        self.ntn = torch.zeros(num_layers, d, d, device=device)
        self.ntd = torch.zeros(num_layers, d, d, device=device)
        self.dtd = torch.zeros(num_layers, dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, dtype=torch.long)

    def add(self, i: int, n: Tensor, delta: Tensor) -> None:
        """n, delta: (M, d) fp32 rows of one layer (normalised inputs, output minus input)."""
        self.ntn[i].addmm_(n.T, n)
        self.ntd[i].addmm_(n.T, delta)
        self.dtd[i] += float(delta.double().pow(2).sum())
        self.tokens[i] += n.shape[0]

    def state(self) -> dict[str, Tensor]:
        return {"ntn": self.ntn.cpu().contiguous(), "ntd": self.ntd.cpu().contiguous(), "dtd": self.dtd,
                "tokens": self.tokens}

    def save(self, path: str | Path) -> None:
        tmp = Path(str(path) + ".tmp")
        save_file(self.state(), str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "Moments":
        t = load_file(str(path))
        m = cls(t["ntn"].shape[0], t["ntn"].shape[1], device)
        m.ntn.copy_(t["ntn"])
        m.ntd.copy_(t["ntd"])
        m.dtd.copy_(t["dtd"])
        m.tokens.copy_(t["tokens"])
        return m


def solve(ntn: Tensor, ntd: Tensor, rank: int, ridge: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Rank-`rank` least squares: (down (r, d), up (d, r)) with delta ~= n @ down.T @ up.T. ridge: added
    to the diagonal as a fraction of its mean (0: plain least squares)."""
    A = ntn.double()
    d = A.shape[0]
    if ridge > 0:
        A = A + ridge * A.diagonal().mean().clamp(min=1e-12) * torch.eye(d, dtype=A.dtype, device=A.device)
    W = torch.linalg.solve(A, ntd.double()) if ridge > 0 else torch.linalg.lstsq(A, ntd.double()).solution
    r = min(rank, d)
    if r < d:
        C = W.T @ ntn.double() @ W                      # (d, d) covariance of the fitted values
        _, vecs = torch.linalg.eigh((C + C.T) / 2)
        V = vecs[:, -r:]                                # top-r directions of the fitted change
    else:
        V = torch.eye(d, dtype=W.dtype, device=W.device)
    down = (W @ V).T                                    # (r, d): n -> coordinates of the change
    up = V                                              # (d, r)
    return down.float(), up.float()


@torch.no_grad()
def write_adapter(adapter, down: Tensor, up: Tensor) -> None:
    """A SkipAdapter of rank 2r computing x + rmsnorm(x) @ down.T @ up.T exactly (relu(z) - relu(-z) = z)."""
    r2 = adapter.down.weight.shape[0]
    if r2 != 2 * down.shape[0]:
        raise ValueError(f"a rank-{down.shape[0]} stand-in needs an adapter of rank {2 * down.shape[0]}, not {r2}")
    dt = adapter.down.weight.dtype
    adapter.norm.weight.fill_(1.0)
    adapter.down.weight.copy_(torch.cat([down, -down]).to(dt))
    adapter.up.weight.copy_(torch.cat([up, -up], dim=1).to(dt))


def explained(m: Moments, i: int, down: Tensor, up: Tensor) -> float:
    """Fraction of layer i's change (sum ||D||^2 over the calibration tokens) the stand-in reproduces,
    from the moments alone: 1 - ||D - N W||^2 / ||D||^2."""
    W = (down.T @ up.T).double()                                    # (d, d)
    ntn, ntd = m.ntn[i].double(), m.ntd[i].double()
    err = m.dtd[i] - 2 * torch.trace(W.T @ ntd) + torch.trace(W.T @ ntn @ W)
    return float(1 - err / m.dtd[i].clamp(min=1e-12))
