"""Storing and loading parts tensors (safetensors only), the one place their precision is decided.

    save_tensors(state, path)                                       # bf16 (the default)
    save_tensors(state, path, keep_fp32=lambda n: ".router." in n)  # those names stay fp32
    save_tensors(state, path, fp8=lambda n: ".delta." in n)         # float8_e4m3fn + a per-row bf16 scale
    state = load_tensors(path)                                      # fp8 entries come back as bf16

- bf16: every floating-point tensor not named otherwise (non-float tensors are stored as they are);
- keep_fp32(name): stored as float32 (lossless for fp32 and bf16 tensors);
- fp8(name): stored as float8_e4m3fn, row-wise scaled: scale = max|row| / 448 (the format's largest
  value), rounded to bf16 and stored beside it under `<name>.fp8_scale` (shape: the tensor's with its
  last dimension 1), q = clamp(x / scale, -448, 448). Per element |x - q * scale| <= 16 * scale (half a
  step in the top binade), and at most 1/16 of |x| above the subnormal range. keep_fp32 wins over fp8.

load_tensors returns a plain safetensors file's tensors unchanged (in their stored dtypes), and fp8
entries dequantised (q * scale in fp32, then bf16) under their own names; the scale entries are consumed.
Loaders copy the result into their parameters (load_state_dict casts to the parameters' dtype).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                 # torch.finfo(torch.float8_e4m3fn).max
SCALE_SUFFIX = ".fp8_scale"


def _never(name: str) -> bool:
    return False


def quantise_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """(q float8_e4m3fn, scale bf16 with x's shape but a last dimension of 1): x ~ q * scale per row."""
    x = x.detach().float()
    amax = x.abs().amax(dim=-1, keepdim=True) if x.dim() else x.abs()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(torch.bfloat16)
    q = (x / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantise_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    return (q.float() * scale.float()).to(dtype)


def save_tensors(tensors: dict[str, Tensor], path: str | Path, keep_fp32: Callable[[str], bool] = _never,
                 fp8: Callable[[str], bool] = _never) -> None:
    """Writes `tensors` to `path` (safetensors): bf16 by default, fp32 where keep_fp32(name), fp8 with a
    per-row scale where fp8(name). Written to a temporary file first, then moved into place."""
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"{name!r}: names ending in {SCALE_SUFFIX!r} are reserved for fp8 scales")
        if not t.is_floating_point():
            out[name] = t.contiguous()
        elif keep_fp32(name):
            out[name] = t.float().contiguous()
        elif fp8(name):
            q, scale = quantise_fp8(t)
            out[name], out[name + SCALE_SUFFIX] = q.contiguous(), scale.contiguous()
        else:
            out[name] = t.to(torch.bfloat16).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp))
    tmp.replace(path)


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file as stored, fp8 entries dequantised to bf16 (their scales consumed)."""
    raw = load_file(str(path))
    out = {}
    for name, t in raw.items():
        if name.endswith(SCALE_SUFFIX) and raw.get(name[: -len(SCALE_SUFFIX)], t).dtype == FP8:
            continue
        if t.dtype == FP8:
            scale = raw.get(name + SCALE_SUFFIX)
            if scale is None:
                raise ValueError(f"{path}: fp8 tensor {name!r} has no {name + SCALE_SUFFIX!r}")
            t = dequantise_fp8(t, scale)
        out[name] = t
    return out


def stored_dtypes(path: str | Path) -> dict[str, str]:
    """{name: safetensors dtype as stored ("F32", "BF16", "F8_E4M3", ...)} of a file, scales included."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}
