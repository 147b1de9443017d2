"""RoE Explorer's library: Routing Experts (per-example layer skipping) and its sibling systems over
Hugging Face LLaVA models.

    runtime/   what every system shares: conversations, images, model loading, decoder plumbing, decoding
    systems/   one file per routing system (roe.py, moe_llava.py, ...) and the one interface (pipeline.py)
    train/     one training loop (accelerate) and each system's objective
    embedded/  the embedded model: its base (registered as the model source "embedded") and its recipe
    scenes/    the data world: generated scenes, questions, answers, splits
    bench/     the benchmark
"""
from .runtime.conversation import ConversationEncoder, InputError
from .runtime.loading import ModelLoadError, NotFittedError
from .runtime import tiny as _tiny  # noqa: F401  (registers the model source "tiny")
from .systems import SYSTEMS, load_system, load_systems
from .systems.pipeline import Answer, Pipeline
from .systems.roe import (RoEConfig, RoEModel, RoEPipeline, Router, RouteTrace, SkipAdapter, SpeedComparison, generate,
                          parse_route)

__all__ = ["Answer", "ConversationEncoder", "InputError", "ModelLoadError", "NotFittedError", "Pipeline", "RoEConfig", "RoEModel",
           "RoEPipeline", "RouteTrace", "Router", "SYSTEMS", "SkipAdapter", "SpeedComparison", "generate", "parse_route",
           "load_system", "load_systems"]

from . import embedded as _embedded  # noqa: E402,F401  (registers the model source "embedded")
