"""The routing systems, one file each, behind one interface (pipeline.py), listed once (registry.py):

    dense.py       the unmodified transformers model (the reference)
    roe.py         Routing Experts: per-example layer skipping (the method of this project)
    moe_llava.py   MoE-LLaVA: top-2 mixture of upcycled FFN experts in every other layer
    evomoe.py      EvoMoE: evolved experts and a top-1 Dynamic Token-aware Router (on MoE-LLaVA's machinery)
    trace.py       the Trace protocol every system's trace implements

    pipes = load_systems()                  # every registered system over one base, shared, each wrapping it
    pipes["roe"].answer(image, "How many circles are there?").trace.summary()
"""
from __future__ import annotations

from ..runtime.sources import LoadedBase, load_base
from . import registry
from ..runtime.loading import NotFittedError
from .pipeline import NOT_FITTED, Answer, ParamCounts, Pipeline, shipped_parts, shipped_systems
from .registry import SYSTEMS, SystemSpec
from .trace import Trace


def pipeline_class(system: str) -> type[Pipeline]:
    return registry.get(system).pipeline_class()


def load_system(system: str = "roe", model: str = "embedded", parts: str | None = None, device: str | None = "auto",
                dtype=None, seed: int = 0, fresh: bool = False) -> Pipeline:
    """One system over `model` ("embedded", "tiny", a folder or a hub id); parts: its folder (None: the
    model's shipped parts; else RoE and the fixed path are "not fitted", or untrained with fresh=True)."""
    return pipeline_class(system).load(model, parts, device, dtype, seed, fresh)


def load_systems(systems=None, model: str = "embedded", parts: dict[str, str] | None = None,
                 device: str | None = "auto", dtype=None, seed: int = 0, loaded: LoadedBase | None = None,
                 fresh: bool = False) -> dict[str, Pipeline]:
    """Several systems (default: every registered one) over one shared base (each wraps it without
    editing it). parts: {system: folder} for parts other than the shipped ones. fresh: untrained parts
    where none are found, asked for explicitly (tests, training); without it such systems are "not fitted"."""
    classes = {s: pipeline_class(s) for s in (systems or registry.names())}
    loaded = loaded or load_base(model, device, dtype, seed)
    return {s: cls.build(loaded, (parts or {}).get(s), seed, fresh) for s, cls in classes.items()}


__all__ = ["NOT_FITTED", "NotFittedError", "Answer", "LoadedBase", "ParamCounts", "Pipeline", "SYSTEMS", "SystemSpec", "Trace", "load_base",
           "load_system", "load_systems", "pipeline_class", "registry", "shipped_parts", "shipped_systems"]
