"""Where base models come from. A model name is either a registered source ("embedded", "tiny") or a
Hugging Face LLaVA checkpoint (a local folder or a hub id). Sources register themselves
(`register_source`), so the core never imports them: `roe_core.embedded` registers "embedded" when the
package is imported (roe_core/__init__.py does), `runtime.tiny` registers "tiny".

A source may also have a parts root: the folder holding its shipped systems' parts, one subfolder per
system (the embedded model's assets/embedded/roe, .../moe_llava, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .loading import load_llava, pick_device, pick_dtype


@dataclass
class LoadedBase:
    """A LLaVA base with its tokenizer and image processor, shareable by several systems (each wraps it
    without editing it). parts_root: where its shipped parts live (None: it ships none)."""
    base: torch.nn.Module
    tokenizer: Any
    image_processor: Any
    info: dict
    parts_root: Path | None = None


@dataclass(frozen=True)
class ModelSource:
    name: str
    load: Callable[[torch.device, torch.dtype, int], LoadedBase]    # (device, dtype, seed) -> LoadedBase
    parts_root: Callable[[], Path | None] = lambda: None
    description: str = ""


SOURCES: dict[str, ModelSource] = {}


def register_source(source: ModelSource) -> ModelSource:
    SOURCES[source.name] = source
    return source


def parts_root(model: str) -> Path | None:
    """The parts root of a registered source (None for checkpoints and sources without shipped parts)."""
    src = SOURCES.get(model)
    return src.parts_root() if src is not None else None


def load_base(model: str = "embedded", device: str | None = "auto", dtype: str | torch.dtype | None = None,
              seed: int = 0) -> LoadedBase:
    """model: a registered source ("embedded", "tiny"), a local LLaVA folder or a hub id."""
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    src = SOURCES.get(model)
    if src is not None:
        loaded = src.load(dev, dt, seed)
        loaded.info.setdefault("model", model)
    else:
        base, tokenizer, image_processor = load_llava(model, dev, dt)
        loaded = LoadedBase(base, tokenizer, image_processor, {"model": model})
    loaded.base.eval()
    return loaded
