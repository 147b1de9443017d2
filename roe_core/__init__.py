"""RoE Explorer's library: Routing Experts (per-example layer skipping) over Hugging Face LLaVA models."""
from .conversation import ConversationEncoder, InputError
from .inference import RouteTrace, generate
from .loading import ModelLoadError
from .model import RoEConfig, RoEModel, Router, SkipAdapter
from .pipeline import Answer, RoEPipeline, SpeedComparison

__all__ = ["Answer", "ConversationEncoder", "InputError", "ModelLoadError", "RoEConfig", "RoEModel",
           "RoEPipeline", "RouteTrace", "Router", "SkipAdapter", "SpeedComparison", "generate"]
