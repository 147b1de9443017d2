"""Routing Experts (RoE) over any Hugging Face LLaVA model.

The base `LlavaForConditionalGeneration` is wrapped, never edited: its decoder layers are called one
by one from here, and beside each one sit a `Router` (run or skip, decided from the two routing
tokens) and a `SkipAdapter` (the cheap path that stands in for a skipped layer).

Sequence layout inside the decoder, for a batch of B examples with T turns each:

    [img_rt, txt_rt_0 .. txt_rt_{T-1}, ordinary tokens (left padded) ...]
     `---------- R = 1 + T ---------'  `------------ S --------------'

Routing tokens have position id 0 and attend only to what they route on (image routing token: the
system prompt + image; text routing token t: question t). No ordinary token attends to a routing
token, so with every layer running the ordinary tokens compute exactly what the base model does.

Inference under RoE: prefill decides each example's route, decoding keeps it.

    prefill(model, x, route)        -> logits of the last token, DecodeState (route, cache, trace)
    decode_one_token(model, tok, s) -> logits of the next token
    generate(model, batch, ...)     -> token ids + per-example route traces

A route is "auto" (the routers decide at prefill), "dense" (every layer), or explicit booleans per
layer (one list for the whole batch, or a (B, L) tensor). A skipped layer is skipped for every
token of that answer, holds no KV cache, and its adapter stands in.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime.conversation import Batch, InputError
from ..runtime.decoder import DecoderInputs, OverBase, RoutedKVCache, additive_mask, embed_inputs, parts_config
from ..runtime.engine import DecodeEngine, LayerProgram, Prefilled
from ..runtime.generation import Timing, greedy
from ..runtime.weights import load_tensors, save_tensors, weights_exist
from .route_guard import RouteGuard
from .trace import LayerRoute
from .pipeline import Answer, History, LoadedBase, ParamCounts, Pipeline, numel

CONFIG_NAME = "roe_config.json"
WEIGHTS_NAME = "roe.safetensors"


@dataclass
class RoEConfig:
    base_model: str = ""             # local folder or hub id of the LLaVA model these parts belong to
    num_layers: int = 0              # decoder layers of the base model (each gets a router + adapter)
    hidden_size: int = 0
    adapter_rank: int = 0            # r of the adapter; 0 means hidden_size // 4 (the release's ratio)
    rho: float = 0.3                 # target skip ratio of the sparsity hinge
    routing_token_std: float = 0.1   # routing tokens ~ N(0, std)
    threshold: float = 0.5           # inference: run a layer iff p_run > threshold (0.5: logit_run > logit_skip)
    router_bias: bool = False        # routers with a bias (fitted parts, roe_core.fit: an offset per layer); trained: none
    extra: dict = field(default_factory=dict)  # free-form provenance (training data, steps, ...)

    def __post_init__(self):
        if self.adapter_rank == 0 and self.hidden_size:
            self.adapter_rank = max(1, self.hidden_size // 4)

    def save(self, folder: str | Path) -> None:
        Path(folder, CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "RoEConfig":
        path = Path(folder, CONFIG_NAME)
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {folder!s}: not an RoE checkpoint folder")
        return cls(**json.loads(path.read_text()))


class Router(nn.Module):
    """Linear(2d -> 2) on concat(image routing token, text routing token). Logit 0 = run, 1 = skip.
    bias: fitted routers (roe_core.fit) carry a per-layer offset; the method's trained routers have none."""

    def __init__(self, d: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(2 * d, 2, bias=bias)

    def forward(self, h_img: Tensor, h_txt: Tensor) -> Tensor:
        return self.proj(torch.cat([h_img, h_txt], dim=-1))  # (..., 2)


class SkipAdapter(nn.Module):
    """x + B(ReLU(A(norm(x)))): replaces a whole decoder block (attention + MLP) when it is skipped."""

    def __init__(self, d: int, r: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=eps)
        self.down = nn.Linear(d, r, bias=False)
        self.up = nn.Linear(r, d, bias=False)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.xavier_uniform_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(F.relu(self.down(self.norm(x))))


@dataclass
class LayerPlan:
    """Which examples of the batch run layer i. idx_* are None when all (or none) run it."""
    n_run: int
    n: int
    idx_run: Tensor | None = None
    idx_skip: Tensor | None = None

    @classmethod
    def from_run(cls, run: Tensor) -> "LayerPlan":
        n_run, n = int(run.sum()), run.numel()
        if 0 < n_run < n:
            return cls(n_run, n, run.nonzero().squeeze(1), (~run).nonzero().squeeze(1))
        return cls(n_run, n)


class RoEModel(OverBase):
    """A LLaVA model with a router, a skip adapter per decoder layer and two routing tokens."""

    def __init__(self, base: nn.Module, config: RoEConfig | None = None, **overrides):
        super().__init__()
        text_cfg = base.config.text_config
        config = parts_config(base, RoEConfig, config, overrides, "RoE")
        impl = getattr(text_cfg, "_attn_implementation", None)
        if impl not in (None, "eager", "sdpa"):
            # Flash kernels take no arbitrary masks; routing tokens need one.
            base.set_attn_implementation("sdpa")
        self.base = base
        self.config = config
        d, eps = config.hidden_size, getattr(text_cfg, "rms_norm_eps", 1e-6)
        self.routers = nn.ModuleList(Router(d, config.router_bias) for _ in range(config.num_layers))
        self.adapters = nn.ModuleList(SkipAdapter(d, config.adapter_rank, eps) for _ in range(config.num_layers))
        self.routing_tokens = nn.Parameter(torch.randn(2, d) * config.routing_token_std)  # [image, text]
        self.guard = None               # route_guard.RouteGuard: run a layer whose router input is unlike training
        self.guard_recorder = None      # RouteGuard.fit: per layer, the router inputs seen
        p = next(base.parameters())
        self.to(device=p.device, dtype=p.dtype)

    # --- checkpoints: only the RoE parts ---
    def roe_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def save_roe(self, folder: str | Path, ship: bool = False) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        # ship=False (checkpoints): fp32, lossless; ship=True (assets/): bf16 (runtime.weights)
        save_tensors(self.roe_state_dict(), folder / WEIGHTS_NAME, keep_fp32=lambda name: not ship)
        if self.guard is not None:
            self.guard.save(folder)

    @classmethod
    def from_roe_folder(cls, base: nn.Module, folder: str | Path) -> "RoEModel":
        config = RoEConfig.load(folder)
        model = cls(base, config)
        weights = Path(folder, WEIGHTS_NAME)
        if not weights_exist(weights):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder!s}")
        state = load_tensors(weights)
        expected = set(model.roe_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"{weights} does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.load_state_dict(state, strict=False)
        model.guard = RouteGuard.load(folder)
        return model

    def roe_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    # --- inputs ---
    def embed(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        return embed_inputs(self.base, input_ids, pixel_values)

    def layout(
        self,
        input_ids: Tensor,            # (B, S) left padded
        token_ok: Tensor,             # (B, S) bool
        turn_ids: Tensor,             # (B, S) -1 shared, t = turn t
        image_keys: Tensor,           # (B, S) bool: what the image routing token reads
        question_keys: Tensor,        # (B, T, S) bool: what text routing token t reads
        pixel_values: Tensor | None,
    ) -> DecoderInputs:
        B, S = input_ids.shape
        T = question_keys.shape[1]
        R = 1 + T
        dev = input_ids.device
        ordinary = self.embed(input_ids, pixel_values)                                   # (B, S, d)
        img_rt, txt_rt = self.routing_tokens[0], self.routing_tokens[1]
        rt = torch.cat([img_rt[None], txt_rt[None].expand(T, -1)])[None].expand(B, -1, -1)
        embeds = torch.cat([rt.to(ordinary.dtype), ordinary], dim=1)                     # (B, R+S, d)

        pos = (token_ok.long().cumsum(-1) - 1).clamp(min=0)
        position_ids = torch.cat([torch.zeros(B, R, dtype=torch.long, device=dev), pos], dim=1)

        allowed = torch.zeros(B, R + S, R + S, dtype=torch.bool, device=dev)
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        allowed[:, R:, R:] = causal & token_ok[:, None, :]
        allowed[:, 0, R:] = image_keys
        allowed[:, 1:R, R:] = question_keys
        eye = torch.arange(R + S, device=dev)
        allowed[:, eye, eye] = True   # everyone sees itself: pad rows and unused routing tokens stay finite
        key_ok = torch.cat([torch.zeros(B, R, dtype=torch.bool, device=dev), token_ok], dim=1)
        return DecoderInputs(embeds, position_ids, additive_mask(allowed, embeds.dtype), key_ok,
                             token_ok, R, turn_ids)

    # --- routing ---
    def router_logits(self, i: int, h: Tensor, num_routing: int) -> Tensor:
        """Router i on the routing tokens, read after layer i's input norm. (B, T, 2) [run, skip]."""
        rt = self.layers[i].input_layernorm(h[:, :num_routing])    # (B, R, d)
        T = num_routing - 1
        return self.routers[i](rt[:, :1].expand(-1, T, -1), rt[:, 1:])

    def run_layer(self, i: int, h: Tensor, mask: Tensor, pos_emb: tuple[Tensor, Tensor],
                  cache: RoutedKVCache | None) -> Tensor:
        return self.layers[i](h, attention_mask=mask, position_embeddings=pos_emb, past_key_values=cache)

    def routed_layer(self, i: int, h: Tensor, plan: LayerPlan, mask: Tensor, pos_emb: tuple[Tensor, Tensor],
                     cache: RoutedKVCache | None) -> Tensor:
        """Layer i under a hard route: the examples routed through it run the layer, the others its
        adapter. Only routed examples enter the layer (gather/scatter), so a mixed batch costs what
        its examples cost alone, and the layer's cache holds only them."""
        if plan.n_run == plan.n:
            return self.run_layer(i, h, mask, pos_emb, cache)
        if plan.n_run == 0:
            return self.adapters[i](h)
        r, s = plan.idx_run, plan.idx_skip
        cos, sin = pos_emb
        out = torch.empty_like(h)
        out[r] = self.run_layer(i, h[r], mask[r], (cos[r], sin[r]), cache)
        out[s] = self.adapters[i](h[s])
        return out

    def decide(self, i: int, h: Tensor, num_routing: int, threshold: float | None = None,
               forced: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Layer i's decision at prefill, the one place it is made: (run (B,), p_run (B,)). The router reads
        the last turn's text routing token and runs the layer iff p_run > threshold (None: the parts'
        own); a forced route (B, L) wins over it."""
        p_run = self.router_logits(i, h, num_routing)[:, -1].float().softmax(-1)[:, 0]
        if forced is not None:
            return forced[:, i], p_run
        run = p_run > self.threshold_or(threshold)
        guarded = self.guard is not None and self.guard.tau is not None
        if guarded or self.guard_recorder is not None:
            x = RouteGuard.features(self, i, h, num_routing)
            if self.guard_recorder is not None:
                self.guard_recorder[i].append(x.cpu())
            if guarded:
                run = run | self.guard.trips(i, x)
        return run, p_run

    def threshold_or(self, threshold: float | None) -> float:
        """The threshold to use: the one given, else the parts' calibrated default (roe_config.json)."""
        return self.config.threshold if threshold is None else threshold

    def final_logits(self, h: Tensor) -> Tensor:
        return self.base.lm_head(self.lm.norm(h))

    def rotary(self, h: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.lm.rotary_emb(h, position_ids=position_ids)

    # --- training forward: soft mixing of both paths ---
    def soft_forward(self, x: DecoderInputs, route_weights) -> tuple[Tensor, Tensor, Tensor]:
        """Runs every layer and every adapter and mixes them: out = w_run * layer(h) + w_skip * adapter(h).

        route_weights(i, logits (B, T, 2)) -> w_skip (B, T) gives each turn's skip weight at layer i
        (the schedule: random hard routes, annealed softmax, ...). Each turn's weight applies to that
        turn's tokens; shared tokens (system prompt, image) and the image routing token take the mean
        over the example's turns. Returns (final hidden states of ordinary tokens (B, S, d),
        skip weights (B, L, T))."""
        h = x.embeds
        R, B = x.num_routing, h.shape[0]
        T = R - 1
        pos_emb = self.rotary(h, x.position_ids)
        # (B, R+S, T) token-to-turn assignment; shared tokens spread evenly over the example's turns
        turn_valid = torch.zeros(B, T, dtype=h.dtype, device=h.device)
        turn_valid.scatter_(1, x.turn_ids.clamp(min=0), 1.0)   # turn 0 always exists
        turn_valid[:, 0] = 1.0
        own = F.one_hot(x.turn_ids.clamp(min=0), T).to(h.dtype)
        shared = turn_valid / turn_valid.sum(-1, keepdim=True)
        assign_ord = torch.where((x.turn_ids >= 0)[..., None], own, shared[:, None, :])     # (B, S, T)
        assign_rt = torch.cat([shared[:, None], torch.eye(T, dtype=h.dtype, device=h.device)[None].expand(B, -1, -1)], 1)
        assign = torch.cat([assign_rt, assign_ord], dim=1)                                   # (B, R+S, T)
        skips = []
        for i in range(self.num_layers):
            w_skip = route_weights(i, self.router_logits(i, h, R))                             # (B, T)
            w_tok = (assign @ w_skip.to(h.dtype)[..., None])                                   # (B, R+S, 1)
            h = (1 - w_tok) * self.run_layer(i, h, x.mask, pos_emb, None) + w_tok * self.adapters[i](h)
            skips.append(w_skip)
        return self.lm.norm(h[:, R:]), torch.stack(skips, dim=1), turn_valid


# --- inference: prefill decides each example's route, decoding keeps it ---------------------------------

Route = str | list[bool] | Tensor


@dataclass
class DecodeState:
    run: Tensor                     # (B, L) bool: the route, fixed at prefill
    plans: list[LayerPlan]
    cache: RoutedKVCache
    key_ok: Tensor                  # (B, K) bool: keys new tokens may read
    next_pos: Tensor                # (B,) position id of the next token
    p_run: Tensor                   # (B, L) router's run probability at prefill
    l1: Tensor | None = None        # (B, L) per-layer L1 distance at prefill (when traced)


def parse_route(route, num_layers: int | None = None) -> str | list[bool]:
    """A route as people and APIs write it: "auto" (the routers decide), "dense" (every layer), or booleans
    / 0-1, one per decoder layer, as a list or its JSON text. InputError (a ValueError) says what is expected."""
    route = (route or "auto") if isinstance(route, str) else route
    if isinstance(route, str) and route.strip() in ("auto", "dense"):
        return route.strip()
    want = f"{num_layers} " if num_layers else ""
    usage = (f'route should be "auto" (the router decides), "dense" (every layer) or a JSON list of {want}'
             "booleans, one per decoder layer (true: run it, false: skip it through its adapter)")
    items = route
    if isinstance(route, str):
        try:
            items = json.loads(route)
        except json.JSONDecodeError:
            raise InputError(f"{usage}; got {route[:60]!r}") from None
    if isinstance(items, Tensor):
        items = items.tolist()
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, (bool, int)) and x in (0, 1) for x in items):
        raise InputError(f"{usage}; got {str(route)[:60]!r}")
    if num_layers and len(items) != num_layers:
        raise InputError(f"{usage}; got a list of {len(items)}")
    return [bool(x) for x in items]


def forced_route(route: Route, batch_size: int, num_layers: int, device) -> Tensor | None:
    """None for "auto"; else a (B, L) bool tensor: one route for every example, or one per example.
    Raises ValueError (InputError) on malformed routes."""
    if isinstance(route, str):
        if route not in ("auto", "dense"):
            raise InputError(f"route must be 'auto', 'dense' or a list of {num_layers} booleans, not {route!r}")
        if route == "auto":
            return None
        if route == "dense":
            return torch.ones(batch_size, num_layers, dtype=torch.bool, device=device)
    run = torch.as_tensor(route, dtype=torch.bool, device=device)
    if run.dim() == 1:
        run = torch.as_tensor(parse_route(route, num_layers), dtype=torch.bool, device=device)[None].expand(batch_size, -1)
    if run.shape != (batch_size, num_layers):
        raise InputError(f"a forced route needs {num_layers} booleans per example, got shape {tuple(run.shape)}")
    return run


def layer_l1(h_out: Tensor, h_in: Tensor, token_ok: Tensor, R: int) -> Tensor:
    """Fig. 1 of the paper: mean over real tokens of mean_j |h_out - h_in|_j. (B,)"""
    d = (h_out[:, R:] - h_in[:, R:]).float().abs().mean(-1)      # (B, S)
    w = token_ok.float()
    return (d * w).sum(-1) / w.sum(-1).clamp(min=1)


def prefill(model: RoEModel, x: DecoderInputs, route: Route = "auto", threshold: float | None = None,
            trace_l1: bool = False, max_new_tokens: int = 0,
            between_layers: Callable[[], object] | None = None, cache=None) -> tuple[Tensor, DecodeState]:
    """Runs the prompt, deciding each example's route layer by layer. Returns (last logits (B, V), state).
    between_layers() is called after every layer (a server's checkpoint: a prefill is the longest step).
    cache: where keys go (default a RoutedKVCache; the decode engine passes its arena's)."""
    h = x.embeds
    B, L, R = h.shape[0], model.num_layers, x.num_routing
    threshold = model.threshold_or(threshold)
    forced = forced_route(route, B, L, h.device)
    if cache is None:
        cache = RoutedKVCache(L, capacity=h.shape[1] + max_new_tokens)
    pos_emb = model.rotary(h, x.position_ids)
    runs, probs, plans, l1s = [], [], [], []
    for i in range(L):
        run, p_run = model.decide(i, h, R, threshold, forced)
        plan = LayerPlan.from_run(run)
        h_in = h
        h = model.routed_layer(i, h, plan, x.mask, pos_emb, cache)
        if trace_l1:
            l1s.append(layer_l1(h, h_in, x.token_ok, R))
        runs.append(run)
        probs.append(p_run)
        plans.append(plan)
        if between_layers is not None:
            between_layers()
    logits = model.final_logits(h[:, -1])
    state = DecodeState(
        run=torch.stack(runs, 1), plans=plans, cache=cache, key_ok=x.key_ok,
        next_pos=x.position_ids[:, -1] + 1, p_run=torch.stack(probs, 1),
        l1=torch.stack(l1s, 1) if trace_l1 else None,
    )
    return logits, state


def decode_one_token(model: RoEModel, token: Tensor, state: DecodeState) -> Tensor:
    """One new token per example (B,) through the route fixed at prefill. Returns logits (B, V)."""
    h = model.base.model.get_input_embeddings()(token[:, None])               # (B, 1, d)
    pos = state.next_pos[:, None]
    state.key_ok = torch.cat([state.key_ok, torch.ones_like(state.key_ok[:, :1])], dim=1)
    mask = additive_mask(state.key_ok[:, None, :], h.dtype)                   # (B, 1, 1, K)
    pos_emb = model.rotary(h, pos)
    for i in range(model.num_layers):
        h = model.routed_layer(i, h, state.plans[i], mask, pos_emb, state.cache)
    state.next_pos = state.next_pos + 1
    return model.final_logits(h[:, -1])


@dataclass
class RouteTrace(LayerRoute):
    """What one answer did: its route, the routers' view, the features' change, its cost."""
    route: list[bool]                     # per layer: True = executed, False = skipped via adapter
    p_run: list[float]                    # router's probability of running each layer (at prefill)
    route_mode: str                       # "auto", "dense" or "forced"
    threshold: float
    l1: list[float] | None = None         # per-layer L1 distance on the path taken
    l1_dense: list[float] | None = None   # the same with every layer executed
    timing: Timing | None = None
    new_tokens: int = 0
    active_params: int = 0
    views: tuple[str, ...] = field(default=("route",), init=False, repr=False)

    def summary(self) -> str:
        n = len(self.adapters_used)
        return (f"{self.layers_executed} of {self.num_layers} layers ran, {n} adapter{'' if n == 1 else 's'} "
                f"stood in")

    @property
    def guarded(self) -> list[int]:
        """Layers that ran although their router said skip: the route guard found the input unlike training."""
        if self.route_mode != "auto":
            return []
        return [i for i, (r, p) in enumerate(zip(self.route, self.p_run)) if r and p <= self.threshold]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("route", "p_run", "route_mode", "threshold", "l1", "l1_dense",
                                          "new_tokens", "layers_executed", "num_layers", "adapters_used",
                                          "skip_ratio", "active_params", "guarded")}
        if self.timing is not None:
            d["timing"] = self.timing.to_dict()
        return d


@dataclass
class Generation:
    tokens: list[list[int]]               # generated ids per example (stop token excluded)
    traces: list[RouteTrace] = field(default_factory=list)
    timing: Timing | None = None


def layout_batch(model: RoEModel, batch: Batch) -> DecoderInputs:
    """Moves a collated batch to the model's device and lays it out for the decoder."""
    b = batch.to(next(model.parameters()).device)
    return model.layout(b.input_ids, b.token_ok, b.turn_ids, b.image_keys, b.question_keys, b.pixel_values)


def layer_program(model: RoEModel) -> LayerProgram:
    """RoE for the decode engine: layer i on the rows routed through it, its adapter on the others."""
    return LayerProgram(model.num_layers, model.base.model.get_input_embeddings(), model.rotary,
                        model.run_layer, lambda i: model.adapters[i], model.final_logits, owner=model)


@torch.inference_mode()
def generate(model: RoEModel, batch: Batch, route: Route = "auto", max_new_tokens: int = 32,
             stop_ids: set[int] | None = None, threshold: float | None = None, trace_l1: bool = False,
             callback=None, between_layers: Callable[[], object] | None = None,
             engine: DecodeEngine | None = None) -> Generation:
    """Greedy decoding of a batch under RoE. callback(step, tokens (B,)) streams each new token;
    between_layers() runs after each layer of the prefill. engine: decode through the static-shape
    engine (runtime.engine) instead of the eager loop; the same tokens."""
    threshold = model.threshold_or(threshold)
    p = next(model.parameters())
    if engine is not None:
        def pre(cache_for):
            x = layout_batch(model, batch)
            logits, st = prefill(model, x, route, threshold, trace_l1, max_new_tokens, between_layers,
                                 cache=cache_for(x.embeds.shape[1]))
            return Prefilled(logits, x.key_ok, x.position_ids[:, -1] + 1, st.run, st)
        tokens, timing, state, _ = engine.generate(
            layer_program(model), pre, batch.input_ids.shape[0], p.dtype, p.device, model.base.config.text_config,
            max_new_tokens, stop_ids, callback)
    else:
        tokens, timing, state = greedy(
            lambda: prefill(model, layout_batch(model, batch), route, threshold, trace_l1, max_new_tokens,
                            between_layers),
            lambda token, st: decode_one_token(model, token, st),
            max_new_tokens, stop_ids, p.device, callback)
    mode = route if isinstance(route, str) else "forced"
    B = len(tokens)
    run, p_run = state.run.tolist(), state.p_run.float().tolist()
    l1 = state.l1.tolist() if state.l1 is not None else [None] * B
    traces = [RouteTrace(run[b], p_run[b], mode, threshold, l1[b], timing=timing, new_tokens=len(tokens[b]))
              for b in range(B)]
    return Generation(tokens, traces, timing)


@torch.inference_mode()
def prefill_l1(model: RoEModel, batch: Batch, route: Route = "dense", between_layers=None) -> Tensor:
    """Per-layer L1 distances (B, L) of one prefill under `route` (the dense path by default)."""
    x = layout_batch(model, batch)
    _, state = prefill(model, x, route, trace_l1=True, between_layers=between_layers)
    return state.l1


@torch.inference_mode()
def all_logits(model: RoEModel, batch: Batch, route: Route = "dense") -> Tensor:
    """Logits of every ordinary position (B, S, V) under a route: for parity tests and scoring."""
    x = layout_batch(model, batch)
    h = x.embeds
    forced = forced_route(route, h.shape[0], model.num_layers, h.device)
    pos_emb = model.rotary(h, x.position_ids)
    for i in range(model.num_layers):
        run = model.decide(i, h, x.num_routing, None, forced)[0]
        h = model.routed_layer(i, h, LayerPlan.from_run(run), x.mask, pos_emb, None)
    return model.final_logits(h[:, x.num_routing:])


def timed_generate(model: RoEModel, batch: Batch, route: Route, max_new_tokens: int, stop_ids: set[int] | None,
                   threshold: float | None = None, checkpoint: Callable[[], bool] | None = None,
                   engine: DecodeEngine | None = None) -> float:
    """Seconds of one greedy generation. checkpoint() runs after every prefill layer and token (a server
    lets other work run there) and returns True when it paused: such a run is run again, at most twice,
    so the time is this generation's own."""
    for _ in range(3):
        paused = [False]

        def watch(*_):
            paused[0] |= bool(checkpoint())
        t0 = time.perf_counter()
        generate(model, batch, route, max_new_tokens, stop_ids, threshold,
                 callback=None if checkpoint is None else watch, between_layers=None if checkpoint is None else watch,
                 engine=engine)
        secs = time.perf_counter() - t0
        if not paused[0]:
            break
    return secs


# --- the pipeline: RoE behind the one interface ------------------------------------------------------------

@dataclass
class SpeedComparison:
    """The same turn answered with the route and with every layer, timed in interleaved repeats."""
    roe: Answer
    dense: Answer
    roe_s: float                  # median seconds (prefill + whole answer)
    dense_s: float
    repeats: int
    roe_times: list[float] = field(default_factory=list)
    dense_times: list[float] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.dense_s / self.roe_s if self.roe_s > 0 else float("nan")


class RoEPipeline(Pipeline):
    """RoE over a LLaVA base. Options of generate/answer: route ("auto", "dense" or booleans per layer),
    threshold (run a layer iff p_run > it; default the parts' config), trace_l1. Over a base without
    RoE parts it is "not fitted" (needs_fit): only the every-layer route is answered."""
    system = "roe"
    refuses_untrained = True

    @property
    def threshold(self) -> float:
        """The routers' default threshold (run a layer iff p_run > it), from the RoE parts' config."""
        return self.model.config.threshold

    @classmethod
    def from_base(cls, loaded: LoadedBase, parts: str | None = None, seed: int = 0,
                  fresh: bool = False) -> "RoEPipeline":
        """parts None and no shipped ones: "not fitted", or fresh untrained parts with fresh=True."""
        return cls.with_parts(loaded, parts, seed, RoEModel.from_roe_folder, RoEModel,
                              "untrained (fresh routers and adapters)", asked_fresh=fresh)

    @classmethod
    def load(cls, model: str = "embedded", roe: str | None = None, device: str | None = "auto",
             dtype: str | torch.dtype | None = None, seed: int = 0, fresh: bool = False) -> "RoEPipeline":
        """model: "embedded" (shipped), "tiny" (random, for tests), a local folder or a hub id.
        roe: an RoE folder (roe_config.json + roe.safetensors); None = the embedded model's own
        parts; for any other model "not fitted" (only every layer answers), or fresh untrained parts
        with fresh=True (to train from)."""
        return super().load(model, roe, device, dtype, seed, fresh)

    def generate(self, batch, max_new_tokens: int, callback=None, route: Route = "auto",
                 threshold: float | None = None, trace_l1: bool = False, between_layers=None):
        every_layer = route == "dense" if isinstance(route, str) else bool(torch.as_tensor(route).all())
        self.require_fitted(every_layer)
        gen = generate(self.model, batch, route, max_new_tokens, self.encoder.stop_ids, threshold,
                       trace_l1=trace_l1, callback=callback, between_layers=between_layers, engine=self.engine)
        if self.needs_fit:          # no router was fitted: its probabilities mean nothing
            for t in gen.traces:
                t.p_run = [None] * len(t.p_run)
        return gen.tokens, gen.traces, gen.timing

    def parameter_counts(self, layers_executed: float | None = None) -> ParamCounts:
        """Total: the base + routers, routing tokens and adapters. Active per token: with
        `layers_executed` (a mean over examples) the executed layers plus the adapters standing in for
        the others, plus the routers; else every layer (the dense path)."""
        dense = ParamCounts.of_dense(self.model.base)
        parts = numel(self.model.roe_parameters())
        L = self.model.num_layers
        if layers_executed is None:
            active = dense.decoder_total + numel(self.model.routers.parameters())
        else:
            layer = numel(self.model.layers[0].parameters())
            adapter = numel(self.model.adapters[0].parameters())
            skipped = L - layers_executed
            active = (dense.decoder_total - skipped * layer + skipped * adapter
                      + numel(self.model.routers.parameters()))
        return ParamCounts(dense.vision, dense.projector, dense.decoder_total + parts, int(round(active)))

    # --- answering: the base's keywords, plus RoE's own (route, threshold, trace_l1, dense_l1, between_layers) ---
    def answer(self, image, question: str, history: History = (), *, max_new_tokens: int = 48,
               on_token: Callable[[str], None] | None = None, route: Route = "auto",
               threshold: float | None = None, trace_l1: bool = True, dense_l1: bool = True, **options) -> Answer:
        """Answers one question about one image. The route is decided on this question alone and held
        for the whole answer (a forced route: booleans per layer). on_token(text_so_far) streams it.
        By default the trace has both L1 curves (the path taken and the dense path)."""
        return super().answer(image, question, history, max_new_tokens=max_new_tokens, on_token=on_token,
                              route=route, threshold=threshold, trace_l1=trace_l1, dense_l1=dense_l1, **options)

    def answer_batch(self, items: Sequence, *, max_new_tokens: int = 48,
                     on_token: Callable[[str], None] | None = None, on_step: Callable | None = None,
                     route: Route = "auto", threshold: float | None = None, trace_l1: bool = False,
                     dense_l1: bool = False, between_layers: Callable[[], object] | None = None) -> list[Answer]:
        """items: [(image, question, history)] or Prepared ones. Examples in one batch may take different
        routes. between_layers() runs after each prefill layer (a server's checkpoint); dense_l1 adds the
        every-layer path's L1 curve to each trace (one more prefill)."""
        if not items:
            return []
        batch = self.batch(items)
        answers = self.answer_collated(items, batch, max_new_tokens=max_new_tokens, on_token=on_token,
                                       on_step=on_step, route=route, threshold=threshold, trace_l1=trace_l1,
                                       between_layers=between_layers)
        if dense_l1:
            for ans, row in zip(answers, prefill_l1(self.model, batch, "dense", between_layers).tolist()):
                ans.trace.l1_dense = row
        return answers

    def compare(self, image, question: str, history: History = (), route: Route = "auto",
                threshold: float | None = None, max_new_tokens: int = 48, repeats: int = 3,
                checkpoint: Callable[[], bool] | None = None) -> SpeedComparison:
        """Times this turn with its route and densely, interleaved (RoE, dense, RoE, dense, ...) after
        one untimed warm-up of each; medians. Also returns both answers.

        checkpoint() is called after every prefill layer and every token (a server lets other work run
        there): it returns True when it paused, and a timed run that was paused is run again
        (timed_generate), so a measurement never counts someone else's time. It may raise to stop it."""
        items = [self.prepare(image, question, history)]
        step = None if checkpoint is None else (lambda s, t: checkpoint())
        roe = self.answer_batch(items, route=route, threshold=threshold, max_new_tokens=max_new_tokens,
                                trace_l1=True, dense_l1=True, on_step=step, between_layers=checkpoint)[0]
        dense = self.answer_batch(items, route="dense", threshold=threshold, max_new_tokens=max_new_tokens,
                                  trace_l1=True, on_step=step, between_layers=checkpoint)[0]
        batch = self.batch(items)
        roe_t, dense_t = [], []
        for _ in range(max(1, repeats)):
            for r, out in ((route, roe_t), ("dense", dense_t)):
                out.append(timed_generate(self.model, batch, r, max_new_tokens, self.encoder.stop_ids, threshold,
                                          checkpoint, self.engine))
        dense.trace.l1_dense = dense.trace.l1
        return SpeedComparison(roe, dense, statistics.median(roe_t), statistics.median(dense_t),
                               repeats, roe_t, dense_t)
