"""Loading base LLaVA models: a local folder, a hub id, the shipped embedded model, or a tiny random one."""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch


class ModelLoadError(RuntimeError):
    """A model or RoE folder could not be loaded; the message says why and what to do."""


class NotFittedError(RuntimeError):
    """A routed answer was asked of a system whose parts were never fitted nor trained (a base that ships
    none, loaded without a parts folder): its routers and adapters would be noise, so it refuses. Every
    layer run (RoE's route "dense") is still answered. The message says how to get parts."""

    def __init__(self, label: str, flag: str = "--roe"):
        self.label = label
        super().__init__(
            f"{label} is not fitted for this model: it ships no {label} parts, and untrained ones would give "
            f"noise. Fit them (the app's Fit tab, or python -m roe_core.fit) or load a parts folder "
            f"({flag} <folder>)")


def pick_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for, but no CUDA GPU is available")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless told."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ModelLoadError(f"unknown dtype {dtype!r}") from None
    return dtype


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Elsewhere (AVX2 only) torch
    emulates bf16 matmuls: a finetune step that takes 5 s in fp32 takes minutes under bf16 autocast."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def train_autocast(device: str = "cpu"):
    """bf16 autocast where bf16 is fast (a GPU, or a CPU with native bf16), else fp32 (a no-op context)."""
    if device == "cuda" or cpu_bf16_is_fast():
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_llava(name: str, device: torch.device, dtype: torch.dtype):
    """(LlavaForConditionalGeneration, tokenizer, image_processor) from a local folder or hub id."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    path = Path(name).expanduser()
    if not path.exists() and not looks_like_hub_id(name):
        raise ModelLoadError(f"model path {name!r} does not exist (and is not a hub id like 'llava-hf/llava-1.5-7b-hf')")
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{name!r} has no config.json: not a Hugging Face model folder")
    src = str(path) if path.exists() else name
    try:
        model = LlavaForConditionalGeneration.from_pretrained(src, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(src)
        image_processor = AutoImageProcessor.from_pretrained(src, backend="pil")
    except OSError as e:   # no network, missing files, gated repo...
        raise ModelLoadError(f"could not load {name!r}: {e}") from e
    return model.to(device).eval(), tokenizer, image_processor
