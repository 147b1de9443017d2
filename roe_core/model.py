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
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

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
    """Linear(2d -> 2) on concat(image routing token, text routing token). Logit 0 = run, 1 = skip."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(2 * d, 2, bias=False)

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


class RoutedKVCache:
    """Keys/values per decoder layer. Layer i holds only the examples routed through it, in batch
    order, so a skipped layer holds nothing for that example. Routes never change after prefill,
    so each layer's batch stays the same size while decoding. With `capacity` (prompt + new tokens)
    each layer's buffer is allocated once at prefill and written in place, instead of re-copied
    at every step. Duck-types `Cache.update`."""

    def __init__(self, num_layers: int, capacity: int = 0):
        self.capacity = capacity
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        i, n, t = layer_idx, self.lengths[layer_idx], key.shape[-2]   # key: (b, kv_heads, t, head_dim)
        k_buf, v_buf = self.keys[i], self.values[i]
        if k_buf is None or n + t > k_buf.shape[-2]:
            size = max(self.capacity, n + t)
            new_k = key.new_empty(*key.shape[:2], size, key.shape[-1])
            new_v = value.new_empty(*value.shape[:2], size, value.shape[-1])
            if n:
                new_k[:, :, :n], new_v[:, :, :n] = k_buf[:, :, :n], v_buf[:, :, :n]
            self.keys[i], self.values[i] = k_buf, v_buf = new_k, new_v
        k_buf[:, :, n:n + t] = key
        v_buf[:, :, n:n + t] = value
        self.lengths[i] = n + t
        return k_buf[:, :, :n + t], v_buf[:, :, :n + t]

    def batch_size(self, layer_idx: int) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[0]

    def seq_length(self, layer_idx: int) -> int:
        return self.lengths[layer_idx]


def parts_config(base: nn.Module, config_cls, config=None, overrides: dict | None = None, what: str = "the"):
    """The config of parts added to `base` (RoE, MoE, ...): a new one naming the base and its decoder
    shape (plus `overrides`) when `config` is None; a ValueError when a given one was made for another shape."""
    text_cfg = base.config.text_config
    if config is None:
        config = config_cls(**{"base_model": str(getattr(base.config, "_name_or_path", "") or ""),
                               "num_layers": text_cfg.num_hidden_layers, "hidden_size": text_cfg.hidden_size,
                               **(overrides or {})})
    if config.num_layers != text_cfg.num_hidden_layers or config.hidden_size != text_cfg.hidden_size:
        raise ValueError(
            f"{what} parts were made for {config.num_layers} layers of width {config.hidden_size}; "
            f"the base model has {text_cfg.num_hidden_layers} layers of width {text_cfg.hidden_size}")
    return config


def embed_inputs(base: nn.Module, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
    """(B, S) ids -> (B, S, d) token embeddings with the projected image features in the image-token
    slots (LLaVA's merge), for any system that runs a LLaVA's decoder itself."""
    llava = base.model
    embeds = llava.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        feats = llava.get_image_features(pixel_values=pixel_values.to(embeds.dtype), return_dict=True)
        feats = torch.cat(list(feats.pooler_output), dim=0).to(embeds.dtype)
        slots = llava.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=feats)
        embeds = embeds.masked_scatter(slots, feats)
    return embeds


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, Q, K) bool -> (B, 1, Q, K) additive mask. finfo.min, not -inf: a fully masked row stays finite."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)[:, None]


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


@dataclass
class DecoderInputs:
    """One batch laid out for the decoder (see the module docstring)."""
    embeds: Tensor          # (B, R+S, d) routing tokens then ordinary tokens
    position_ids: Tensor    # (B, R+S)
    mask: Tensor            # (B, 1, R+S, R+S) additive
    key_ok: Tensor          # (B, R+S) bool: keys later ordinary tokens may read (not pads, not routing tokens)
    token_ok: Tensor        # (B, S) bool: real (non-pad) ordinary tokens
    num_routing: int        # R
    turn_ids: Tensor        # (B, S) long: -1 shared (system prompt, image, pads), t = turn t


class OverBase(nn.Module):
    """What every system wrapped around a LLaVA `base` (with `self.base` and `self.config`) reaches
    of it: its parts, never copies."""

    @property
    def lm(self) -> nn.Module:
        return self.base.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.layers

    @property
    def num_layers(self) -> int:
        return self.config.num_layers


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
        self.routers = nn.ModuleList(Router(d) for _ in range(config.num_layers))
        self.adapters = nn.ModuleList(SkipAdapter(d, config.adapter_rank, eps) for _ in range(config.num_layers))
        self.routing_tokens = nn.Parameter(torch.randn(2, d) * config.routing_token_std)  # [image, text]
        p = next(base.parameters())
        self.to(device=p.device, dtype=p.dtype)

    # --- checkpoints: only the RoE parts ---
    def roe_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def save_roe(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.roe_state_dict().items()},
                  str(folder / WEIGHTS_NAME))

    @classmethod
    def from_roe_folder(cls, base: nn.Module, folder: str | Path) -> "RoEModel":
        config = RoEConfig.load(folder)
        model = cls(base, config)
        weights = Path(folder, WEIGHTS_NAME)
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder!s}")
        state = load_file(str(weights))
        expected = set(model.roe_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"{weights} does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.load_state_dict(state, strict=False)
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

    def decide(self, i: int, h: Tensor, num_routing: int, threshold: float) -> tuple[Tensor, Tensor]:
        """Inference decision at prefill from the last turn's text routing token: (run (B,), p_run (B,))."""
        p_run = self.router_logits(i, h, num_routing)[:, -1].float().softmax(-1)[:, 0]
        return p_run > threshold, p_run

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
