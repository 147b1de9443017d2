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

Shipped files may be stored packed: `pack_file(path)` replaces `x.safetensors` by `x.safetensors.xz`, the
same bytes xz-compressed (bf16 weights shrink to ~70%: their sign and exponent bytes repeat). Every reader
here takes the plain name and reads whichever of the two exists (`stored(path)`, `weights_exist(path)`):
the packed bytes are decompressed in memory and parsed by safetensors (`safetensors.torch.load`), never
unpickled.
"""
from __future__ import annotations

import json
import lzma
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load as load_bytes, load_file, save_file
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                 # torch.finfo(torch.float8_e4m3fn).max
SCALE_SUFFIX = ".fp8_scale"
PACKED_SUFFIX = ".xz"           # pack_file: the same safetensors bytes, xz-compressed


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
    packed_path(path).unlink(missing_ok=True)     # a packed copy of the old tensors (pack_file) is stale now


def packed_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + PACKED_SUFFIX)


def stored(path: str | Path) -> Path:
    """The file that holds `path`'s tensors: `path` itself, or its packed twin (`<path>.xz`) where only that
    exists (`path` again when neither does, for the caller's error message)."""
    path = Path(path)
    return packed_path(path) if not path.is_file() and packed_path(path).is_file() else path


def weights_exist(path: str | Path) -> bool:
    """Whether `path` or its packed twin exists."""
    return stored(path).is_file()


def pack_file(path: str | Path) -> Path:
    """Replaces the safetensors file `path` by `<path>.xz` (lossless: xz of the same bytes). Returns it."""
    path = Path(path)
    packed = packed_path(path)
    tmp = packed.with_name(packed.name + ".tmp")
    tmp.write_bytes(lzma.compress(path.read_bytes(), preset=9))
    tmp.replace(packed)
    path.unlink()
    return packed


def read_raw(path: str | Path) -> dict[str, Tensor]:
    """A safetensors file's tensors as stored (safetensors' load_file), from `path` or its packed twin."""
    f = stored(path)
    if f.name.endswith(PACKED_SUFFIX):
        return load_bytes(lzma.decompress(f.read_bytes()))
    return load_file(str(f))


def _packed_header(f: Path) -> dict:
    """The JSON header of a packed safetensors file (8 bytes of little-endian length, then the JSON)."""
    data = lzma.decompress(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (from `path` or its packed twin), {} when none."""
    f = stored(path)
    if f.name.endswith(PACKED_SUFFIX):
        return _packed_header(f).get("__metadata__") or {}
    from safetensors import safe_open
    with safe_open(str(f), framework="pt") as h:
        return h.metadata() or {}


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file (or its packed twin) as stored, fp8 entries dequantised to bf16
    (their scales consumed)."""
    raw = read_raw(path)
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
    """{name: safetensors dtype as stored ("F32", "BF16", "F8_E4M3", ...)} of a file (or its packed twin),
    scales included."""
    f = stored(path)
    if f.name.endswith(PACKED_SUFFIX):
        return {k: v["dtype"] for k, v in _packed_header(f).items() if k != "__metadata__"}
    from safetensors import safe_open
    with safe_open(str(f), framework="pt") as h:
        return {k: h.get_slice(k).get_dtype() for k in h.keys()}
