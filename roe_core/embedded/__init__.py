"""The embedded default model: a genuine LLaVA built here from SmolLM2-135M-Instruct.

- `base.py`: assembling it (the cached decoder, the shipped vision tower, projector and LoRA) and
  where each system's shipped parts live (`load_embedded`, `build_base`, `convert`, `ASSETS`).
- how every part is trained, one resumable command per stage (`python -m roe_core.embedded <stage>`,
  `cli.py`), each stage on `roe_core.train.loop.fit`: `data.py` (pixel caches, vision targets, the
  datasets), `vision.py` (the ViT alone), `stages.py` (align, finetune), `routing.py` (RoE, refine,
  MoE-LLaVA, EvoMoE), `calibrate.py` (validation checks, the router threshold), `probes.py`.
"""
from .base import (ASSETS, IMAGE_TOKEN, STAGES, SYSTEM_PROMPT, TRAINED_ON, build_base, convert,  # noqa: F401
                   image_processor, image_size, load_embedded, make_encoder, vision_spec)
