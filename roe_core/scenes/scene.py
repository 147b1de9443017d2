"""Scenes: the shape, colour, size and background vocabulary, the scene data (objects, backgrounds)
and random_scene, which places non-overlapping objects deterministically from an rng.

Coordinates: x, y are object centres in [0, 1], origin top-left, y grows
downwards (image convention), so "above" means smaller y.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

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

GRID = 4  # scene_targets grid; random_scene puts at most one object per cell
EDGE_MARGIN = 0.03  # min gap between an object's bounding circle and the image border
GAP = 0.04  # min gap between two bounding circles
MAX_OBJECTS = 8


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
