"""Reading user images safely: any common mode in, RGB out, clear errors for what cannot be read."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .conversation import InputError

MAX_PIXELS = 40_000_000        # 40 MP: above this (or a decompression bomb) we refuse
MAX_BYTES = 25 * 1024 * 1024   # upload size limit
MAX_SIDE = 4096                # larger images are downscaled before anything else sees them


def load_image(source, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> Image.Image:
    """A path, bytes or PIL image -> an RGB PIL image. Raises InputError with a message a user can act on."""
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
            name = "the upload"
        else:
            path = Path(source)
            name = path.name
            if not path.is_file():
                raise InputError(f"image file {name!r} was not found")
            if path.stat().st_size > max_bytes:
                raise InputError(f"{name} is {path.stat().st_size / 2**20:.1f} MB; the limit is {max_bytes // 2**20} MB")
            data = path.read_bytes()
        if len(data) > max_bytes:
            raise InputError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {max_bytes // 2**20} MB")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise InputError(f"{name} is not an image PIL can read (PNG, JPEG, GIF, WebP, BMP, TIFF...)") from None
        except Image.DecompressionBombError:   # PIL refuses far-oversized images at open already
            raise InputError(f"{name} is far too large (a decompression bomb?); the limit is "
                             f"{max_pixels / 1e6:.0f} megapixels") from None
        if img.width * img.height > max_pixels:
            raise InputError(f"{name} is {img.width}x{img.height} pixels; the limit is {max_pixels / 1e6:.0f} megapixels")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.seek(0)   # animated images: the first frame
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(f"{name} looks like a decompression bomb; refused") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{name} is corrupt or truncated ({e})") from None
    if img.width * img.height > max_pixels:
        raise InputError(f"the image is {img.width}x{img.height} pixels; the limit is {max_pixels / 1e6:.0f} megapixels")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha over white, 16-bit and float scaled to 8-bit, CMYK/palette converted."""
    img = ImageOps.exif_transpose(img)
    if max(img.size) > MAX_SIDE:
        img = img.copy()
        img.thumbnail((MAX_SIDE, MAX_SIDE))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np  # noqa: PLC0415  (numpy comes with torch)
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype("uint8"), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    return img.convert("RGB")
