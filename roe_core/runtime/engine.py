"""The decode engine with static shapes, used by every system: the GPU never waits on Python.

    engine = DecodeEngine(mode="graphs")       # "graphs" (CUDA graphs, CUDA only) or "eager"
    tokens, timing, state, records = engine.generate(program, prefill, max_new_tokens, stop_ids, callback)

What a decode step costs with transformers' dynamic cache and an eager loop is mostly Python and kernel
launches (a 7B step at batch 16 costs what it costs at batch 1). Here, as in gpt-fast:

- **Static buffers.** An *arena* per shape bucket (rows rounded up to a power of two, key capacity to a
  grid) holds, allocated once and reused by every later call of that bucket (a generation checks one out
  and gives it back: two generations in flight never share one, and no lock is held while one runs):
  each layer's keys/values for (the rows that may run it, prompt + new tokens), written at an explicit
  slot (a device tensor); the hidden states (two, ping-pong); positions, the key mask and the next token.
  A system's prefill writes its keys straight into the arena (`ArenaCache` duck-types `Cache.update`).
- **One captured graph per (layer, row bucket).** Layer i runs on the rows routed through it, gathered
  into a bucket of 1, 2, 4, ... rows (pad rows read and write a scratch row that no example owns), and
  its stand-in (RoE's adapter) runs on the rest. Each (layer, bucket) is captured once as a CUDA graph
  (torch.cuda.CUDAGraph, one memory pool per arena) and replayed; so is the step's start (embedding,
  rotary, mask) and its end (final norm, LM head, argmax, stop flags). The number of graphs is bounded
  by layers x (buckets + 2) + 2 and reported (`graph_count`, `graph_bound`). A layer no row runs costs
  its stand-in and nothing else.
- **No host sync in the token loop.** Stop flags and tokens are computed on the device and copied to
  pinned memory without blocking; the host reads step s's flags only after queuing step s + `lag`, so
  the GPU always has work and an answer that stopped costs at most `lag` extra steps. Streaming
  (callback) sees each token `lag` steps late; a callback may raise to stop (a server's checkpoint).

Why torch.cuda.CUDAGraph and not `torch.compile(mode="reduce-overhead")` around each layer: compile's
CUDA-graph trees key recordings on the step function and its static inputs, so one function over 32
layers x row buckets re-records (or recompiles per route) without a bound; here the bound is explicit.
`mode="eager"` runs exactly the same code without capture: it is what the CPU runs and what tests
compare the graphs against.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .decoder import additive_mask
from .generation import Timing, sync

MODES = ("graphs", "eager")
MAX_STOP_IDS = 16            # stop ids an arena's buffer holds (a chat template has one or two)
log = logging.getLogger("roe_core.engine")
_CAPTURE = threading.Lock()  # one CUDA graph capture at a time in the process (nothing in it waits on a gate)


def bucket(n: int, cap: int) -> int:
    """The row bucket of n rows: the next power of two, at most cap (the arena's rows)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, cap)


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass
class LayerProgram:
    """What the engine needs of a system to decode one token through its layers.

    embed(tokens (B, 1)) -> (B, 1, d); rotary(h, positions (B, 1)) -> (cos, sin);
    block(i, h (b, 1, d), mask (b, 1, 1, K), (cos, sin), cache) -> h' or (h', records): layer i as the
      system runs it on the rows routed through it (records: tensors over those b rows to keep per step,
      e.g. an MoE layer's experts and weights);
    stand_in(i) -> a module for the rows that skip layer i (None: no row ever skips it);
    final_logits(h (B, d)) -> (B, V);
    owner: the system model these belong to (arenas and their graphs are kept per owner: two systems
      over one base never replay each other's graphs)."""
    num_layers: int
    embed: Callable[[Tensor], Tensor]
    rotary: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    block: Callable[..., Any]
    stand_in: Callable[[int], nn.Module | None]
    final_logits: Callable[[Tensor], Tensor]
    owner: Any = None


@dataclass
class Prefilled:
    """What a system's prefill hands the engine: the last token's logits (B, V), the keys new tokens may
    read (B, P) bool, the next position per example (B,), which examples ran each layer (B, L) bool
    (None: every example every layer), and the system's own state (returned to it)."""
    logits: Tensor
    key_ok: Tensor
    next_pos: Tensor
    run: Tensor | None
    state: Any = None


class ArenaCache:
    """Keys/values of every layer in an arena's static buffers; duck-types `Cache.update` (and
    `RoutedKVCache`). Layer i's buffer rows hold the examples routed through it, in batch order
    (as RoutedKVCache does), then pad rows. Prefill (t > 1 tokens) writes slots [0, t) of the first
    rows; a decode step (t = 1) writes slot `slot` (a device tensor) of the first b rows, in place,
    and attention reads the whole capacity (the mask hides unwritten slots)."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], slot: Tensor):
        self.keys, self.values, self.slot = keys, values, slot
        self.lengths = [0] * len(keys)

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        i, b, t = layer_idx, key.shape[0], key.shape[-2]
        k_buf, v_buf = self.keys[i][:b], self.values[i][:b]
        if t > 1 or self.lengths[i] == 0:            # prefill: the prompt's keys
            if t > k_buf.shape[-2]:
                raise ValueError(f"a prompt of {t} positions does not fit the arena's {k_buf.shape[-2]}")
            k_buf[:, :, :t].copy_(key)
            v_buf[:, :, :t].copy_(value)
            self.lengths[i] = t
            return k_buf[:, :, :t], v_buf[:, :, :t]
        k_buf.index_copy_(2, self.slot, key)
        v_buf.index_copy_(2, self.slot, value)
        return k_buf, v_buf

    def batch_size(self, layer_idx: int) -> int:
        return self.keys[layer_idx].shape[0]

    def seq_length(self, layer_idx: int) -> int:
        return self.lengths[layer_idx]


class Arena:
    """The static buffers (and captured graphs) of one (rows B, key capacity K). B is a power of two (a
    row bucket): a generation of n <= B examples uses rows [0, n); rows [n, B) are pad rows, stopped from
    the start, whose tokens nobody reads. An arena is used by one generation at a time (`busy`)."""

    def __init__(self, B: int, K: int, num_layers: int, d: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, max_new: int):
        self.B, self.K, self.L = B, K, num_layers
        self.n = B                                      # the current generation's examples
        self.key: tuple = ()
        self.busy = False
        self.verified = False                           # its first replayed step was checked (graphs' guard)
        self.rows = bucket(B, 1 << 30)                  # a layer's buffer rows: B's bucket (pads included)
        z = dict(dtype=dtype, device=device)
        shape = (self.rows, kv_heads, K, head_dim)
        keys = [torch.zeros(shape, **z) for _ in range(num_layers)]
        values = [torch.zeros(shape, **z) for _ in range(num_layers)]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.cache = ArenaCache(keys, values, self.slot)
        self.h = [torch.zeros(B + 1, 1, d, **z), torch.zeros(B + 1, 1, d, **z)]   # row B: scratch
        self.token = torch.zeros(B, dtype=torch.long, device=device)
        self.pos = torch.zeros(B + 1, dtype=torch.long, device=device)
        self.key_ok = torch.zeros(B + 1, K, dtype=torch.bool, device=device)
        self.mask = torch.zeros(B + 1, 1, 1, K, **z)
        self.cos: Tensor | None = None
        self.sin: Tensor | None = None
        self.idx = [torch.full((self.rows,), B, dtype=torch.long, device=device) for _ in range(num_layers)]
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.stop = torch.full((MAX_STOP_IDS,), -1, dtype=torch.long, device=device)   # -1: no id
        self.max_new = max_new
        self.out = torch.full((B, max_new), -1, dtype=torch.long, device=device)
        self.step_i = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[tuple, Any] = {}
        self.records: dict[int, tuple] = {}             # layer -> the tensors its block returned last
        self.graph_records: dict[tuple, tuple | None] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def reset(self, n: int) -> None:
        """Ready for a generation of n examples: pad rows [n, B) are stopped and read one slot."""
        self.n = n
        self.cache.lengths = [0] * self.L
        self.records = {}
        self.key_ok.zero_()
        self.key_ok[n:, 0] = True                       # pad rows and the scratch row: finite attention
        self.pos.zero_()
        self.token.zero_()
        self.done.zero_()
        self.done[n:] = True
        self.out.fill_(-1)
        self.step_i.zero_()
        for idx in self.idx:
            idx.fill_(self.B)

    def snapshot(self) -> dict[str, Tensor]:
        """What a decode step changes besides buffers it rewrites whole (the guard's rerun)."""
        return {k: getattr(self, k).clone() for k in ("token", "pos", "slot", "done", "out", "step_i")}

    def restore(self, snap: dict[str, Tensor]) -> None:
        for k, v in snap.items():
            getattr(self, k).copy_(v)                   # in place: captured graphs read these buffers


class DecodeEngine:
    """Greedy decoding through static buffers and captured graphs (see the module docstring).
    mode: "graphs" (CUDA only), "eager" (the same code uncaptured). lag: steps between queuing a token
    and reading its stop flags. key_multiple: key capacities are rounded up to it (one arena serves
    prompts of similar length). max_arenas: idle arenas kept (least recently used dropped). fuse: compile
    each decode step's layer body (runtime.fused; True or a FuseOptions), off by default.

    Shapes are bucketed so that a server's steady state reuses its arenas: rows to the next power of two
    (a batch of 3 decodes in the arena of 4, its fourth row a stopped pad row) and keys to a grid of
    `key_multiple`. Each generation checks an arena out for its whole run and gives it back at its end;
    no lock is held while a generation runs. Two generations in flight at once (a server's plain batch
    answered at a checkpoint of a background job's generation) never share an arena: the second builds
    or takes another one of the same shape. So a generation may wait on anything (a server's gate) at
    its checkpoints without blocking another one. `stats` counts arenas built and graphs captured.

    The graphs' guard: the first step an arena replays its captured graphs is run again without them,
    and the tokens compared. On a mismatch the engine falls back to eager for good, says so once (the log,
    `fallback`, and `on_fallback(message)`, which a pipeline turns into its info), and keeps the eager
    step's tokens: it never decodes on wrongly. `check_replays` and `replay_hook` exercise the guard on
    the CPU: in eager mode the step is checked too, and replay_hook(tokens) stands for what a replay gave."""

    def __init__(self, mode: str = "graphs", lag: int = 2, key_multiple: int = 256, max_arenas: int = 8,
                 fuse=False, on_fallback: Callable[[str], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.lag = max(0, lag)
        self.key_multiple = key_multiple
        self.max_arenas = max_arenas
        self.arenas: OrderedDict[int, Arena] = OrderedDict()    # every arena (idle and busy), least recent first
        self._last: weakref.ref | None = None
        self._pool = threading.Lock()       # held only to check arenas out and in: never across model work
        self._serial = 0
        self._shapes: set[tuple] = set()     # every shape bucket an arena was built for
        self.stats: Counter = Counter()     # arenas_built, graphs_captured, generations, examples, ...
        self.fuse = fuse
        self.on_fallback = on_fallback
        self.fallback: str | None = None    # why the graphs were given up (the guard), once
        self.check_replays = False          # test hook: run the guard in eager mode too
        self.replay_hook: Callable[[Tensor], Tensor] | None = None   # test hook: what a replay's tokens were

    # --- bookkeeping ---
    @property
    def graph_count(self) -> int:
        return sum(len(a.graphs) for a in list(self.arenas.values()))

    @property
    def last_arena(self) -> Arena | None:
        """The arena of the last generation, while the engine keeps it (a weak reference)."""
        return self._last() if self._last is not None else None

    @staticmethod
    def graph_bound(num_layers: int, batch: int) -> int:
        """At most: per layer one graph per row bucket, one for every row, one for no row; plus the
        step's start and end."""
        n_buckets = bucket(batch, 1 << 30).bit_length()
        return num_layers * (n_buckets + 2) + 2

    def shape_key(self, n: int, prompt_len: int, max_new: int, dtype: torch.dtype, device: torch.device,
                  owner: Any = None) -> tuple:
        """The arena a generation of n examples with prompts of prompt_len positions uses: rows to the next
        power of two, keys to the grid."""
        return (id(owner), bucket(n, 1 << 30), round_up(prompt_len + max_new, self.key_multiple), max_new,
                dtype, str(device))

    def arena(self, n: int, prompt_len: int, max_new: int, dtype: torch.dtype, device: torch.device,
              num_layers: int, text_cfg, owner: Any = None) -> Arena:
        """Checks out an idle arena of this shape bucket (built when there is none): busy until `give_back`."""
        key = self.shape_key(n, prompt_len, max_new, dtype, device, owner)
        with self._pool:
            serial = next((s for s, a in self.arenas.items() if a.key == key and not a.busy), None)
            if serial is not None:
                self.arenas.move_to_end(serial)
                a = self.arenas[serial]
                a.busy = True
                self.stats["arenas_reused"] += 1
                return a
            self._trim(room=1)               # the arena dropped for this one is freed before it is built
        _, B, K = key[:3]
        heads = text_cfg.num_attention_heads
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
        kv = getattr(text_cfg, "num_key_value_heads", None) or heads
        shape = (B, K, num_layers, text_cfg.hidden_size, kv, head_dim, dtype, device, max_new)
        try:
            a = Arena(*shape)
        except torch.OutOfMemoryError:
            log.warning("out of memory building an arena of %d rows x %d keys: dropping idle arenas, retrying", B, K)
            self.release_idle()
            a = Arena(*shape)                # a second failure is the caller's (a server splits the batch)
        a.key, a.busy = key, True
        with self._pool:
            self._serial += 1
            self.arenas[self._serial] = a
            self.stats["arenas_built"] += 1
            self._shapes.add(key)
            self.stats["shape_buckets"] = len(self._shapes)     # arenas_built == shape_buckets: no churn
            self._trim()
        return a

    def give_back(self, a: Arena) -> None:
        with self._pool:
            a.busy = False
            self._trim()

    def _trim(self, room: int = 0) -> None:
        """Drops least recently used idle arenas beyond max_arenas - room (busy ones are never dropped)."""
        idle = [s for s, a in self.arenas.items() if not a.busy]
        for serial in idle[:max(0, len(idle) - max(0, self.max_arenas - room))]:
            del self.arenas[serial]
            self.stats["arenas_dropped"] += 1

    def release_idle(self) -> int:
        """Drops every idle arena (their buffers and graphs), e.g. after running out of GPU memory."""
        with self._pool:
            idle = [s for s, a in self.arenas.items() if not a.busy]
            for serial in idle:
                del self.arenas[serial]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return len(idle)

    # --- the graphs ---
    def run(self, a: Arena, key: tuple, fn: Callable[[], None], layer: int | None = None,
            eager: bool = False) -> None:
        """Runs fn through its captured graph. At first use fn runs once for real (the warm-up capture
        needs) and is then captured, not replayed: a step's end advances positions and must run once.
        eager: run fn itself whatever the mode (the guard's check)."""
        if self.mode == "eager" or eager:
            fn()
            return
        g = a.graphs.get(key)
        if g is None:
            with _CAPTURE:
                self.capture(a, key, fn, layer)
            return
        if layer is not None and a.graph_records.get(key) is not None:
            a.records[layer] = a.graph_records[key]
        g.replay()

    def capture(self, a: Arena, key: tuple, fn: Callable[[], None], layer: int | None) -> None:
        """First use of a graph: the warm-up is this step's real run (on a side stream, as capture wants),
        then the capture, which records without executing: no replay now, so nothing runs twice."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        ran = a.records.get(layer) if layer is not None else None
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=a.pool):
            fn()
        a.graphs[key] = g
        self.stats["graphs_captured"] += 1
        if layer is not None:                            # the tensors replays write the records into
            a.graph_records[key] = a.records.get(layer)
            if ran is not None:
                a.records[layer] = ran                   # this step's records: the warm-up's

    def step_start(self, a: Arena, p: LayerProgram) -> None:
        """Embedding of the current token, its rotary embedding and the key mask, into buffers; the
        slot being written becomes readable."""
        B = a.B
        a.h[0][:B].copy_(p.embed(a.token[:, None]))
        cos, sin = p.rotary(a.h[0], a.pos[:, None])
        a.cos.copy_(cos)
        a.sin.copy_(sin)
        a.key_ok.index_fill_(1, a.slot, True)
        a.mask.copy_(additive_mask(a.key_ok[:, None, :], a.mask.dtype))

    def layer(self, a: Arena, p: LayerProgram, i: int, b: int) -> None:
        """Layer i on b rows: b = B every row (no gather), 0 none (stand-in only), else the first b of
        a.idx[i] (routed rows, then pads at the scratch row)."""
        B = a.B
        h_in, h_out = a.h[i % 2], a.h[(i + 1) % 2]
        if b == 0:
            h_out.copy_(p.stand_in(i)(h_in))
            return
        if b == -1:
            out = p.block(i, h_in[:B], a.mask[:B], (a.cos[:B], a.sin[:B]), a.cache)
            y, rec = out if isinstance(out, tuple) else (out, None)
            h_out[:B].copy_(y)
        else:
            idx = a.idx[i][:b]
            out = p.block(i, h_in.index_select(0, idx), a.mask.index_select(0, idx),
                          (a.cos.index_select(0, idx), a.sin.index_select(0, idx)), a.cache)
            y, rec = out if isinstance(out, tuple) else (out, None)
            stand_in = p.stand_in(i)
            h_out.copy_(stand_in(h_in) if stand_in is not None else h_in)
            h_out.index_copy_(0, idx, y)
        if rec is not None:
            a.records[i] = rec

    def step_end(self, a: Arena, p: LayerProgram, last: int) -> None:
        """Final norm + LM head + argmax of the last layer's output; the token, stop flags and output
        column of the next step, and positions advanced, all on the device."""
        B = a.B
        logits = p.final_logits(a.h[last % 2][:B, -1])
        self.accept(a, logits.argmax(-1))

    @staticmethod
    def accept(a: Arena, token: Tensor, advance: bool = True) -> None:
        """token (B,) is the next token: mark stops, write it into the output column, and (after a decode
        step) advance positions and the slot."""
        a.token.copy_(token)
        a.done.logical_or_((token[:, None] == a.stop[None, :]).any(-1))    # isin syncs on CUDA
        col = torch.where(a.done, torch.full_like(token, -1), token)
        a.out.index_copy_(1, a.step_i.clamp(max=a.max_new - 1), col[:, None])
        a.step_i.add_(1)
        if advance:
            a.pos.add_(1)
            a.slot.add_(1)

    # --- one generation ---
    @torch.inference_mode()
    def generate(self, program: LayerProgram, prefill: Callable[[Callable[[int], ArenaCache]], Prefilled],
                 batch_size: int, dtype: torch.dtype, device: torch.device, text_cfg, max_new_tokens: int,
                 stop_ids: set[int] | None, callback: Callable[[int, Tensor], None] | None = None
                 ) -> tuple[list[list[int]], Timing, Any, list[dict[int, tuple]]]:
        """Greedy decoding, token for token what runtime.generation.greedy gives with the system's own
        decode. prefill(cache_for) lays the prompt out, takes `cache_for(positions)` (the arena's cache
        for a prompt of that many positions) and runs the prompt writing its keys there. Returns (ids per
        example without the stop token, timing, the system's prefill state, per decode step the records
        each block returned (layer -> tensors))."""
        dev = torch.device(device)
        if self.mode == "graphs" and dev.type != "cuda":
            raise ValueError("mode 'graphs' needs a CUDA device; use mode='eager' on the CPU")
        return self._generate(program, prefill, batch_size, dtype, dev, text_cfg, max_new_tokens, stop_ids,
                              callback)

    def _generate(self, program, prefill, batch_size, dtype, dev, text_cfg, max_new_tokens, stop_ids, callback):
        if self.fuse:
            from .fused import fuse_program
            program = fuse_program(program, self.fuse)
        n, L = batch_size, program.num_layers
        max_new = max(1, max_new_tokens)
        arenas: list[Arena] = []

        def cache_for(positions: int) -> ArenaCache:
            a = self.arena(n, positions, max_new, dtype, dev, L, text_cfg, program.owner)
            arenas.append(a)
            a.reset(n)
            return a.cache

        try:
            return self._run(program, prefill, cache_for, arenas, n, L, dev, max_new_tokens, max_new, stop_ids,
                             callback)
        finally:
            for a in arenas:
                self.give_back(a)

    def _run(self, program, prefill, cache_for, arenas, n, L, dev, max_new_tokens, max_new, stop_ids, callback):
        t0 = time.perf_counter()
        pre = prefill(cache_for)
        if not arenas:
            raise RuntimeError("the system's prefill never asked for the engine's cache")
        a = arenas[-1]
        self._last = weakref.ref(a)
        self.stats["generations"] += 1
        self.stats["examples"] += n
        B = a.B
        stops = sorted(stop_ids or ())
        if len(stops) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop ids, not {len(stops)}")
        a.stop.fill_(-1)                                   # a buffer the captured graphs read: filled, not replaced
        if stops:
            a.stop[:len(stops)].copy_(torch.tensor(stops, dtype=torch.long))
        P = pre.key_ok.shape[1]
        a.key_ok[:n, :P].copy_(pre.key_ok)                 # pad and scratch rows read slot 0 (reset)
        a.pos[:n].copy_(pre.next_pos)
        a.slot.fill_(P)
        if a.cos is None:
            cos, sin = program.rotary(a.h[0], a.pos[:, None])
            a.cos, a.sin = torch.zeros_like(cos), torch.zeros_like(sin)
        plan = self.plan(a, pre.run, L)                    # the one host read of the route
        first = pre.logits.argmax(-1)
        if n < B:
            first = torch.cat([first, first.new_zeros(B - n)])
        self.accept(a, first, advance=False)
        sync(dev)
        t1 = time.perf_counter()

        on_gpu = dev.type == "cuda"
        lag = self.lag if on_gpu else 0
        flags = torch.zeros(max_new, dtype=torch.bool, pin_memory=on_gpu)
        toks = torch.zeros(max_new, B, dtype=torch.long, pin_memory=on_gpu)
        events: list[Any] = []
        records: list[dict[int, tuple]] = []
        delivered, stop_at = 0, None

        def publish(s: int) -> bool:
            """Step s's flags and tokens (copied when queued): True when every example had stopped
            before step s's token (greedy's break); else the callback sees step s."""
            if events[s] is not None:
                events[s].synchronize()
            if bool(flags[s]):
                return True
            if callback is not None:
                callback(s, toks[s][:n])
            return False

        for s in range(max_new_tokens):
            # a.token holds step s's token (a.out column s); flag: everyone stopped before it
            flags[s:s + 1].copy_(a.done.all().reshape(1), non_blocking=on_gpu)
            toks[s].copy_(a.token, non_blocking=on_gpu)
            ev = None
            if on_gpu:
                ev = torch.cuda.Event()
                ev.record()
            events.append(ev)
            if s + 1 < max_new_tokens:
                if not a.verified and (self.check_replays or self.replays(a, plan)):
                    self.guarded_step(a, program, plan)
                else:
                    self.decode_step(a, program, plan)
                records.append({i: tuple(t.clone() for t in r) for i, r in a.records.items()})
            while stop_at is None and delivered <= s - lag:          # read back `lag` steps behind
                if publish(delivered):
                    stop_at = delivered
                delivered += 1
            if stop_at is not None:
                break
        while stop_at is None and delivered < max_new_tokens:
            if publish(delivered):
                stop_at = delivered
            delivered += 1
        n_out = max_new_tokens if stop_at is None else stop_at
        sync(dev)
        timing = Timing(t1 - t0, time.perf_counter() - t1, n_out)
        ids = a.out[:n, :n_out].tolist() if n_out else [[] for _ in range(n)]
        fed = min(n_out, max_new_tokens - 1)
        return [[t for t in row if t >= 0] for row in ids], timing, pre.state, records[:max(0, fed)]

    def plan(self, a: Arena, run: Tensor | None, L: int) -> list[int]:
        """Per layer: -1 every row runs it (pad rows too), 0 none, else its row bucket (a.idx[i] filled
        with the real rows that run it, then the scratch row)."""
        B = a.B
        if run is None:
            return [-1] * L
        run_cpu = run.to("cpu", torch.bool)
        out = []
        for i in range(L):
            rows = run_cpu[:, i].nonzero().squeeze(1)
            n = rows.numel()
            if n == a.n:
                out.append(-1)
            elif n == 0:
                out.append(0)
            else:
                b = bucket(n, a.rows)
                idx = torch.full((a.rows,), B, dtype=torch.long)
                idx[:n] = rows
                a.idx[i].copy_(idx.to(a.idx[i].device), non_blocking=False)
                out.append(b)
        return out

    @staticmethod
    def step_keys(plan: list[int]) -> list[tuple]:
        return [("start",), *(("layer", i, b) for i, b in enumerate(plan)), ("end", len(plan))]

    def decode_step(self, a: Arena, p: LayerProgram, plan: list[int], eager: bool = False) -> None:
        self.run(a, ("start",), lambda: self.step_start(a, p), eager=eager)
        for i, b in enumerate(plan):
            self.run(a, ("layer", i, b), lambda i=i, b=b: self.layer(a, p, i, b), layer=i, eager=eager)
        self.run(a, ("end", len(plan)), lambda: self.step_end(a, p, len(plan)), eager=eager)

    # --- the graphs' guard ---
    def replays(self, a: Arena, plan: list[int]) -> bool:
        """Would this step replay captured graphs only (graphs mode, every graph of it captured)?"""
        return self.mode == "graphs" and all(k in a.graphs for k in self.step_keys(plan))

    def guarded_step(self, a: Arena, p: LayerProgram, plan: list[int]) -> None:
        """The arena's first replayed step, checked: run as usual (replays), its tokens kept aside, the
        arena's state put back, the step run again eagerly and the tokens compared. The eager step's
        state stays either way; on a mismatch the engine falls back to eager (`fall_back`)."""
        snap = a.snapshot()
        self.decode_step(a, p, plan)
        got = a.token[:a.n].clone()
        if self.replay_hook is not None:
            got = self.replay_hook(got)
        a.restore(snap)
        self.decode_step(a, p, plan, eager=True)
        a.verified = True
        want = a.token[:a.n]
        self.stats["steps_checked"] += 1
        if not torch.equal(got, want):
            bad = int((got != want).sum())
            self.fall_back(f"a replayed CUDA graph step gave {bad} of {a.n} tokens unlike the eager step "
                           f"(arena of {a.B} rows x {a.K} keys); decoding falls back to the eager engine")

    def fall_back(self, message: str) -> None:
        """Gives the graphs up for good: eager from now on, said once (log, `fallback`, on_fallback)."""
        self.mode = "eager"
        with self._pool:
            for a in self.arenas.values():
                a.graphs.clear()
                a.graph_records.clear()
        self.stats["fallbacks"] += 1
        if self.fallback is None:
            self.fallback = message
            log.warning("decode engine: %s", message)
            if self.on_fallback is not None:
                self.on_fallback(message)
