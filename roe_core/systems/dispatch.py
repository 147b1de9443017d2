"""MoE expert dispatch, two ways, the same result: sum_k w_k E_{e_k}(x) per token (dropped assignments add 0).

    dispatch(experts, x, gating)           each expert once on its gathered tokens (a Python loop over
                                           experts, sizes read on the host: `counts.tolist()` syncs)
    grouped_dispatch(experts, x, gating)   every index computed on the device and the SwiGLU experts run
                                           as three grouped matmuls over weights stacked (E, out, in):
                                           no host sync, no loop, so a decode step can be captured in a
                                           CUDA graph (on CUDA the grouped-GEMM kernel is bf16 on SM90+;
                                           other dtypes take torch's fallback, which reads offsets on the host)
    stack_experts(experts)                 the stacked weights, built once and cached; each expert's
                                           Linear weights become views into them (memory is not doubled)
    GroupedExperts                         mixin of MoEFFN / EvoMoEFFN: `stacked()`, `sync_free`, `run_experts`
    masked_dispatch(experts, x, gating)    no sync either, where no grouped kernel runs: every expert on
                                           every token, weighted (E x the arithmetic; a fixed loop)
    set_sync_free(model, on)               sets `sync_free` (True / False / None = auto: CUDA, eval) everywhere
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJ = ("gate_proj", "up_proj", "down_proj")
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)   # torch <= 2.11: private
GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)                       # what grouped_mm accepts


def dispatch(experts: nn.ModuleList, x: Tensor, gating) -> Tensor:
    """Runs each expert once on the tokens assigned to it (gathered, grouped by expert) and adds back
    its outputs times their weights (index_add_): sum_k w_k E_{e_k}(x) per token, for any top-k.
    gating.experts / weights / kept: (N, k) over x's N = prod(x.shape[:-1]) tokens."""
    flat = x.reshape(-1, x.shape[-1])                                           # (N, d)
    N, k = gating.experts.shape
    token = torch.arange(N, device=x.device).repeat_interleave(k)               # (kN,) assignment -> token
    expert = gating.experts.reshape(-1)
    weight = gating.weights.reshape(-1)
    sel = gating.kept.reshape(-1).nonzero().squeeze(1)                          # kept assignments
    sel = sel[torch.argsort(expert[sel], stable=True)]                          # grouped by expert
    counts = torch.bincount(expert[sel], minlength=len(experts)).tolist()
    out = torch.zeros_like(flat)
    for e, idx in enumerate(sel.split(counts)):
        if idx.numel() == 0:
            continue
        tok = token[idx]
        y = experts[e](flat.index_select(0, tok)) * weight[idx, None].to(flat.dtype)
        out.index_add_(0, tok, y)
    return out.view_as(x)


# --- stacked expert weights ------------------------------------------------------------------------------

@dataclass
class ExpertStack:
    """The experts' projections stacked: weight[name] (E, out, in), bias[name] (E, out) or None. Each
    expert's Linear holds a view into them; ptrs: the data pointers those views had when built."""
    weight: dict[str, Tensor]
    bias: dict[str, Tensor | None]
    ptrs: tuple[int, ...]

    @property
    def num_experts(self) -> int:
        return self.weight["gate_proj"].shape[0]


def _params(experts: nn.ModuleList) -> list[Tensor]:
    return [p for e in experts for name in PROJ for p in (getattr(e, name).weight, getattr(e, name).bias)
            if p is not None]


def _ptrs(experts: nn.ModuleList) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in _params(experts))


def stackable(experts: nn.ModuleList) -> bool:
    """The experts' Linears are all they compute: no unmerged low-rank delta (`delta_rank == 0 or merged`)."""
    return len(experts) > 0 and all(not getattr(e, "delta_rank", 0) or getattr(e, "merged", False) for e in experts)


def current_stack(experts: nn.ModuleList) -> ExpertStack | None:
    """The cached stack, if the experts' weights still are views into it (not after `.to()` moved or
    converted them, nor after a weight was replaced). Inside torch.compile (the decode engine's fused
    step) the pointers are not compared, a graph break per MoE layer otherwise: the stack there was built
    or checked by the eager prefill before it, and `.to()` drops a stale one (GroupedExperts._apply)."""
    st = getattr(experts, "_expert_stack", None)
    if st is not None and torch.compiler.is_compiling():
        return st
    return st if st is not None and st.ptrs == _ptrs(experts) else None


@torch.no_grad()
def stack_experts(experts: nn.ModuleList) -> ExpertStack:
    """The experts' weights stacked (E, out, in) per projection, built once and cached on `experts`.
    Building copies each projection's weights into one tensor and points each expert's Parameter at
    its slice (`param.data = stack[e]`: the same Parameter objects, so optimizers and in-place updates
    such as merge(), evolve() or load_state_dict keep working and the stack always holds the current
    values). Rebuilt when the pointers no longer match (after `.to()`, say)."""
    st = current_stack(experts)
    if st is not None:
        return st
    if not stackable(experts):
        raise ValueError("experts with unmerged low-rank deltas cannot be stacked (merge them first)")
    weight, bias = {}, {}
    for name in PROJ:
        lins = [getattr(e, name) for e in experts]
        for attr, into in (("weight", weight), ("bias", bias)):
            params = [getattr(lin, attr) for lin in lins]
            if params[0] is None:
                into[name] = None
                continue
            stack = torch.stack([p.detach() for p in params])
            for p, view in zip(params, stack):
                p.data = view
            into[name] = stack
    st = ExpertStack(weight, bias, _ptrs(experts))
    experts._expert_stack = st          # a plain attribute: not a buffer, not in the state dict
    return st


def drop_stale_stack(experts: nn.ModuleList) -> None:
    """Forgets a stack the experts no longer point into (frees its memory after `.to()`)."""
    if getattr(experts, "_expert_stack", None) is not None and current_stack(experts) is None:
        experts._expert_stack = None


# --- grouped dispatch ------------------------------------------------------------------------------------

def _grouped_linear(xs: Tensor, w: Tensor, b: Tensor | None, offs: Tensor, group: Tensor) -> Tensor:
    """Rows xs (M, in), grouped by offs, times their group's w (E, out, in) transposed; plus the row's bias."""
    y = GROUPED_MM(xs, w.transpose(1, 2), offs=offs)        # (E, in, out) column-major, as the CUDA kernel wants
    return y if b is None else y + b.index_select(0, group)


def grouped_dispatch(experts: nn.ModuleList, x: Tensor, gating) -> Tensor:
    """dispatch's result (sum_k w_k E_{e_k}(x) per token, dropped assignments add 0) with no host sync
    and no loop over experts. The N x k assignments are sorted by expert on the device (dropped ones
    last, in a group of their own that the grouped matmuls skip), the offsets are the cumulative
    counts (scatter_add_), and the SwiGLU experts down(act(gate(x)) * up(x)) run as three grouped
    matmuls on the stacked weights (stack_experts). Outputs times weights go back with index_add_,
    in dispatch's order (by expert, then assignment)."""
    if GROUPED_MM is None:
        raise RuntimeError(f"torch {torch.__version__} has no grouped_mm")
    st = stack_experts(experts)
    E = st.num_experts
    flat = x.reshape(-1, x.shape[-1])                                           # (N, d)
    N, k = gating.experts.shape
    kept = gating.kept.reshape(-1)
    key = torch.where(kept, gating.experts.reshape(-1), E)                      # (kN,) expert; E: dropped
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.long, device=x.device).scatter_add_(0, key, torch.ones_like(key))
    offs = counts[:E].cumsum(0).to(torch.int32)                                 # rows past offs[-1]: dropped
    group = key.index_select(0, order).clamp(max=E - 1)                         # each sorted row's expert
    token = torch.div(order, k, rounding_mode="floor")                          # assignment -> token
    xs = flat.index_select(0, token)                                            # (kN, d)
    W, B = st.weight, st.bias
    h = experts[0].act_fn(_grouped_linear(xs, W["gate_proj"], B["gate_proj"], offs, group)) \
        * _grouped_linear(xs, W["up_proj"], B["up_proj"], offs, group)
    y = _grouped_linear(h, W["down_proj"], B["down_proj"], offs, group)         # (kN, d)
    w = gating.weights.reshape(-1).index_select(0, order).to(flat.dtype)
    y = torch.where(kept.index_select(0, order)[:, None], y * w[:, None], 0)    # dropped rows: undefined -> 0
    return torch.zeros_like(flat).index_add_(0, token, y).view_as(x)


def masked_dispatch(experts: nn.ModuleList, x: Tensor, gating) -> Tensor:
    """dispatch's result with no host sync where no grouped-GEMM kernel runs (CUDA in fp32/fp16, GPUs
    before SM90): every expert on every token, times the token's combined weight for it (0 where it
    was not chosen or was dropped). E times the FFN arithmetic; a fixed loop over the E experts."""
    flat = x.reshape(-1, x.shape[-1])
    N, k = gating.experts.shape
    E = len(experts)
    w = torch.zeros(N, E, dtype=torch.float32, device=x.device)
    w.scatter_add_(1, gating.experts, (gating.weights * gating.kept).float())
    out = torch.zeros_like(flat)
    for e in range(E):
        out = out + experts[e](flat) * w[:, e:e + 1].to(flat.dtype)
    return out.view_as(x)


def grouped_kernel(x: Tensor) -> bool:
    """Whether grouped_mm runs a sync-free kernel for x: CUDA, bf16, SM90 or later (elsewhere torch's
    fallback reads the offsets on the host); on the CPU a sync costs nothing."""
    if not x.is_cuda:
        return True
    return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


# --- choosing the path -----------------------------------------------------------------------------------

class GroupedExperts:
    """Mixin of modules holding `self.experts` (a ModuleList of SwiGLU `Expert`s): which dispatch runs.

    sync_free: True: grouped_dispatch whenever it can run (eval, stackable experts, a dtype grouped_mm
    takes); False: dispatch; None (default): grouped_dispatch on CUDA only (CPU keeps dispatch, faster there)."""
    sync_free: bool | None = None

    def stacked(self) -> ExpertStack:
        return stack_experts(self.experts)

    def use_grouped(self, x: Tensor) -> bool:
        on = self.sync_free if self.sync_free is not None else x.is_cuda
        lin = self.experts[0].gate_proj
        if not on or self.training or GROUPED_MM is None or x.dtype not in GROUPED_DTYPES \
                or x.dtype != lin.weight.dtype or not stackable(self.experts):
            return False
        if x.is_cuda and self.sync_free is None:   # auto: the CUDA kernel wants 16-byte aligned rows
            return lin.in_features % 8 == 0 and lin.out_features % 8 == 0
        return True

    def run_experts(self, x: Tensor, gating) -> Tensor:
        if self.use_grouped(x):
            if grouped_kernel(x):
                return grouped_dispatch(self.experts, x, gating)
            return masked_dispatch(self.experts, x, gating)
        on = self.sync_free if self.sync_free is not None else x.is_cuda
        if on and x.is_cuda and not self.training:       # no grouped path here, but no host sync either
            return masked_dispatch(self.experts, x, gating)
        return dispatch(self.experts, x, gating)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        drop_stale_stack(self.experts)
        return out


def set_sync_free(model: nn.Module, on: bool | None) -> None:
    """Sets `sync_free` on every module of `model` that has one (MoE FFNs, EvoMoE's DTRs): True: the
    sync-free paths (grouped dispatch, both-modality router); False: the others; None: auto (CUDA, eval)."""
    for m in model.modules():
        if hasattr(m, "sync_free"):
            m.sync_free = on
