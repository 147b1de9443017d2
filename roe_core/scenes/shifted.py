"""The shifted split: render styles (size, aspect, outline, JPEG) and question rewordings never
trained on, and the samples made with them."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from PIL import Image

from .asking import QA
from .rendering import jpeg, render
from .scene import SHAPE_PLURALS, Scene, random_background
from .splits import Sample, make_sample, split_seeds


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
