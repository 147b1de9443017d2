"""Training: one loop for every system (`loop.fit`, on accelerate) and each system's objective.

    loop.py        fit(model, objective, ...), LlavaJsonDataset, resumable safetensors checkpoints
    roe.py         RoE's three stages: TrainConfig, RouteSchedule, roe_loss, train(...)
    moe_llava.py   MoE-LLaVA's MoE-tuning: MoETuneConfig, train_moe_llava(...)

    python -m roe_core.train --help          (accelerate launch -m roe_core.train ... on several devices)
"""
from .loop import LlavaJsonDataset, LoopConfig, fit  # noqa: F401
from .roe import RouteSchedule, TrainConfig, roe_loss, set_trainable, train  # noqa: F401
