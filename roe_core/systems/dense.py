"""The dense baseline: the unmodified transformers LLaVA model, every layer for every token.

Decoding calls the base model's own forward with its own KV cache (`DynamicCache`): nothing of
RoE's or the MoE systems' code runs, so it is the reference the others are measured against.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..runtime.conversation import Batch
from ..runtime.decoder import causal_layout
from ..runtime.engine import DecodeEngine, LayerProgram, Prefilled
from ..runtime.generation import Timing, greedy
from .pipeline import LoadedBase, ParamCounts, Pipeline


@dataclass
class DenseTrace:
    """What a dense answer did: every layer, for every token."""
    num_layers: int
    timing: Timing | None = None
    new_tokens: int = 0
    active_params: int = 0
    views: tuple[str, ...] = field(default=(), init=False, repr=False)

    @property
    def layers_executed(self) -> int:
        return self.num_layers

    @property
    def skip_ratio(self) -> float:
        return 0.0

    def summary(self) -> str:
        return f"all {self.num_layers} layers ran"

    def to_dict(self) -> dict:
        d = {"layers_executed": self.num_layers, "num_layers": self.num_layers, "skip_ratio": 0.0,
             "new_tokens": self.new_tokens, "active_params": self.active_params}
        if self.timing is not None:
            d["timing"] = self.timing.to_dict()
        return d


@dataclass
class DenseState:
    cache: object                   # the base's DynamicCache
    attention_mask: Tensor          # (B, K) 1 for real keys
    next_pos: Tensor                # (B,) position id of the next token


class DenseModel(nn.Module):
    """Greedy decoding of left-padded batches with the base model's own forward."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    @property
    def num_layers(self) -> int:
        return self.base.config.text_config.num_hidden_layers

    def prefill(self, batch: Batch, max_new_tokens: int = 0) -> tuple[Tensor, DenseState]:
        from transformers import DynamicCache
        mask = batch.token_ok.long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.base.config.text_config)
        out = self.base(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=mask,
                        position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], DenseState(out.past_key_values, mask, pos[:, -1] + 1)

    def decode_one_token(self, token: Tensor, state: DenseState) -> Tensor:
        state.attention_mask = torch.cat([state.attention_mask, torch.ones_like(state.attention_mask[:, :1])], 1)
        out = self.base(input_ids=token[:, None], attention_mask=state.attention_mask,
                        position_ids=state.next_pos[:, None], past_key_values=state.cache, use_cache=True)
        state.cache = out.past_key_values
        state.next_pos = state.next_pos + 1
        return out.logits[:, -1]

    # --- the decode engine's path: the base's own layers, called one by one over a static cache ---
    @property
    def lm(self) -> nn.Module:
        return self.base.model.language_model

    def layer_program(self) -> LayerProgram:
        lm = self.lm

        def block(i, h, mask, pos_emb, cache):
            return lm.layers[i](h, attention_mask=mask, position_embeddings=pos_emb, past_key_values=cache)
        return LayerProgram(self.num_layers, self.base.model.get_input_embeddings(),
                            lambda h, pos: lm.rotary_emb(h, position_ids=pos), block, lambda i: None,
                            lambda h: self.base.lm_head(lm.norm(h)), owner=self)

    def engine_prefill(self, b: Batch, cache_for) -> Prefilled:
        """The prompt through the base's layers one by one (the same computation as its forward, which
        the parity tests check), keys written into the engine's cache."""
        x = causal_layout(self.base, b.input_ids, b.token_ok, b.pixel_values)
        p = self.layer_program()
        cache = cache_for(x.embeds.shape[1])
        h, pos_emb = x.embeds, p.rotary(x.embeds, x.position_ids)
        for i in range(self.num_layers):
            h = p.block(i, h, x.mask, pos_emb, cache)
        return Prefilled(p.final_logits(h[:, -1]), x.key_ok, x.position_ids[:, -1] + 1, None)

    def engine_ready(self) -> bool:
        """The engine passes explicit masks: eager or sdpa attention (not flash kernels)."""
        return getattr(self.base.config.text_config, "_attn_implementation", None) in (None, "eager", "sdpa")

    @torch.inference_mode()
    def generate(self, batch: Batch, max_new_tokens: int = 32, stop_ids: set[int] | None = None,
                 callback=None, engine: DecodeEngine | None = None) -> tuple[list[list[int]], list[DenseTrace], Timing]:
        p = next(self.parameters())
        b = batch.to(p.device)
        if engine is not None and self.engine_ready():
            tokens, timing, _, _ = engine.generate(
                self.layer_program(), lambda cache_for: self.engine_prefill(b, cache_for), b.input_ids.shape[0],
                p.dtype, p.device, self.base.config.text_config, max_new_tokens, stop_ids, callback)
        else:
            tokens, timing, _ = greedy(lambda: self.prefill(b, max_new_tokens), self.decode_one_token,
                                       max_new_tokens, stop_ids, b.input_ids.device, callback)
        return tokens, [DenseTrace(self.num_layers, timing, len(t)) for t in tokens], timing


class DensePipeline(Pipeline):
    system = "dense"

    @classmethod
    def from_base(cls, loaded: LoadedBase, parts: str | None = None, seed: int = 0) -> "DensePipeline":
        pipe = cls(DenseModel(loaded.base), cls.make_encoder(loaded), cls.base_info(loaded))
        pipe.loaded = loaded
        return pipe

    def generate(self, batch, max_new_tokens: int, callback=None):
        return self.model.generate(batch, max_new_tokens, self.encoder.stop_ids, callback, self.engine)

    def parameter_counts(self, layers_executed: float | None = None) -> ParamCounts:
        return ParamCounts.of_dense(self.model.base)
