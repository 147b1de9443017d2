"""EvoMoE (arXiv 2505.23830, AAAI-26) over any Hugging Face LLaVA with a Llama-style decoder.

Evolved experts and a Dynamic Token-aware Router (DTR), top-1, in every other decoder layer, on the
machinery MoE-LLaVA uses here (`MoELlavaModel`: the base wrapped, never edited; generation, KV cache,
traces, checkpoints). What the paper leaves open is chosen here, and said so (also in the README):

- **Expert evolution** (stage II): only FFN_1 (expert 0, an upcycled copy of the layer's FFN) trains;
  after every optimizer step experts n = 1..E-1 move along its trajectory as exponential moving
  averages, theta_n <- beta * theta_n + (1 - beta) * theta_1, beta re-drawn every step from the
  expert's range ([0.9, 0.99], [0.8, 0.89], [0.7, 0.79]). The paper writes the update with a
  gradient; the EMA of the weights is the consistent reading (MOE_METHODS.md). With expert_delta_rank
  r > 0 (the embedded model: the size budget) FFN_1 trains rank-r deltas and the EMA runs on their
  factors (A, B): each evolved expert stays a rank-r delta over the upcycled FFN.
- **DTR**: z' = the post-attention stream after the norm. Two hypernetworks, H_image and H_text (each
  two linear layers, SiLU between), generate per token Theta_down (2b x d) and Theta_up (k x b); the
  token's embedding is Theta_up(SwiGLU(Theta_down z')), and phi (Linear k->k, SiLU, Linear k->E) gives
  the routing scores. Bottleneck b = 4, embedding k = 16, hypernetwork width 16 (the paper does not
  publish them: small, so the router costs ~3% of an FFN per token). Image tokens use H_image only,
  every other token H_text; each runs once on its tokens (no loop over tokens).
- **Top-1**, no capacity limit (no drops); the chosen expert's output enters with weight 1 in the
  forward pass and the router learns through a straight-through gate (1 + p - p.detach(), gradient of
  Switch's p * E(x)); l_aux as MoE-LLaVA's with top-1 fractions, coefficient 0.001.
- Stage III trains the router alone, experts frozen.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import GroupedExperts
from .moe_llava import Expert, MoELlavaConfig, MoELlavaModel, MoELlavaPipeline, Top2Gating, shuffle_scores

CONFIG_NAME = "evomoe_config.json"
WEIGHTS_NAME = "evomoe.safetensors"
BETA_RANGES = ((0.9, 0.99), (0.8, 0.89), (0.7, 0.79))   # experts 2, 3, 4


@dataclass
class EvoMoEConfig(MoELlavaConfig):
    FILE: ClassVar[str] = CONFIG_NAME
    WEIGHTS: ClassVar[str] = WEIGHTS_NAME
    SYSTEM: ClassVar[str] = "EvoMoE"
    top_k: int = 1
    aux_loss_coef: float = 0.001
    beta_ranges: list = field(default_factory=lambda: [list(r) for r in BETA_RANGES])
    hyper_hidden: int = 16                # hypernetwork width
    bottleneck: int = 4                   # b: Theta_down is (2b x d) (SwiGLU's gate and value), Theta_up (k x b)
    embed_dim: int = 16                   # k: the token embedding phi reads


Gating = Top2Gating   # the same record with (N, 1) experts / weights / kept


class HyperNetwork(nn.Module):
    """z (n, d) -> per-token Theta_down (n, 2b, d) and Theta_up (n, k, b): two linear layers."""

    def __init__(self, d: int, hidden: int, b: int, k: int):
        super().__init__()
        self.d, self.b, self.k = d, b, k
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, 2 * b * d + k * b)
        nn.init.normal_(self.fc2.weight, std=0.02)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        t = self.fc2(F.silu(self.fc1(z)))
        n, split = z.shape[0], 2 * self.b * self.d
        return t[:, :split].view(n, 2 * self.b, self.d), t[:, split:].view(n, self.k, self.b)


class DTRouter(nn.Module):
    """The Dynamic Token-aware Router: modality-specific hypernetworks -> per-token bottleneck -> phi -> scores."""

    def __init__(self, d: int, num_experts: int, hidden: int = 16, b: int = 4, k: int = 16, device=None):
        super().__init__()
        self.hyper = nn.ModuleDict({"image": HyperNetwork(d, hidden, b, k), "text": HyperNetwork(d, hidden, b, k)})
        self.phi = nn.Sequential(nn.Linear(k, k), nn.SiLU(), nn.Linear(k, num_experts))
        self.to(device=device, dtype=torch.float32)
        self.sync_free: bool | None = None   # True: forward_sync_free; None: it on CUDA in eval

    def _apply(self, fn, *args, **kwargs):
        """Routing stays fp32 when the model around it moves to bf16 (`.to(dtype)` converts devices only)."""
        out = super()._apply(fn, *args, **kwargs)
        for p in self.parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()
        return out

    def embed(self, z: Tensor, modality: str) -> Tensor:
        """(n, d) tokens of one modality -> (n, k): Theta_up(SwiGLU(Theta_down z)) with generated Thetas."""
        down, up = self.hyper[modality](z)
        gate, value = torch.einsum("nrd,nd->nr", down, z).chunk(2, dim=-1)      # (n, b) each
        return torch.einsum("nkb,nb->nk", up, F.silu(gate) * value)

    def forward(self, z: Tensor, is_image: Tensor) -> Tensor:
        """z (N, d) fp32, is_image (N,) bool -> routing scores (N, E). Each hypernetwork runs once, on
        its modality's tokens (or, sync-free, on all tokens: forward_sync_free). Routing stays fp32 under
        autocast too (training with bf16: autocast would make phi's output bf16, which index_copy_ into
        the fp32 scores refuses)."""
        on = self.sync_free if self.sync_free is not None else z.is_cuda and not self.training
        if on:
            return self.forward_sync_free(z, is_image)
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            scores = z.new_zeros(z.shape[0], self.phi[-1].out_features)
            for modality, sel in (("image", is_image), ("text", ~is_image)):
                idx = sel.nonzero().squeeze(1)
                if idx.numel():
                    scores.index_copy_(0, idx, self.phi(self.embed(z.index_select(0, idx), modality)))
        return scores

    def forward_sync_free(self, z: Tensor, is_image: Tensor) -> Tensor:
        """forward's scores with no host sync (no nonzero(): CUDA graphs): both hypernetworks run on
        every token and each token keeps its modality's embedding (torch.where); rows are independent,
        so the values are forward's (up to float rounding)."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            emb = torch.where(is_image.reshape(-1, 1), self.embed(z, "image"), self.embed(z, "text"))
            return self.phi(emb)


def top1_gating(scores: Tensor, token_mask: Tensor | None = None) -> Gating:
    """Top-1 on scores (N, E): expert = argmax; weight 1 in value, Switch's p in gradient; l_aux =
    E * sum_e mean_prob_e * frac_top1_e over real tokens; no capacity limit (kept = real tokens)."""
    N, E = scores.shape
    probs = scores.float().softmax(-1)
    real = (torch.ones(N, dtype=torch.bool, device=scores.device) if token_mask is None
            else token_mask.reshape(N).bool())
    top = probs.argmax(-1)
    p = probs.gather(1, top[:, None])                                            # (N, 1)
    weights = (1.0 + p - p.detach()) * real[:, None]
    n = max(N if token_mask is None else int(real.sum()), 1)   # no mask: no host sync (CUDA graphs)
    mean_prob = (probs * real[:, None]).sum(0) / n
    frac = (F.one_hot(top, E) * real[:, None]).sum(0).float() / n
    return Gating(top[:, None], weights, real[:, None].clone(), E * (mean_prob * frac).sum(), probs, N)


class EvoMoEFFN(GroupedExperts, nn.Module):
    """E experts (copies of the layer's FFN, evolved in stage II) and a DTR, top-1.

    evolving = True (stage II): only expert 0 runs, for every token (the dense model with FFN_1); the
    gating reports expert 0 with weight 1 and l_aux 0."""

    def __init__(self, mlp: nn.Module, config: EvoMoEConfig):
        super().__init__()
        w = mlp.gate_proj.weight
        self.experts = nn.ModuleList(Expert(mlp, config.expert_delta_rank) for _ in range(config.num_experts))
        if config.expert_delta_rank:
            # the evolved experts start where FFN_1 starts (theta_n(0) = theta_1(0)), delta factors
            # included: each delta's A is drawn at random, and an evolved expert's own random A would
            # otherwise stay mixed into its EMA (B A = 0 at init either way, but not after)
            with torch.no_grad():
                for e in self.experts[1:]:
                    for p, q in zip(e.delta.parameters(), self.experts[0].delta.parameters()):
                        p.copy_(q)
        self.router = DTRouter(w.shape[1], config.num_experts, config.hyper_hidden, config.bottleneck,
                               config.embed_dim, device=w.device)
        self.evolving = False
        self.shuffle: torch.Generator | None = None   # set: router scores permuted per token (uniformity probe)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def gate(self, x: Tensor, token_ok: Tensor | None = None, token_image: Tensor | None = None) -> Gating:
        flat = x.reshape(-1, x.shape[-1]).float()
        is_image = (torch.zeros(flat.shape[0], dtype=torch.bool, device=x.device) if token_image is None
                    else token_image.reshape(-1).bool())
        mask = None if token_ok is None else token_ok.reshape(-1)
        if self.evolving:
            N = flat.shape[0]
            real = torch.ones(N, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
            probs = F.one_hot(torch.zeros(N, dtype=torch.long, device=x.device), self.num_experts).float()
            return Gating(torch.zeros(N, 1, dtype=torch.long, device=x.device), real[:, None].float(),
                          real[:, None].clone(), flat.new_zeros(()), probs, N)
        scores = self.router(flat, is_image)
        if self.shuffle is not None:
            scores = shuffle_scores(scores, self.shuffle)
        return top1_gating(scores, mask)

    def forward(self, x: Tensor, token_ok: Tensor | None = None, token_image: Tensor | None = None
                ) -> tuple[Tensor, Gating]:
        gating = self.gate(x, token_ok, token_image)
        if self.evolving:
            return self.experts[0](x), gating
        return self.run_experts(x, gating), gating   # grouped matmuls on CUDA in eval (dispatch.py)

    @torch.no_grad()
    def evolve(self, ranges, rng: random.Random) -> list[float]:
        """One evolution step: expert n (n >= 1) <- beta_n * expert n + (1 - beta_n) * expert 0, each beta_n
        drawn from ranges[n - 1]. With deltas, on their factors; else on the full weights. Returns the betas."""
        src = self.experts[0]
        params = (lambda e: list(e.delta.parameters())) if src.delta_rank else \
                 (lambda e: [q for p in Expert.PROJ for q in getattr(e, p).parameters()])   # biases too, if any
        betas = []
        for n, expert in enumerate(self.experts[1:], start=1):
            lo, hi = ranges[(n - 1) % len(ranges)]
            beta = rng.uniform(lo, hi)
            betas.append(beta)
            for p, q in zip(params(expert), params(src)):
                p.mul_(beta).add_(q, alpha=1.0 - beta)
        return betas


class EvoMoEModel(MoELlavaModel):
    """A LLaVA model whose MoE layers' FFN is E evolved experts with a top-1 DTR."""
    config_cls = EvoMoEConfig
    label = "EvoMoE"

    def check_config(self, config) -> None:
        if config.top_k != 1:
            raise ValueError(f"EvoMoE routes top-1, not top_k={config.top_k}")
        if config.num_experts < 2:
            raise ValueError(f"EvoMoE needs at least 2 experts, not {config.num_experts}")

    def make_moe_ffn(self, mlp: nn.Module, config) -> nn.Module:
        return EvoMoEFFN(mlp, config)

    def __init__(self, base: nn.Module, config: EvoMoEConfig | None = None, **overrides):
        super().__init__(base, config, **overrides)
        self.rng = random.Random(0)

    def set_evolving(self, on: bool) -> None:
        for ffn in self.moe.values():
            ffn.evolving = on

    def evolve(self) -> list[list[float]]:
        """One evolution step in every MoE layer; returns the betas drawn (per layer, per evolved expert)."""
        return [ffn.evolve(self.config.beta_ranges, self.rng) for ffn in self.moe.values()]

    def expert0_parameters(self) -> list[nn.Parameter]:
        """What trains in stage II: FFN_1 of each MoE layer (its deltas, or its weights)."""
        out = []
        for ffn in self.moe.values():
            e = ffn.experts[0]
            out += list(e.delta.parameters()) if e.delta_rank else [p for n in Expert.PROJ
                                                                    for p in getattr(e, n).parameters()]
        return out

    def router_parameters(self) -> list[nn.Parameter]:
        """What trains in stage III: the DTRs."""
        return [p for ffn in self.moe.values() for p in ffn.router.parameters()]


class EvoMoEPipeline(MoELlavaPipeline):
    system = "evomoe"
    model_cls = EvoMoEModel
