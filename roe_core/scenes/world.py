"""
A tiny procedural "visual world" for training a small multimodal model.

Each scene is a handful of coloured shapes on a neutral background. From a
scene we render an RGB image (PIL) and ask short questions with graded
difficulty (existence, attributes, counting, spatial relations, size
comparison, description). Everything is deterministic from an integer seed,
so a split is just a range of seeds and needs no data files.

    from roe_core.scenes import make_split, render
    samples = make_split("train", 1000)
    img = render(samples[0].scene, size=256)
    for qa in samples[0].turns:
        print(qa.qtype, qa.question, qa.answer)

CLI:
    python -m roe_core.scenes --split train --n 100 --out data/scenes
    python -m roe_core.scenes --preview preview.png

Coordinates: x, y are object centres in [0, 1], origin top-left, y grows
downwards (image convention), so "above" means smaller y.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# -----------------------------------------------------------------------------
# vocabulary

# shapes chosen to stay distinguishable at 64x64: round / square corners /
# pointy / concave outline
SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

# saturated colours, well separated in hue (0, 30, 50, 135, 220, 280 degrees)
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 230),
    "yellow": (245, 210, 30),
    "purple": (150, 70, 200),
    "orange": (250, 140, 20),
}

# radius of the object's bounding circle, in normalised units; 2x apart so
# "bigger" is obvious even at 64 px (small ~10 px wide, large ~19 px wide)
SIZES = ("small", "large")
SIZE_RADIUS = {"small": 0.075, "large": 0.15}

# backgrounds are always neutral (near-grey, low saturation), so they can never
# be confused with an object colour; objects get an outline that contrasts
# with the background tone (dark outline on light, light outline on dark)
BACKGROUND_KINDS = ("plain", "gradient", "two_tone", "noise")
BACKGROUND_PALETTE = {
    "light": ((236, 236, 236), (228, 222, 208), (214, 220, 228), (224, 230, 218)),
    "dark": ((34, 34, 38), (52, 46, 40), (30, 38, 52), (42, 50, 42)),
}
OUTLINE_RGB = {"light": (25, 25, 25), "dark": (245, 245, 245)}

QTYPES = ("exist", "colour", "shape", "count", "spatial", "compare", "describe", "relcount")
# relcount is multi-step: filter by attribute, locate a reference, count on one side of it
DIFFICULTY = {"exist": 1, "colour": 1, "shape": 1, "count": 2, "spatial": 3, "compare": 3, "describe": 3,
              "relcount": 3}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

GRID = 4  # scene_targets grid; random_scene puts at most one object per cell
EDGE_MARGIN = 0.03  # min gap between an object's bounding circle and the image border
GAP = 0.04  # min gap between two bounding circles
SPATIAL_MARGIN = 0.12  # centres must differ by this much on an axis to ask about it
DESCRIBE_MARGIN = 0.06  # describe lists objects left to right: their centres differ by this much in x
MAX_OBJECTS = 8

# bumped whenever a seed's sample changes (caches of rendered splits key on it): 2 added relcount,
# the training paraphrases and the left-to-right describe
WORLD_VERSION = 2

# fixed, disjoint seed ranges per split; "shifted" is only ever built by make_shifted_split
SPLIT_BASE = {"train": 0, "val": 10_000_000, "test": 20_000_000, "shifted": 30_000_000}
SPLIT_SPAN = 10_000_000


# -----------------------------------------------------------------------------
# scene data


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, normalised [0, 1], left -> right
    y: float  # centre, normalised [0, 1], top -> bottom

    @property
    def radius(self) -> float:
        return SIZE_RADIUS[self.size]


@dataclass
class Background:
    kind: str = "plain"  # one of BACKGROUND_KINDS
    tone: str = "light"  # "light" | "dark" (picks the outline colour)
    colour: tuple = (236, 236, 236)
    colour2: tuple = (236, 236, 236)  # second tone for gradient / two_tone
    vertical: bool = False  # gradient/split direction: True = left->right
    seed: int = 0  # for the "noise" texture


@dataclass
class Scene:
    objects: list[SceneObject]
    background: Background = field(default_factory=Background)


def scene_to_dict(scene: Scene) -> dict:
    return asdict(scene)


def scene_from_dict(d: dict) -> Scene:
    bg = dict(d["background"])
    bg["colour"], bg["colour2"] = tuple(bg["colour"]), tuple(bg["colour2"])
    return Scene([SceneObject(**o) for o in d["objects"]], Background(**bg))


def _shift(rgb: tuple, delta: int) -> tuple:
    return tuple(max(0, min(255, c + delta)) for c in rgb)


def random_background(rng: random.Random, palette: dict | None = None) -> Background:
    tone = rng.choice(("light", "dark"))
    kind = rng.choice(BACKGROUND_KINDS)
    c1, c2 = rng.sample((palette or BACKGROUND_PALETTE)[tone], 2)
    towards_middle = -1 if tone == "light" else 1  # keep the second tone on the same side
    if kind == "plain":
        c2 = c1
    elif kind == "two_tone":
        c2 = _shift(c2, 22 * towards_middle)
    elif kind == "gradient":
        c2 = _shift(c2, 40 * towards_middle)
    return Background(kind, tone, c1, c2, rng.random() < 0.5, rng.randrange(2**31))


def cell_of(x: float, y: float) -> tuple[int, int]:
    """(row, col) of the GRID x GRID cell containing normalised point (x, y)."""
    return min(int(y * GRID), GRID - 1), min(int(x * GRID), GRID - 1)


def _fits(obj: SceneObject, objects: list[SceneObject]) -> bool:
    for o in objects:
        # every object must be nameable by (size, colour, shape)
        if (o.shape, o.colour, o.size) == (obj.shape, obj.colour, obj.size):
            return False
        # one object per grid cell keeps scene_targets well defined and spreads objects out
        if cell_of(o.x, o.y) == cell_of(obj.x, obj.y):
            return False
        if math.hypot(o.x - obj.x, o.y - obj.y) < o.radius + obj.radius + GAP:
            return False
    return True


def random_scene(rng: random.Random, max_objects: int = 4) -> Scene:
    """1..max_objects non-overlapping objects (rejection sampling).

    Guarantees: bounding circles are >= GAP apart and >= EDGE_MARGIN from the
    border, no two objects share a (shape, colour, size) triple, and no two
    centres fall in the same GRID x GRID cell. If placement fails 200 times the
    scene simply has fewer objects (still deterministic).
    """
    assert 1 <= max_objects <= MAX_OBJECTS, max_objects
    background = random_background(rng)
    n = rng.randint(1, max_objects)
    objects: list[SceneObject] = []
    for _ in range(n):
        for _attempt in range(200):
            size = rng.choice(SIZES)
            r = SIZE_RADIUS[size]
            lo, hi = r + EDGE_MARGIN, 1.0 - r - EDGE_MARGIN
            obj = SceneObject(
                shape=rng.choice(SHAPES),
                colour=rng.choice(COLOURS),
                size=size,
                x=round(rng.uniform(lo, hi), 4),
                y=round(rng.uniform(lo, hi), 4),
            )
            if _fits(obj, objects):
                objects.append(obj)
                break
    return Scene(objects, background)


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


# -----------------------------------------------------------------------------
# questions


@dataclass
class QA:
    question: str
    answer: str
    qtype: str


class NotAskable(ValueError):
    """Raised by ask() when the scene does not support that question type."""


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _number(n: int) -> str:
    return _cap(NUMBER_WORDS[n]) + "."


def _ref(scene: Scene, obj: SceneObject) -> str:
    """Shortest unambiguous name: 'red circle', or 'large red circle' if needed."""
    twins = [o for o in scene.objects if o.shape == obj.shape and o.colour == obj.colour]
    return f"{obj.size} {obj.colour} {obj.shape}" if len(twins) > 1 else f"{obj.colour} {obj.shape}"


def _yes_no(truth: bool) -> str:
    return "Yes." if truth else "No."


def _ask_exist(scene: Scene, rng: random.Random) -> QA:
    want_yes = rng.random() < 0.5
    templates = ("Is there {a} {noun}?", "Is there {a} {noun} in the image?",
                 "Can you see {a} {noun}?", "Does the image contain {a} {noun}?",
                 "Is {a} {noun} visible?", "Do you see {a} {noun} anywhere?")
    template = rng.choice(templates)
    noun = None
    if rng.random() < 0.25:  # shape-only variant
        present = sorted({o.shape for o in scene.objects})
        pool = present if want_yes else [s for s in SHAPES if s not in present]
        if pool:
            noun = rng.choice(pool)
    if noun is None:
        if want_yes:
            o = rng.choice(scene.objects)
            noun = f"{o.colour} {o.shape}"
        else:
            present = {(o.colour, o.shape) for o in scene.objects}
            absent = [(c, s) for s in SHAPES for c in COLOURS if (c, s) not in present]
            # hard negatives share a colour or shape with something present, so the
            # model has to bind colour to shape rather than spot either one
            hard = [(c, s) for c, s in absent if any(o.colour == c or o.shape == s for o in scene.objects)]
            c, s = rng.choice(hard if hard and rng.random() < 0.5 else absent)
            noun = f"{c} {s}"
    return QA(template.format(a=_article(noun), noun=noun), _yes_no(want_yes), "exist")


def _named_by(scene: Scene, attr: str, suffix: str = "") -> list[tuple[SceneObject, str]]:
    """Objects that `attr` names unambiguously (size added when needed): [(object, "red object"), ...]."""
    cands = []
    for o in scene.objects:
        v = getattr(o, attr)
        if sum(getattr(p, attr) == v for p in scene.objects) == 1:
            cands.append((o, f"{v}{suffix}"))
        elif sum(getattr(p, attr) == v and p.size == o.size for p in scene.objects) == 1:
            cands.append((o, f"{o.size} {v}{suffix}"))
    return cands


def _ask_colour(scene: Scene, rng: random.Random) -> QA:
    cands = _named_by(scene, "shape")
    if not cands:
        raise NotAskable("colour: no object identifiable by shape (and size)")
    o, ref = rng.choice(cands)
    template = rng.choice(("What colour is the {ref}?", "What is the colour of the {ref}?", "Which colour is the {ref}?",
                           "Name the colour of the {ref}.", "The {ref} is which colour?"))
    return QA(template.format(ref=ref), _cap(o.colour) + ".", "colour")


def _ask_shape(scene: Scene, rng: random.Random) -> QA:
    cands = _named_by(scene, "colour", " object")
    if not cands:
        raise NotAskable("shape: no object identifiable by colour (and size)")
    o, ref = rng.choice(cands)
    template = rng.choice(("What shape is the {ref}?", "What is the shape of the {ref}?", "Which shape is the {ref}?",
                           "Name the shape of the {ref}.", "The {ref} has which shape?"))
    return QA(template.format(ref=ref), f"A {o.shape}.", "shape")


def _ask_count(scene: Scene, rng: random.Random) -> QA:
    u = rng.random()
    want_zero = rng.random() < 0.2  # zero answers teach "absent" rather than "always >= 1"
    if u < 0.2:
        plural, n = "objects", len(scene.objects)
    elif u < 0.6:
        present = sorted({o.shape for o in scene.objects})
        absent = [s for s in SHAPES if s not in present]
        shape = rng.choice(absent if want_zero and absent else present)
        plural, n = SHAPE_PLURALS[shape], sum(o.shape == shape for o in scene.objects)
    else:
        present = sorted({o.colour for o in scene.objects})
        absent = [c for c in COLOURS if c not in present]
        colour = rng.choice(absent if want_zero and absent else present)
        plural, n = f"{colour} objects", sum(o.colour == colour for o in scene.objects)
    template = rng.choice(("How many {p} are there?", "How many {p} are in the image?",
                           "How many {p} can you see?", "Count the {p}.", "What is the number of {p}?",
                           "How many {p} does the image show?"))
    return QA(template.format(p=plural), _number(n), "count")


# relation -> (axis, sign): a REL b  <=>  sign * (a.axis - b.axis) >= SPATIAL_MARGIN
RELATIONS = {"left": ("x", -1), "right": ("x", 1), "above": ("y", -1), "below": ("y", 1)}
REL_PHRASES = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}


def _delta(a: SceneObject, b: SceneObject, axis: str) -> float:
    return a.x - b.x if axis == "x" else a.y - b.y


def _ask_spatial(scene: Scene, rng: random.Random) -> QA:
    objs = scene.objects
    # ordered pairs that are clearly separated along an axis
    pairs = [(a, b, axis) for a in objs for b in objs if a is not b
             for axis in ("x", "y") if abs(_delta(a, b, axis)) >= SPATIAL_MARGIN]
    if not pairs:
        raise NotAskable("spatial: no pair of objects clearly separated")
    # open questions ("What is left of the X?") need exactly one clear answer and
    # no other object in the ambiguous band
    open_cands = []
    for b in objs:
        others = [o for o in objs if o is not b]
        for rel, (axis, sign) in RELATIONS.items():
            hits = [o for o in others if sign * _delta(o, b, axis) >= SPATIAL_MARGIN]
            unclear = [o for o in others if abs(_delta(o, b, axis)) < SPATIAL_MARGIN]
            if len(hits) == 1 and not unclear:
                open_cands.append((hits[0], rel, b))
    if open_cands and rng.random() < 0.3:
        a, rel, b = rng.choice(open_cands)
        template = rng.choice(("What is {rel} the {b}?", "Which object is {rel} the {b}?"))
        q = template.format(rel=rng.choice(REL_PHRASES[rel]), b=_ref(scene, b))
        return QA(q, f"The {_ref(scene, a)}.", "spatial")
    a, b, axis = rng.choice(pairs)
    rel = rng.choice(("left", "right") if axis == "x" else ("above", "below"))
    truth = RELATIONS[rel][1] * _delta(a, b, axis) > 0
    q = f"Is the {_ref(scene, a)} {rng.choice(REL_PHRASES[rel])} the {_ref(scene, b)}?"
    return QA(q, _yes_no(truth), "spatial")


def _ask_compare(scene: Scene, rng: random.Random) -> QA:
    # only objects whose name does not already contain the size (else the text gives it away)
    named = [o for o in scene.objects
             if sum(p.shape == o.shape and p.colour == o.colour for p in scene.objects) == 1]
    pairs = [(a, b) for a in named for b in named if a.size != b.size]
    if not pairs:
        raise NotAskable("compare: no two nameable objects of different sizes")
    a, b = rng.choice(pairs)
    word = rng.choice(("bigger", "larger", "smaller"))
    wants_large = word != "smaller"
    if rng.random() < 0.5:
        q = f"Is the {_ref(scene, a)} {word} than the {_ref(scene, b)}?"
        return QA(q, _yes_no((a.size == "large") == wants_large), "compare")
    template = rng.choice(("Which is {w}, the {a} or the {b}?", "Which object is {w}: the {a} or the {b}?"))
    winner = a if (a.size == "large") == wants_large else b
    q = template.format(w=word, a=_ref(scene, a), b=_ref(scene, b))
    return QA(q, f"The {_ref(scene, winner)}.", "compare")


def describe(scene: Scene) -> str:
    """'A large red circle, a small blue square and a small green cross.' (left to right: the
    question says so, and describe is asked only when every two centres are DESCRIBE_MARGIN apart in
    x, so the order is never a judgement call)"""
    objs = sorted(scene.objects, key=lambda o: (o.x, o.y))
    parts = [f"{_article(o.size)} {o.size} {o.colour} {o.shape}" for o in objs]
    if not parts:
        return "Nothing."
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return _cap(text) + "."


def _ask_describe(scene: Scene, rng: random.Random) -> QA:
    xs = sorted(o.x for o in scene.objects)
    if any(b - a < DESCRIBE_MARGIN for a, b in zip(xs, xs[1:])):
        raise NotAskable("describe: two objects too close in x for a left-to-right order")
    q = rng.choice(("Describe the objects from left to right.", "List the objects from left to right.",
                    "What is in the image, from left to right?", "Name every object, left to right."))
    return QA(q, describe(scene), "describe")


def _ask_relcount(scene: Scene, rng: random.Random) -> QA:
    """'How many red objects are left of the blue square?': filter, locate, count. Asked only where
    no candidate sits in the ambiguous band around the reference on that axis."""
    cands = []
    for ref in scene.objects:
        others = [o for o in scene.objects if o is not ref]
        for rel, (axis, sign) in RELATIONS.items():
            if any(abs(_delta(o, ref, axis)) < SPATIAL_MARGIN for o in others):
                continue
            for attr, values in (("colour", COLOURS), ("shape", SHAPES)):
                for v in values:
                    n = sum(getattr(o, attr) == v and sign * _delta(o, ref, axis) > 0 for o in others)
                    cands.append((ref, rel, attr, v, n))
    if not cands:
        raise NotAskable("relcount: no reference with every other object clearly to one side")
    # half the questions count something that is there (n >= 1), as a plain count would
    present = [c for c in cands if c[4] > 0]
    ref, rel, attr, v, n = rng.choice(present if present and rng.random() < 0.6 else cands)
    noun = f"{v} objects" if attr == "colour" else SHAPE_PLURALS[v]
    template = rng.choice(("How many {p} are {rel} the {ref}?", "Count the {p} {rel} the {ref}."))
    q = template.format(p=noun, rel=rng.choice(REL_PHRASES[rel]), ref=_ref(scene, ref))
    return QA(q, _number(n), "relcount")


_ASKERS = {
    "exist": _ask_exist, "colour": _ask_colour, "shape": _ask_shape, "count": _ask_count,
    "spatial": _ask_spatial, "compare": _ask_compare, "describe": _ask_describe, "relcount": _ask_relcount,
}


def ask(scene: Scene, qtype: str, rng: random.Random) -> QA:
    """One question of type `qtype` about `scene`; template and target drawn from rng.

    Raises NotAskable (a ValueError) when the scene cannot support the type;
    this depends only on the scene, never on rng (see askable()):
      colour   needs an object with a unique shape (or unique size+shape)
      shape    needs an object with a unique colour (or unique size+colour)
      spatial  needs two objects whose centres differ by >= SPATIAL_MARGIN on an axis
      compare  needs two objects of different sizes, each unique by colour+shape
      describe needs every two centres >= DESCRIBE_MARGIN apart in x (a defined left-to-right order)
      relcount needs an object with every other object clearly to one side of it on an axis
    exist and count are always askable (for scenes with >= 1 object).
    """
    if qtype not in _ASKERS:
        raise ValueError(f"unknown qtype {qtype!r}; expected one of {QTYPES}")
    if not scene.objects:
        raise NotAskable("empty scene")
    return _ASKERS[qtype](scene, rng)


def askable(scene: Scene, qtype: str) -> bool:
    try:
        ask(scene, qtype, random.Random(0))
        return True
    except NotAskable:
        return False


def qtypes_up_to(max_difficulty: int) -> tuple[str, ...]:
    """Question types with DIFFICULTY <= max_difficulty (for curricula)."""
    return tuple(q for q in QTYPES if DIFFICULTY[q] <= max_difficulty)


# -----------------------------------------------------------------------------
# samples and splits


@dataclass
class Sample:
    id: str
    seed: int
    scene: Scene
    turns: list[QA]


def make_sample(seed: int, n_turns: int | None = None, qtypes=None) -> Sample:
    """Deterministic sample (scene + 1..3 QA turns by default) from `seed`.

    Question types are drawn first (a shuffled pass over `qtypes`, so types are
    balanced across samples and distinct within a sample unless n_turns exceeds
    len(qtypes)), then scenes are re-sampled until all chosen types are askable.
    After 50 tries, unaskable types are dropped (others from `qtypes` fill in).
    """
    qtypes = tuple(qtypes) if qtypes is not None else QTYPES
    for q in qtypes:
        if q not in QTYPES:
            raise ValueError(f"unknown qtype {q!r}")
    rng = random.Random(seed)
    if n_turns is None:
        n_turns = rng.randint(1, 3)
    chosen: list[str] = []
    while len(chosen) < n_turns:
        pool = list(qtypes)
        rng.shuffle(pool)
        chosen += pool
    chosen = chosen[:n_turns]
    for _ in range(50):
        scene = random_scene(rng)
        if all(askable(scene, q) for q in chosen):
            break
    else:
        ok = [q for q in chosen if askable(scene, q)]
        spare = [q for q in qtypes if q not in ok and askable(scene, q)]
        chosen = (ok + spare)[:n_turns]
        if not chosen:
            raise ValueError(f"seed {seed}: no askable question type among {qtypes}")
    turns = [ask(scene, q, rng) for q in chosen]
    return Sample(id=f"scene-{seed:08d}", seed=seed, scene=scene, turns=turns)


def split_seeds(split: str, n: int) -> range:
    if split not in SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_BASE)}")
    if not 0 <= n <= SPLIT_SPAN:
        raise ValueError(f"n must be in [0, {SPLIT_SPAN}]")
    return range(SPLIT_BASE[split], SPLIT_BASE[split] + n)


def make_split(split: str, n: int, start: int = 0, **kwargs) -> list[Sample]:
    """Samples start .. start+n-1 of a split ("train" | "val" | "test"); kwargs go to make_sample."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    return [make_sample(seed, **kwargs) for seed in split_seeds(split, start + n)[start:]]


# -----------------------------------------------------------------------------
# the shifted split: held-out phrasings and renderings, never trained on

# Neutral tones that no training background uses, and outline widths the training renders never
# have (training: 1.0). The answers stay the world's canonical words ("A circle.", "Two."): only
# what is asked and how it looks shift.
SHIFTED_BACKGROUND_PALETTE = {
    "light": ((248, 248, 248), (206, 206, 206), (232, 226, 234), (240, 236, 226)),
    "dark": ((14, 14, 14), (66, 62, 58), (44, 36, 48), (24, 44, 44)),
}
SHIFTED_OUTLINE_SCALES = (0.4, 0.6, 1.6, 2.0, 2.5)
SHIFTED_SIZES = (96, 1024)      # short side, log-uniform
SHIFTED_ASPECTS = (0.5, 2.0)    # width / height, log-uniform (1:2 .. 2:1)
SHIFTED_JPEG = (60, 90)         # quality
# other nouns than the training questions use; the answers keep the canonical ones
SHIFTED_SHAPE_NOUNS = {
    "circle": ("disc", "round shape"), "square": ("square shape", "box"),
    "triangle": ("triangular shape", "three-sided shape"), "cross": ("plus sign", "plus shape"),
}
SHIFTED_OBJECT_NOUNS = ("item", "thing", "figure")
SHIFTED_PREFIXES = ("In this picture, ", "Looking at the image, ", "Tell me: ", "In the scene, ")


@dataclass
class RenderStyle:
    size: int = 256             # short side in pixels
    aspect: float = 1.0         # width / height
    outline_scale: float = 1.0
    jpeg_quality: int | None = None   # None: no JPEG round trip


def render_styled(scene: Scene, style: RenderStyle) -> Image.Image:
    img = render(scene, style.size, style.aspect, style.outline_scale)
    return jpeg(img, style.jpeg_quality) if style.jpeg_quality is not None else img


@dataclass
class ShiftedSample(Sample):
    style: RenderStyle = field(default_factory=RenderStyle)

    def image(self) -> Image.Image:
        return render_styled(self.scene, self.style)


def _plural_noun(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def shift_question(question: str, rng: random.Random) -> str:
    """A training-style question reworded with what training never shows: US spelling, other nouns
    for objects and shapes, and the clauses reordered. The meaning (and so the answer) is kept."""
    q = re.sub(r"\bcolour", "color", question)
    # reorder first (its patterns are in training words): "Which is bigger, the A or the B?" ->
    # "Of the A and the B, which is bigger?"; "How many X are there?" -> "Tell me how many X there are."
    reordered = False
    m = re.fullmatch(r"Which (?:object )?is (\w+)[,:] the (.+) or the (.+)\?", q)
    if m and rng.random() < 0.7:
        q, reordered = f"Of the {m.group(2)} and the {m.group(3)}, which is {m.group(1)}?", True
    m = re.fullmatch(r"How many (.+) are there\?", q)
    if m and rng.random() < 0.5:
        q, reordered = f"Tell me how many {m.group(1)} there are.", True
    if rng.random() < 0.6:
        for shape, alts in SHIFTED_SHAPE_NOUNS.items():
            alt = rng.choice(alts)
            plural = SHAPE_PLURALS[shape]
            # one pass, so an alternative that contains the name ("square shape") is not rewritten again
            q = re.sub(rf"\b(?:{plural}|{shape})\b", lambda m_, p=plural, a=alt: _plural_noun(a) if m_[0] == p else a, q)
    if rng.random() < 0.7:
        q = re.sub(r"\bobjects\b", rng.choice(("shapes", "items", "things")), q)
        q = re.sub(r"\bevery object\b", "every item", q)       # not "every thing"
        q = re.sub(r"\bobject\b", rng.choice(SHIFTED_OBJECT_NOUNS), q)
    if not reordered and (rng.random() < 0.6 or q == question):   # every question shifts somehow
        q = rng.choice(SHIFTED_PREFIXES) + q[:1].lower() + q[1:]
    q = re.sub(r"\ban ([^aeiou])", r"a \1", q)
    q = re.sub(r"\ba ([aeiou])", r"an \1", q)
    return q


def random_style(rng: random.Random) -> RenderStyle:
    lo, hi = SHIFTED_SIZES
    a_lo, a_hi = SHIFTED_ASPECTS
    aspect = 1.0 if rng.random() < 0.25 else math.exp(rng.uniform(math.log(a_lo), math.log(a_hi)))
    return RenderStyle(size=round(math.exp(rng.uniform(math.log(lo), math.log(hi)))), aspect=round(aspect, 3),
                       outline_scale=rng.choice(SHIFTED_OUTLINE_SCALES),
                       jpeg_quality=rng.randint(*SHIFTED_JPEG) if rng.random() < 0.75 else None)


def make_shifted_sample(seed: int) -> ShiftedSample:
    """One question about one scene, shifted (see shift_question, random_style and the held-out
    background tones). Deterministic from seed; its own random stream, so no train, val or test
    sample is ever reproduced here."""
    base = make_sample(seed, n_turns=1)
    rng = random.Random(f"shifted-{seed}")
    scene = Scene(base.scene.objects, random_background(rng, SHIFTED_BACKGROUND_PALETTE))
    qa = base.turns[0]
    return ShiftedSample(id=f"shifted-{seed:08d}", seed=seed, scene=scene,
                         turns=[QA(shift_question(qa.question, rng), qa.answer, qa.qtype)], style=random_style(rng))


def make_shifted_split(n: int, start: int = 0) -> list[ShiftedSample]:
    """Samples start .. start+n-1 of the shifted split (seeds from SPLIT_BASE["shifted"])."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    return [make_shifted_sample(seed) for seed in split_seeds("shifted", start + n)[start:]]


# -----------------------------------------------------------------------------
# scoring


def normalise_answer(text: str) -> str:
    """'The Red circle.' -> 'red circle', '2' -> 'two', 'A triangle.' -> 'triangle'."""
    words = re.sub(r"[^\w\s]|_", " ", text.lower()).split()
    words = [NUMBER_WORDS[int(w)] if w.isdigit() and int(w) < len(NUMBER_WORDS) else w for w in words]
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def answers_match(pred: str, gold: str) -> bool:
    return normalise_answer(pred) == normalise_answer(gold)


# -----------------------------------------------------------------------------
# vision-encoder targets


N_CELL_CLASSES = 1 + len(SHAPES) * len(COLOURS) * len(SIZES)  # 49


def scene_targets(scene: Scene) -> dict:
    """Direct supervision targets for pretraining a vision encoder.

    Cells: GRID x GRID (4x4) over the image, row-major from the top-left,
    index = row * GRID + col; an object belongs to the cell containing its
    centre (random_scene guarantees at most one per cell; for hand-made scenes
    the last object in scene.objects wins).

    Per-cell lists (length GRID*GRID, 0 always means "empty"):
      cell_shape   0 empty, 1 circle, 2 square, 3 triangle, 4 cross   (1 + SHAPES index)
      cell_colour  0 empty, 1 red, 2 green, 3 blue, 4 yellow, 5 purple, 6 orange  (1 + COLOURS index)
      cell_size    0 empty, 1 small, 2 large                          (1 + SIZES index)
      cell_class   0 empty, else 1 + (shape_i * len(COLOURS) + colour_i) * len(SIZES) + size_i
                   (joint class, 1..48; N_CELL_CLASSES = 49)
    Global counts:
      shape_counts  [count per SHAPES], colour_counts [per COLOURS], size_counts [per SIZES]
      n_objects     int
    """
    k = GRID * GRID
    t = {"cell_shape": [0] * k, "cell_colour": [0] * k, "cell_size": [0] * k, "cell_class": [0] * k}
    for o in scene.objects:
        row, col = cell_of(o.x, o.y)
        i = row * GRID + col
        si, ci, zi = SHAPES.index(o.shape), COLOURS.index(o.colour), SIZES.index(o.size)
        t["cell_shape"][i] = 1 + si
        t["cell_colour"][i] = 1 + ci
        t["cell_size"][i] = 1 + zi
        t["cell_class"][i] = 1 + (si * len(COLOURS) + ci) * len(SIZES) + zi
    t["shape_counts"] = [sum(o.shape == s for o in scene.objects) for s in SHAPES]
    t["colour_counts"] = [sum(o.colour == c for o in scene.objects) for c in COLOURS]
    t["size_counts"] = [sum(o.size == z for o in scene.objects) for z in SIZES]
    t["n_objects"] = len(scene.objects)
    return t


# -----------------------------------------------------------------------------
# LLaVA-style export


def to_llava_records(samples: list[Sample], image_dir, image_size: int = 256) -> list[dict]:
    """Write image_dir/<id>.png for each sample and return LLaVA conversation records.

    Record: {"id", "image": "<id>.png", "conversations": [{"from": "human",
    "value": "<image>\\nQ1"}, {"from": "gpt", "value": "A1"}, {"from": "human",
    "value": "Q2"}, ...], "qtypes": [...], "seed": int, "scene": scene_to_dict}.
    The "<image>" placeholder is only in the first human turn, as in LLaVA.
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for s in samples:
        render(s.scene, image_size).save(image_dir / f"{s.id}.png")
        conversations = []
        for i, qa in enumerate(s.turns):
            question = f"<image>\n{qa.question}" if i == 0 else qa.question
            conversations.append({"from": "human", "value": question})
            conversations.append({"from": "gpt", "value": qa.answer})
        records.append({
            "id": s.id,
            "image": f"{s.id}.png",
            "conversations": conversations,
            "qtypes": [qa.qtype for qa in s.turns],
            "seed": s.seed,
            "scene": scene_to_dict(s.scene),
        })
    return records


def export_llava_json(split: str, n: int, out_dir, image_size: int = 256, start: int = 0) -> Path:
    """Write out_dir/<split>.json (samples start .. start+n-1) and the images to out_dir/images/
    (shared by all splits; ids are unique across splits). Returns the JSON path."""
    out_dir = Path(out_dir)
    records = to_llava_records(make_split(split, n, start), out_dir / "images", image_size)
    path = out_dir / f"{split}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


# -----------------------------------------------------------------------------
# preview grid


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # old Pillow without scalable default font
        return ImageFont.load_default()


def preview_grid(samples: list[Sample], cols: int = 3, tile: int = 256) -> Image.Image:
    """Rendered scenes with their Q/A pairs below, as one image (for READMEs)."""
    font = _font(12)
    line_h, pad = 15, 6
    blocks = []
    for s in samples:
        lines = []  # (text, is_answer)
        for qa in s.turns:
            lines += [(t, False) for t in textwrap.wrap(f"Q: {qa.question}", 40)]
            lines += [(t, True) for t in textwrap.wrap(f"A: {qa.answer}", 40)]
        blocks.append(lines)
    text_h = pad * 2 + line_h * max((len(b) for b in blocks), default=0)
    rows = math.ceil(len(samples) / cols)
    grid = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (s, lines) in enumerate(zip(samples, blocks)):
        x0 = pad + (i % cols) * (tile + pad)
        y0 = pad + (i // cols) * (tile + text_h + pad)
        grid.paste(render(s.scene, tile), (x0, y0))
        for j, (line, is_answer) in enumerate(lines):
            colour = (30, 110, 40) if is_answer else (20, 20, 20)
            draw.text((x0 + 2, y0 + tile + pad + j * line_h), line, fill=colour, font=font)
    return grid


# -----------------------------------------------------------------------------
# CLI


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Procedural shapes world: LLaVA-style export and previews.")
    p.add_argument("--split", default="train", choices=tuple(SPLIT_BASE))
    p.add_argument("--n", type=int, default=100, help="number of samples to export")
    p.add_argument("--out", default=None, help="export dir: writes <out>/<split>.json and <out>/images/")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--preview", default=None, help="save a grid of rendered scenes with Q/A to this PNG")
    p.add_argument("--preview-n", type=int, default=6)
    args = p.parse_args(argv)
    if args.out is None and args.preview is None:
        p.error("nothing to do: pass --out and/or --preview")
    if args.out is not None:
        path = export_llava_json(args.split, args.n, args.out, args.image_size)
        print(f"wrote {args.n} samples to {path} (images in {Path(args.out) / 'images'})")
    if args.preview is not None:
        samples = [make_sample(seed, n_turns=3) for seed in split_seeds(args.split, args.preview_n)]
        preview_grid(samples).save(args.preview)
        print(f"wrote preview to {args.preview}")


if __name__ == "__main__":
    main()
