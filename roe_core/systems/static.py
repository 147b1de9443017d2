"""A fixed path: the same k decoder layers skipped for every input (static layer pruning), each replaced
by the same kind of adapter RoE uses (`SkipAdapter`). The baseline RoE's per-example routing has to beat.

Which layers: those whose output changes their input least over training examples, the quantity Fig. 1
of the RoE paper plots (`metric="l1"`: mean over real tokens of mean_j |h_out - h_in|_j) or ShortGPT's
Block Influence (`metric="cosine"`: 1 - cos(h_in, h_out)), measured with every layer running.

    scores = layer_scores(base, batches, "l1")       # (L,) over training examples
    model = StaticModel(base, skipped=lowest(scores, k), adapter_rank=144)
    python -m roe_core.train --system static ...     # chooses the layers, then trains the adapters

No routing tokens, no routers: the decoder sees exactly the base's sequence; with no layer skipped the
model computes what the base does.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from ..runtime.conversation import Batch
from ..runtime.decoder import DecoderInputs, OverBase, RoutedKVCache, additive_mask, causal_layout, parts_config
from ..runtime.engine import DecodeEngine, LayerProgram, Prefilled
from ..runtime.generation import Timing, greedy
from ..runtime.weights import packed_path, read_raw, weights_exist
from .trace import LayerRoute
from .pipeline import LoadedBase, ParamCounts, Pipeline, numel
from .roe import SkipAdapter

CONFIG_NAME = "static_config.json"
WEIGHTS_NAME = "static.safetensors"
METRICS = ("l1", "cosine")


@dataclass
class StaticConfig:
    base_model: str = ""
    num_layers: int = 0
    hidden_size: int = 0
    adapter_rank: int = 0                 # 0: hidden_size // 4, as RoE
    skipped: list[int] = field(default_factory=list)   # the layers every input skips, through their adapters
    metric: str = "l1"                    # how they were chosen (METRICS)
    layer_scores: list[float] = field(default_factory=list)   # the metric per layer that chose them
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.adapter_rank == 0 and self.hidden_size:
            self.adapter_rank = max(1, self.hidden_size // 4)
        if self.metric not in METRICS and not self.metric.startswith("fit:"):   # fit:<evidence>: roe_core.fit
            raise ValueError(f"metric must be one of {METRICS}, not {self.metric!r}")
        self.skipped = sorted(int(i) for i in self.skipped)

    def save(self, folder: str | Path) -> None:
        Path(folder, CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "StaticConfig":
        path = Path(folder, CONFIG_NAME)
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {folder!s}: not a static-path checkpoint folder")
        return cls(**json.loads(path.read_text()))


# --- choosing the layers -------------------------------------------------------------------------------------

def layer_change(h_out: Tensor, h_in: Tensor, token_ok: Tensor, metric: str = "l1") -> Tensor:
    """(B,) how much a layer changed its input, averaged over real tokens: Fig. 1's L1 or 1 - cosine."""
    if metric == "l1":
        d = (h_out - h_in).float().abs().mean(-1)                                 # (B, S)
    else:
        d = 1 - F.cosine_similarity(h_out.float(), h_in.float(), dim=-1)
    w = token_ok.float()
    return (d * w).sum(-1) / w.sum(-1).clamp(min=1)


@torch.inference_mode()
def layer_scores(base: nn.Module, batches, metric: str = "l1") -> list[float]:
    """Per decoder layer, the mean change it makes over the examples of `batches` (collated Batches),
    every layer running (the dense path)."""
    probe = StaticModel(base, skipped=[])
    total, n = torch.zeros(probe.num_layers, dtype=torch.float64), 0
    for b in batches:
        b = b.to(next(base.parameters()).device)
        x = probe.layout(b.input_ids, b.token_ok, b.pixel_values)
        h = x.embeds
        pos_emb = probe.lm.rotary_emb(h, position_ids=x.position_ids)
        for i in range(probe.num_layers):
            h_in, h = h, probe.layer(i, h, x.mask, pos_emb, None)
            total[i] += layer_change(h, h_in, x.token_ok, metric).double().sum().cpu()
        n += h.shape[0]
    return (total / max(1, n)).tolist()


def lowest_order(scores: list[float]) -> list[int]:
    """Every layer, the one that changes its input least first (ties: the earlier layer)."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def lowest(scores: list[float], k: int) -> list[int]:
    """The k layers that change their input least (ties: the earlier layer)."""
    if not 0 <= k <= len(scores):
        raise ValueError(f"k must be in 0..{len(scores)}, not {k}")
    return sorted(lowest_order(scores)[:k])


# --- the model -----------------------------------------------------------------------------------------------

@dataclass
class StaticTrace(LayerRoute):
    """What a static-path answer did: the same route for every input."""
    route: list[bool]                     # per layer: True = executed, False = its adapter stood in
    timing: Timing | None = None
    new_tokens: int = 0
    active_params: int = 0
    views: tuple[str, ...] = field(default=(), init=False, repr=False)

    def summary(self) -> str:
        return f"{self.layers_executed} of {self.num_layers} layers ran (the same for every input)"

    def to_dict(self) -> dict:
        d = {"route": self.route, "layers_executed": self.layers_executed, "num_layers": self.num_layers,
             "adapters_used": self.adapters_used, "skip_ratio": self.skip_ratio, "new_tokens": self.new_tokens,
             "active_params": self.active_params}
        if self.timing is not None:
            d["timing"] = self.timing.to_dict()
        return d


@dataclass
class StaticState:
    cache: RoutedKVCache
    key_ok: Tensor                  # (B, K) keys the next token may read
    next_pos: Tensor                # (B,)


class StaticModel(OverBase):
    """A LLaVA model whose `skipped` decoder layers are replaced by adapters for every input."""

    def __init__(self, base: nn.Module, config: StaticConfig | None = None, **overrides):
        super().__init__()
        text_cfg = base.config.text_config
        config = parts_config(base, StaticConfig, config, overrides, "static-path")
        bad = [i for i in config.skipped if not 0 <= i < config.num_layers]
        if bad:
            raise ValueError(f"skipped layers {bad} are outside 0..{config.num_layers - 1}")
        self.base = base
        self.config = config
        eps = getattr(text_cfg, "rms_norm_eps", 1e-6)
        self.adapters = nn.ModuleDict({str(i): SkipAdapter(config.hidden_size, config.adapter_rank, eps)
                                       for i in config.skipped})
        p = next(base.parameters())
        self.adapters.to(device=p.device, dtype=p.dtype)

    @property
    def route(self) -> list[bool]:
        return [str(i) not in self.adapters for i in range(self.num_layers)]

    # --- checkpoints: the adapters only ---
    def static_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("adapters.")}

    def save_static(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        save_file({k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in self.static_state_dict().items()},
                  str(folder / WEIGHTS_NAME))
        packed_path(folder / WEIGHTS_NAME).unlink(missing_ok=True)    # a packed copy of older weights: stale

    @classmethod
    def from_static_folder(cls, base: nn.Module, folder: str | Path) -> "StaticModel":
        model = cls(base, StaticConfig.load(folder))
        weights = Path(folder, WEIGHTS_NAME)
        if not weights_exist(weights):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder!s}")
        state = read_raw(weights)
        expected = set(model.static_state_dict())
        if set(state) != expected:
            raise ValueError(f"{weights} does not match its config: missing {sorted(expected - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - expected)[:5]}")
        model.load_state_dict(state, strict=False)
        return model

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    # --- the decoder ---
    def layout(self, input_ids: Tensor, token_ok: Tensor, pixel_values: Tensor | None = None,
               turn_ids: Tensor | None = None) -> DecoderInputs:
        return causal_layout(self.base, input_ids, token_ok, pixel_values, turn_ids)

    def layer(self, i: int, h: Tensor, mask: Tensor, pos_emb: tuple[Tensor, Tensor],
              cache: RoutedKVCache | None, every_layer: bool = False) -> Tensor:
        """h (B, S, d) through layer i, or through its adapter where the layer is skipped (unless
        every_layer: the dense path, a teacher for distillation)."""
        if str(i) in self.adapters and not every_layer:
            return self.adapters[str(i)](h)
        return self.layers[i](h, attention_mask=mask, position_embeddings=pos_emb, past_key_values=cache)

    def decoder(self, x: DecoderInputs, cache: RoutedKVCache | None = None, every_layer: bool = False) -> Tensor:
        h = x.embeds
        pos_emb = self.lm.rotary_emb(h, position_ids=x.position_ids)
        for i in range(self.num_layers):
            h = self.layer(i, h, x.mask, pos_emb, cache, every_layer)
        return h

    def final_logits(self, h: Tensor) -> Tensor:
        return self.base.lm_head(self.lm.norm(h))

    def forward(self, input_ids: Tensor, token_ok: Tensor, pixel_values: Tensor | None = None,
                logits_at: Tensor | None = None) -> Tensor:
        """Training / scoring forward of a left-padded batch: logits (B, S, V), or (n, V) at logits_at."""
        h = self.decoder(self.layout(input_ids, token_ok, pixel_values))
        return self.final_logits(h[logits_at] if logits_at is not None else h)

    # --- inference ---
    def prefill(self, x: DecoderInputs, max_new_tokens: int = 0, cache=None) -> tuple[Tensor, StaticState]:
        if cache is None:
            cache = RoutedKVCache(self.num_layers, capacity=x.embeds.shape[1] + max_new_tokens)
        h = self.decoder(x, cache)
        return self.final_logits(h[:, -1]), StaticState(cache, x.key_ok, x.position_ids[:, -1] + 1)

    def decode_one_token(self, token: Tensor, state: StaticState) -> Tensor:
        h = self.base.model.get_input_embeddings()(token[:, None])                 # (B, 1, d)
        state.key_ok = torch.cat([state.key_ok, torch.ones_like(state.key_ok[:, :1])], dim=1)
        mask = additive_mask(state.key_ok[:, None, :], h.dtype)                    # (B, 1, 1, K)
        pos_emb = self.lm.rotary_emb(h, position_ids=state.next_pos[:, None])
        for i in range(self.num_layers):
            h = self.layer(i, h, mask, pos_emb, state.cache)
        state.next_pos = state.next_pos + 1
        return self.final_logits(h[:, -1])

    def layer_program(self) -> LayerProgram:
        """For the decode engine: the kept layers on every row, the skipped ones' adapters instead."""
        def block(i, h, mask, pos_emb, cache):
            return self.layers[i](h, attention_mask=mask, position_embeddings=pos_emb, past_key_values=cache)
        return LayerProgram(self.num_layers, self.base.model.get_input_embeddings(),
                            lambda h, pos: self.lm.rotary_emb(h, position_ids=pos), block,
                            lambda i: self.adapters[str(i)] if str(i) in self.adapters else None, self.final_logits,
                            owner=self)

    @torch.inference_mode()
    def generate(self, batch: Batch, max_new_tokens: int = 32, stop_ids: set[int] | None = None,
                 callback=None, engine: DecodeEngine | None = None) -> tuple[list[list[int]], list[StaticTrace], Timing]:
        p = next(self.parameters())
        b = batch.to(p.device)
        layout = lambda: self.layout(b.input_ids, b.token_ok, b.pixel_values, b.turn_ids)   # noqa: E731
        if engine is not None:
            B = b.input_ids.shape[0]
            run = torch.tensor(self.route, dtype=torch.bool, device=p.device)[None].expand(B, -1)

            def pre(cache_for):
                x = layout()
                logits, st = self.prefill(x, max_new_tokens, cache=cache_for(x.embeds.shape[1]))
                return Prefilled(logits, x.key_ok, x.position_ids[:, -1] + 1, run, st)
            tokens, timing, _, _ = engine.generate(self.layer_program(), pre, B, p.dtype, p.device,
                                                   self.base.config.text_config, max_new_tokens, stop_ids, callback)
        else:
            tokens, timing, _ = greedy(lambda: self.prefill(layout(), max_new_tokens), self.decode_one_token,
                                       max_new_tokens, stop_ids, b.input_ids.device, callback)
        route = self.route
        return tokens, [StaticTrace(list(route), timing, len(t)) for t in tokens], timing


def static_lm_loss(model: StaticModel, batch: Batch, distill: float = 0.0) -> dict[str, Tensor]:
    """Token-mean CE on answer tokens through the static path (the LM head only where an answer token is
    predicted); distill > 0 adds distill x KL(p_dense || p_static) over the same tokens, the every-layer
    path as teacher (no gradient), as RoE's refine does."""
    target = batch.answer_mask[:, 1:]                                            # (B, S-1)
    at = F.pad(target, (0, 1))                                                   # (B, S): predicting positions
    x = model.layout(batch.input_ids, batch.token_ok, batch.pixel_values)
    logits = model.final_logits(model.decoder(x)[at])
    ce = F.cross_entropy(logits.float(), batch.input_ids[:, 1:][target])
    out = {"loss": ce, "ce": ce.detach()}
    if distill > 0:
        with torch.no_grad():
            logp_dense = F.log_softmax(model.final_logits(model.decoder(x, every_layer=True)[at]).float(), -1)
        kl = F.kl_div(F.log_softmax(logits.float(), -1), logp_dense, log_target=True, reduction="batchmean")
        out["loss"] = ce + distill * kl
        out["kl"] = kl.detach()
    return out


# --- the pipeline ----------------------------------------------------------------------------------------------

class StaticPipeline(Pipeline):
    """The fixed path. Over a base without its parts it is "not fitted" (needs_fit) and answers nothing."""
    system = "static"
    refuses_untrained = True

    @classmethod
    def from_base(cls, loaded: LoadedBase, parts: str | None = None, seed: int = 0,
                  fresh: bool = False) -> "StaticPipeline":
        return cls.with_parts(loaded, parts, seed, StaticModel.from_static_folder, lambda base: StaticModel(base),
                              "untrained (no layer skipped: the dense model)", asked_fresh=fresh)

    def generate(self, batch, max_new_tokens: int, callback=None):
        self.require_fitted()
        return self.model.generate(batch, max_new_tokens, self.encoder.stop_ids, callback, self.engine)

    def skip_order(self) -> list[int] | None:
        """Every layer, least changing first (the order `lowest` picks from); None without measured scores."""
        scores = self.model.config.layer_scores
        return lowest_order(scores) if scores else None

    def parameter_counts(self, layers_executed: float | None = None) -> ParamCounts:
        """Total: the base + the adapters. Active per token: the layers run plus the adapters of the others."""
        dense = ParamCounts.of_dense(self.model.base)
        adapters = numel(self.model.adapter_parameters())
        skipped = len(self.model.config.skipped)
        layer = numel(self.model.layers[0].parameters())
        active = dense.decoder_total - skipped * layer + adapters
        return ParamCounts(dense.vision, dense.projector, dense.decoder_total + adapters, active)
