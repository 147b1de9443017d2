"""The only list of routing systems. Everything that loads, trains, benchmarks or shows a system looks
it up here; adding a system is its own files (systems/<name>.py, train/<name>.py) plus one entry below.

    from roe_core.systems.registry import SYSTEMS, get
    spec = get("roe")
    spec.label, spec.parts_folder, spec.pipeline_class(), spec.trace_views

A spec names its classes as "module:attribute" strings, imported on first use, so reading the registry
imports no system (and the app can list systems before any model loads).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SystemSpec:
    name: str                               # the key everywhere: CLI flags, API, results ("roe")
    label: str                              # what people read ("RoE")
    pipeline: str                           # "module:Class" of its Pipeline subclass
    parts_folder: str | None = None         # its parts' folder inside a model source's parts root ("roe")
    parts_config: str | None = None         # the config file that marks that folder complete
    config: str | None = None               # "module:Class" of its parts' config dataclass
    trainer: str | None = None              # module whose main(argv) trains its parts (python -m roe_core.train)
    moe: bool = False                       # a mixture of experts (expert statistics apply)
    options: tuple[str, ...] = ()           # answer() keywords beyond the base's, e.g. ("route", "threshold")
    trace_views: tuple[str, ...] = ()       # what its trace offers the app: "route" (a route per layer), "experts"
    summary: str = ""                       # one line: what the system does
    # its paper's own head-to-head figures: {"source": str, "versus": {other system: {"accuracy_points": this
    # minus that, "speedup": this / that, "examples_per_s": [this, that]}}}; the bench prints them beside its own
    paper: dict = field(default_factory=dict, compare=False)

    def pipeline_class(self):
        return _resolve(self.pipeline)

    def config_class(self):
        return _resolve(self.config) if self.config else None

    def trainer_main(self):
        if not self.trainer:
            raise ValueError(f"{self.label} has no parts to train")
        return importlib.import_module(self.trainer).main

    @property
    def has_parts(self) -> bool:
        return self.parts_folder is not None

    @property
    def routed(self) -> bool:
        """Takes a route and a router threshold (layer skipping decided per example)."""
        return "route" in self.options


def _resolve(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


SYSTEMS: dict[str, SystemSpec] = {}


def register(spec: SystemSpec) -> SystemSpec:
    if spec.name in SYSTEMS and SYSTEMS[spec.name] != spec:
        raise ValueError(f"a system named {spec.name!r} is already registered")
    SYSTEMS[spec.name] = spec
    return spec


def get(name: str) -> SystemSpec:
    try:
        return SYSTEMS[name]
    except KeyError:
        raise ValueError(f"unknown system {name!r}: choose from {', '.join(SYSTEMS)}") from None


def names() -> tuple[str, ...]:
    return tuple(SYSTEMS)


def label(name: str) -> str:
    return SYSTEMS[name].label if name in SYSTEMS else name


def moe_systems() -> tuple[str, ...]:
    return tuple(n for n, s in SYSTEMS.items() if s.moe)


# --- the entries -----------------------------------------------------------------------------------------

register(SystemSpec(
    "dense", "Dense", "roe_core.systems.dense:DensePipeline",
    summary="the unmodified transformers model: every layer for every token (the reference)"))
register(SystemSpec(
    "roe", "RoE", "roe_core.systems.roe:RoEPipeline", parts_folder="roe", parts_config="roe_config.json",
    config="roe_core.systems.roe:RoEConfig", trainer="roe_core.train.roe",
    options=("route", "threshold", "trace_l1", "dense_l1", "between_layers"), trace_views=("route",),
    summary="Routing Experts: per-example layer skipping, an adapter standing in for each skipped layer",
    paper={"source": "the RoE paper (ICLR 2025), Table 2 / Fig. 1: RoE-LLaVA-HR vs MoE-LLaVA, 5 benchmarks",
           "versus": {"moe_llava": {"accuracy_points": 3.3, "speedup": 1.61, "examples_per_s": [6.77, 4.95]}}}))
register(SystemSpec(
    "moe_llava", "MoE-LLaVA", "roe_core.systems.moe_llava:MoELlavaPipeline", parts_folder="moe_llava",
    parts_config="moe_config.json", config="roe_core.systems.moe_llava:MoELlavaConfig",
    trainer="roe_core.train.moe_llava", moe=True, trace_views=("experts",),
    summary="top-2 of 4 upcycled FFN experts in every other layer",
    paper={"source": "EvoMoE (AAAI-26) on MoE-LLaVA: shuffling its router logits at eval costs nothing",
           "shuffled_routers_loss_points": 0.0}))
register(SystemSpec(
    "evomoe", "EvoMoE", "roe_core.systems.evomoe:EvoMoEPipeline", parts_folder="evomoe",
    parts_config="evomoe_config.json", config="roe_core.systems.evomoe:EvoMoEConfig",
    trainer="roe_core.train.evomoe", moe=True, trace_views=("experts",),
    summary="evolved experts and a top-1 Dynamic Token-aware Router",
    paper={"source": "the EvoMoE paper (AAAI-26); its ablation on Qwen-1.8B, average: dense 65.4, MoE-tuning 65.5, "
                     "+ DTR 66.0, evolution + linear router 66.3, evolution + DTR 66.5",
           "versus": {"moe_llava": {"accuracy_points": 1.0}}}))
register(SystemSpec(
    "static", "Static", "roe_core.systems.static:StaticPipeline", parts_folder="static",
    parts_config="static_config.json", config="roe_core.systems.static:StaticConfig",
    trainer="roe_core.train.static",
    summary="a fixed path: the same k layers skipped for every input (those that change their input least)"))
