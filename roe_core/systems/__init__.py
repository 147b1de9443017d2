"""The routing systems, one file each, behind one interface (pipeline.py):

    dense.py       the unmodified transformers model (the reference)
    roe.py         Routing Experts: per-example layer skipping (the method of this project)
    moe_llava.py   MoE-LLaVA: top-2 mixture of upcycled FFN experts in every other layer
    evomoe.py      EvoMoE: evolved experts and a top-1 Dynamic Token-aware Router (on MoE-LLaVA's machinery)

    pipes = load_systems(["dense", "roe", "moe_llava"])      # one base, shared, wrapped three times
    pipes["moe_llava"].answer(image, "How many circles are there?").trace
"""
from __future__ import annotations

from .pipeline import Answer, LoadedBase, ParamCounts, Pipeline, load_base

SYSTEMS = ("dense", "roe", "moe_llava", "evomoe")
LABELS = {"dense": "Dense", "roe": "RoE", "moe_llava": "MoE-LLaVA", "evomoe": "EvoMoE"}
MOE_SYSTEMS = ("moe_llava", "evomoe")


def pipeline_class(system: str) -> type[Pipeline]:
    if system == "dense":
        from .dense import DensePipeline
        return DensePipeline
    if system == "roe":
        from .roe import RoEPipeline
        return RoEPipeline
    if system == "moe_llava":
        from .moe_llava import MoELlavaPipeline
        return MoELlavaPipeline
    if system == "evomoe":
        from .evomoe import EvoMoEPipeline
        return EvoMoEPipeline
    raise ValueError(f"unknown system {system!r}: choose from {', '.join(SYSTEMS)}")


def shipped_systems(model: str = "embedded") -> list[str]:
    """Every system a model has parts for: the embedded model's shipped ones (dense always); any other
    model all of them (fresh parts, untrained, unless given)."""
    if model != "embedded":
        return list(SYSTEMS)
    from ..embedded.base import parts_folder
    return [s for s in SYSTEMS if s == "dense" or parts_folder(s) is not None]


def load_system(system: str = "roe", model: str = "embedded", parts: str | None = None, device: str | None = "auto",
                dtype=None, seed: int = 0) -> Pipeline:
    """One system over `model` ("embedded", "tiny", a folder or a hub id); parts: its folder (None: the
    embedded model's shipped parts, or fresh ones)."""
    return pipeline_class(system).load(model, parts, device, dtype, seed)


def load_systems(systems=SYSTEMS, model: str = "embedded", parts: dict[str, str] | None = None,
                 device: str | None = "auto", dtype=None, seed: int = 0, loaded: LoadedBase | None = None
                 ) -> dict[str, Pipeline]:
    """Several systems over one shared base (each wraps it without editing it)."""
    classes = {s: pipeline_class(s) for s in systems}
    loaded = loaded or load_base(model, device, dtype, seed)
    return {s: cls.from_base(loaded, (parts or {}).get(s), seed) for s, cls in classes.items()}


__all__ = ["Answer", "LABELS", "MOE_SYSTEMS", "LoadedBase", "ParamCounts", "Pipeline", "SYSTEMS", "load_base", "load_system",
           "load_systems", "pipeline_class", "shipped_systems"]
