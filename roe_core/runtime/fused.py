"""The decode engine's layer body fused by torch.compile, inside the engine's own CUDA graphs.

    engine = DecodeEngine("graphs", fuse=True)                       # FuseOptions() defaults
    engine = DecodeEngine("graphs", fuse=FuseOptions(mode="default"))
    fused = fuse_program(program, FuseOptions())                     # what the engine does with fuse on

A decode step of a 7B at batch 1 reads ~13.5 GB of weights; what keeps the engine from the bandwidth
floor once launches are captured is the small kernels around each matmul (RMSNorm's five, rotary's
six, SwiGLU's two, residual adds, the KV write, the mask's broadcast): ~20 per layer, each a few
microseconds of mostly idle GPU. torch.compile (TorchInductor) fuses them into a handful of Triton
kernels per layer. Here it compiles the decode step's parts of a `LayerProgram`: `block` (a layer on
the rows routed through it), each `stand_in` (RoE's adapter), `rotary` and `final_logits`; the engine
still captures each (layer, row bucket) as its own CUDA graph, now of the compiled kernels. Compile's
own CUDA graphs stay off (mode "default" or "max-autotune-no-cudagraphs", never "reduce-overhead"):
two graph managers over one step would fight over the memory pool, and the engine's bound on graphs
(layers x buckets) is the point of the engine.

What is compiled sees only a decode step: the KV write is the arena's one-token path (`DecodeKV`,
ArenaCache.update's t == 1 branch without its Python bookkeeping, so no Python int of the arena's
state is guarded on and a new prompt length costs no recompile). Prefill never goes through here.

Compilations: Dynamo specialises on the layer index (it picks the layer's weights and KV buffers) and,
with `dynamic=False`, on each row bucket: one compile per (layer, bucket) in use, the same count as the
engine's graphs, made at a graph's first use (its warm-up run, before capture). The per-code-object
recompile limit is raised to cover them (`ensure_recompile_limit`). The Inductor kernels of layer 2..L
are cache hits of layer 1's (same graph, other inputs), so the cost after the first layer is Dynamo's
tracing. Fused programs are kept on their owner (a system model), as the engine keeps its arenas per
owner: programs of one owner are interchangeable.

On the CPU the default engine (fuse=False) is untouched; `fuse=True` there compiles for the CPU
(Inductor's C++ backend, needs a compiler) or, with `backend="aot_eager"`, traces the same graphs
without generating kernels: the test that fused tokens equal unfused ones runs that way on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from .engine import LayerProgram

PARTS = ("block", "stand_in", "rotary", "final_logits")


@dataclass(frozen=True)
class FuseOptions:
    """How the decode step's parts are compiled. mode: Inductor's ("max-autotune-no-cudagraphs": tuned
    matmul and Triton configs, longer first compile; "default": quicker to compile); never a mode with
    compile's own CUDA graphs. fullgraph: an error on a graph break instead of a split graph.
    dynamic: False specialises on every shape (one compile per row bucket, the fastest kernels).
    parts: which of PARTS are compiled."""
    backend: str = "inductor"
    mode: str | None = "max-autotune-no-cudagraphs"
    fullgraph: bool = False
    dynamic: bool | None = False
    parts: tuple[str, ...] = PARTS

    def __post_init__(self):
        if self.mode is not None and "cudagraphs" not in self.mode and self.mode != "default":
            raise ValueError(f"fuse mode {self.mode!r} would let compile capture its own CUDA graphs inside the "
                             "engine's; use 'default' or 'max-autotune-no-cudagraphs'")
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown fuse parts {sorted(unknown)}; choose from {PARTS}")

    def compile(self, fn: Callable) -> Callable:
        kw: dict[str, Any] = dict(backend=self.backend, fullgraph=self.fullgraph, dynamic=self.dynamic)
        if self.backend == "inductor" and self.mode is not None:
            kw["mode"] = self.mode
        return torch.compile(fn, **kw)


def options_of(fuse: bool | FuseOptions | None) -> FuseOptions | None:
    """The engine's `fuse` argument as options: False / None: off; True: FuseOptions()."""
    if fuse is None or fuse is False:
        return None
    if fuse is True:
        return FuseOptions()
    if isinstance(fuse, FuseOptions):
        return fuse
    raise TypeError(f"fuse must be a bool or FuseOptions, not {type(fuse).__name__}")


class DecodeKV:
    """ArenaCache as a decode step writes it: key/value (b, heads, 1, hd) of layer i into slot `slot` of
    its first b buffer rows; attention reads the whole capacity (the arena's mask hides unwritten slots).
    The same values as ArenaCache.update's one-token branch (a decode step never takes the prompt branch: a layer
    that runs in decoding ran at prefill), with no Python state for a compiled block to guard on."""

    def __init__(self, cache):
        self.keys, self.values, self.slot = cache.keys, cache.values, cache.slot

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        b, heads = key.shape[0], key.shape[1]
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        # one index_put_ on the whole buffer (rows [0, b), every head, the slot): an in-place write of a
        # *view* ([:b].index_copy_) is functionalised by compile into a copy of the view and a copy back,
        # the rows' whole capacity read and written twice per layer per step
        idx = (torch.arange(b, device=key.device)[:, None], torch.arange(heads, device=key.device)[None, :], self.slot)
        k_buf.index_put_(idx, key[:, :, 0])
        v_buf.index_put_(idx, value[:, :, 0])
        return k_buf[:b], v_buf[:b]

    def batch_size(self, layer_idx: int) -> int:
        return self.keys[layer_idx].shape[0]


def _call(module, x):
    return module(x)


def ensure_recompile_limit(n: int) -> None:
    """Dynamo keeps at most `recompile_limit` compiled entries per code object (default 8) and falls back
    to eager past it; a fused block needs one per (layer, bucket). Raised (never lowered) to n."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):          # the name before torch 2.6: cache_size_limit
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))
            break
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4 * n))
            break


ATTR = "_fused_decode_program"       # on the owner: (options, fused program); it lives and dies with the owner


def fuse_program(p: LayerProgram, options: FuseOptions | bool = True) -> LayerProgram:
    """The program with its decode-step parts compiled (see the module docstring); the same owner, so
    the engine keeps its arenas and graphs per owner as before. Kept per owner and options: a later
    program of the same owner gets the same compiled parts (and Dynamo's cache entries)."""
    opt = options_of(options)
    if opt is None:
        return p
    owner = p.owner
    hit = getattr(owner, ATTR, None)
    if hit is not None and hit[0] == opt:
        return hit[1]
    # per layer: every row bucket up to 2^16 rows, plus "every row"; generous, and only an upper limit
    ensure_recompile_limit(p.num_layers * 18)
    fused = replace(p)
    if "block" in opt.parts:
        block = opt.compile(p.block)

        def fused_block(i, h, mask, pos_emb, cache):
            return block(i, h, mask, pos_emb, DecodeKV(cache))
        fused.block = fused_block
    if "stand_in" in opt.parts:
        call = opt.compile(_call)
        wrapped: dict[int, Callable | None] = {}

        def stand_in(i):
            if i not in wrapped:
                m = p.stand_in(i)
                wrapped[i] = None if m is None else (lambda x, m=m: call(m, x))
            return wrapped[i]
        fused.stand_in = stand_in
    if "rotary" in opt.parts:
        fused.rotary = opt.compile(p.rotary)
    if "final_logits" in opt.parts:
        fused.final_logits = opt.compile(p.final_logits)
    if owner is not None:
        # kept on the owner itself, not in a table keyed by it: the compiled parts hold the owner (its
        # bound methods), so a weak-keyed table would keep every owner alive for good
        try:
            object.__setattr__(owner, ATTR, (opt, fused))
        except (AttributeError, TypeError):
            pass
    return fused
