"""Rendering: a scene as an anti-aliased RGB image (any size and aspect), the padded-square
geometry (padded_xy), per-patch object labels (patch_labels) and the JPEG round trip."""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from .scene import COLOUR_RGB, OUTLINE_RGB, Background, Scene, SceneObject, _shift


# -----------------------------------------------------------------------------
# rendering


def _render_background(bg: Background, w: int, h: int | None = None) -> Image.Image:
    h = w if h is None else h
    if bg.kind == "plain":
        return Image.new("RGB", (w, h), tuple(bg.colour))
    if bg.kind == "gradient":
        mask = Image.linear_gradient("L")  # black top -> white bottom
        if bg.vertical:
            mask = mask.transpose(Image.Transpose.ROTATE_90)
        mask = mask.resize((w, h), Image.BILINEAR)
        a, b = Image.new("RGB", (w, h), tuple(bg.colour)), Image.new("RGB", (w, h), tuple(bg.colour2))
        return Image.composite(b, a, mask)
    if bg.kind == "two_tone":
        img = Image.new("RGB", (w, h), tuple(bg.colour))
        box = (w // 2, 0, w, h) if bg.vertical else (0, h // 2, w, h)
        img.paste(tuple(bg.colour2), box)
        return img
    if bg.kind == "noise":
        # blotchy grey texture: a 16x16 random grid upsampled smoothly; the jitter is
        # the same on all channels so the background stays neutral
        rng = random.Random(bg.seed)
        small = Image.new("L", (16, 16))
        small.putdata([rng.randrange(256) for _ in range(16 * 16)])
        mask = small.resize((w, h), Image.BICUBIC)
        a = Image.new("RGB", (w, h), _shift(bg.colour, -18))
        b = Image.new("RGB", (w, h), _shift(bg.colour, 18))
        return Image.composite(b, a, mask)
    raise ValueError(f"unknown background kind {bg.kind!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, w: int, h: int, outline, width: int,
                 fill=None, x0: float = 0.0, y0: float = 0.0) -> None:
    # x, y are fractions of the canvas's width and height; sizes are fractions of its short side;
    # (x0, y0) offsets the canvas inside a larger image (patch_labels)
    cx, cy, r = x0 + obj.x * w, y0 + obj.y * h, obj.radius * min(w, h)
    fill = COLOUR_RGB[obj.colour] if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    elif obj.shape == "square":
        h = 0.86 * r  # slightly inset so its area matches the circle's visually
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill, outline=outline, width=width)
    elif obj.shape == "triangle":
        # equilateral, pointing up, centroid at the centre; enlarged a bit (still within GAP)
        R = 1.1 * r
        s = R * math.sin(math.pi / 3)
        pts = [(cx, cy - R), (cx + s, cy + R / 2), (cx - s, cy + R / 2)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    elif obj.shape == "cross":
        a, w = 0.95 * r, 0.34 * r  # arm length, arm half-width
        pts = [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
               (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
               (cx - a, cy - w), (cx - w, cy - w)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int = 256, aspect: float = 1.0, outline_scale: float = 1.0) -> Image.Image:
    """Render `scene` to an RGB image whose short side is `size` and whose width / height is
    `aspect` (1: size x size). Deterministic.

    Object centres are fractions of the canvas's width and height and sizes fractions of its short
    side, so a wider canvas spreads the same scene out without distorting any shape (the scene's
    spacing guarantees only grow). Drawn supersampled and box-downsampled, so edges are anti-aliased
    at any size; rendering directly at 64 or resizing a 256 render both stay legible.
    `outline_scale` thickens or thins the outlines (1: the training look).
    """
    assert size >= 16, size
    if not 0.25 <= aspect <= 4.0:
        raise ValueError(f"aspect must be in [0.25, 4], got {aspect}")
    w, h = (round(size * aspect), size) if aspect >= 1 else (size, round(size / aspect))
    ss = max(2, min(8, 1024 // size))  # supersampling factor
    W, H = w * ss, h * ss
    img = _render_background(scene.background, W, H)
    draw = ImageDraw.Draw(img)
    outline = OUTLINE_RGB[scene.background.tone]
    width = max(1, round(outline_scale * min(W, H) / 96))  # ~2.7 px at 256, ~0.7 px at 64 (blended)
    for obj in scene.objects:
        _draw_object(draw, obj, W, H, outline, width)
    return img.reduce(ss)


def padded_xy(x: float, y: float, aspect: float) -> tuple[float, float]:
    """A canvas point (fractions of width, height) as fractions of the square that LLaVA's pad
    preprocessing makes of a width / height = aspect canvas (centred on its long side)."""
    if aspect >= 1:
        return x, 0.5 + (y - 0.5) / aspect
    return 0.5 + (x - 0.5) * aspect, y


def patch_labels(scene: Scene, aspect: float = 1.0, grid: int = 8, res: int = 16) -> list[int]:
    """Which object each of the grid x grid patches of the padded square image shows: row-major,
    0 for background (or padding), i + 1 for scene.objects[i]. A patch shows the object covering
    most of it when that covers >= 20% of it; every object also claims the patch holding most of
    its area if no other did. Drawn at res x res pixels a patch, with the renderer's own shapes."""
    import numpy as np
    n = grid * res
    w, h = (n, round(n / aspect)) if aspect >= 1 else (round(n * aspect), n)
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    for i, o in enumerate(scene.objects):
        _draw_object(draw, o, w, h, i + 1, 1, fill=i + 1, x0=(n - w) // 2, y0=(n - h) // 2)
    lab = np.asarray(img).reshape(grid, res, grid, res).transpose(0, 2, 1, 3).reshape(grid * grid, res * res)
    k = len(scene.objects)
    counts = np.stack([(lab == i + 1).sum(1) for i in range(k)], 1) if k else np.zeros((grid * grid, 0))
    out = [0] * (grid * grid)
    for p in range(grid * grid):
        if k and counts[p].max() >= 0.2 * res * res:
            out[p] = int(counts[p].argmax()) + 1
    for i in range(k):
        p = int(counts[:, i].argmax())
        if counts[p, i] > 0 and out[p] == 0:
            out[p] = i + 1
    return out


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """`img` after a JPEG round trip at `quality` (what a photo of a screen or an upload goes through)."""
    import io
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")
