"""Decoder plumbing every routing system shares: the systems wrap a LLaVA `base` and call its decoder
layers themselves, so they share how inputs are embedded and laid out, how masks are built, the KV
cache that holds only the examples a layer ran, and how parts added to a base check their config."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


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
class DecoderInputs:
    """One batch laid out for the decoder (see the module docstring)."""
    embeds: Tensor          # (B, R+S, d) routing tokens then ordinary tokens
    position_ids: Tensor    # (B, R+S)
    mask: Tensor            # (B, 1, R+S, R+S) additive
    key_ok: Tensor          # (B, R+S) bool: keys later ordinary tokens may read (not pads, not routing tokens)
    token_ok: Tensor        # (B, S) bool: real (non-pad) ordinary tokens
    num_routing: int        # R
    turn_ids: Tensor        # (B, S) long: -1 shared (system prompt, image, pads), t = turn t
    token_image: Tensor | None = None   # (B, S) bool: image-feature slots (systems that route by modality)


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




def causal_layout(base: nn.Module, input_ids: Tensor, token_ok: Tensor, pixel_values: Tensor | None = None,
                  turn_ids: Tensor | None = None) -> DecoderInputs:
    """A left-padded batch (B, S) laid out for a decoder without routing tokens: embeddings, positions
    counting real tokens only, a causal mask over real keys (num_routing = 0), image slots marked."""
    B, S = input_ids.shape
    dev = input_ids.device
    embeds = embed_inputs(base, input_ids, pixel_values)                       # (B, S, d)
    position_ids = (token_ok.long().cumsum(-1) - 1).clamp(min=0)
    allowed = torch.ones(S, S, dtype=torch.bool, device=dev).tril() & token_ok[:, None, :]
    eye = torch.arange(S, device=dev)
    allowed[:, eye, eye] = True   # pad rows see themselves: they stay finite
    if turn_ids is None:
        turn_ids = torch.full_like(input_ids, -1)
    return DecoderInputs(embeds, position_ids, additive_mask(allowed, embeds.dtype), token_ok.bool(),
                         token_ok.bool(), 0, turn_ids, input_ids == base.config.image_token_id)
