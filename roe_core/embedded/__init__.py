"""The embedded default model: a genuine LLaVA built here from SmolLM2-135M-Instruct.

- `base.py`: assembling it (the cached decoder, the shipped vision tower, projector and LoRA) and
  where each system's shipped parts live (`load_embedded`, `build_base`, `convert`, `ASSETS`).
- `recipe.py`: how every part is trained, one resumable command per stage
  (`python -m roe_core.embedded <stage>`), and the validation-split evaluations and calibration.
"""
from .base import (ASSETS, IMAGE_TOKEN, STAGES, SYSTEM_PROMPT, TRAINED_ON, build_base, convert,  # noqa: F401
                   image_processor, image_size, load_embedded, make_encoder, vision_spec)
