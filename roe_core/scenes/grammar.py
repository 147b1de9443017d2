"""Wider inputs for training: the training questions in other words (synonyms, clauses, politeness,
casing, missing punctuation, typos) and the scenes in other render styles (sizes 96-1024 px, aspect
1:2-2:1, JPEG, outline widths). The meaning, and so the answer, is kept.

The shifted split must stay a measure of what was never seen: nothing here uses its held-out words
(`held_out_words()`: what its questions say that training questions never do) or its held-out styles
(its outline widths, background tones and JPEG qualities). A test checks both.

    reword(question, rng) -> str          # deterministic given rng
    wide_style(rng) -> RenderStyle
    make_wide_sample(seed) -> Sample      # a train-split sample reworded and restyled
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from .asking import QA
from .shifted import (SHIFTED_OBJECT_NOUNS, SHIFTED_PREFIXES, SHIFTED_SHAPE_NOUNS, RenderStyle,
                      render_styled)
from .splits import Sample, make_sample

# --- words ------------------------------------------------------------------------------------------------

# (pattern on the training wording, alternatives); each applies with some probability, one pass each
SYNONYMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"\bobjects\b", ("pieces", "elements", "symbols", "forms")),
    (r"\bobject\b", ("piece", "element", "symbol", "form")),
    (r"\bthe image\b", ("the photo", "the drawing", "the illustration", "the graphic")),
    (r"\bin the image\b", ("here", "in the photo", "in the drawing", "in view")),
    (r"^Can you see\b", ("Do you spot", "Can you find", "Do you notice")),
    (r"^Is there\b", ("Is there any", "Would there be")),
    (r"^How many\b", ("What number of",)),
    (r"\bare there\b", ("do you count", "are present", "are visible")),
    (r"\bbigger\b", ("greater in size",)),
    (r"\bsmaller\b", ("less big",)),
    (r"\bto the left of\b", ("on the left side of", "left of")),
    (r"\bto the right of\b", ("on the right side of", "right of")),
    (r"\babove\b", ("higher up than", "higher than")),
    (r"\bbelow\b", ("lower than", "lower down than")),
    (r"\bfrom left to right\b", ("left to right", "going from left to right", "in order from left to right")),
)

FRAMES = (   # {q}: the question with its first letter lowered; {Q}: as it is
    "{Q}", "{Q}", "{Q}",
    "Please answer: {Q}", "Quick question: {Q}", "Question: {Q}", "Hi! {Q}", "Hello, {q}",
    "Can you help? {Q}", "I'd like to know: {q}", "Based on the image, {q}", "Look carefully. {Q}",
    "Be brief. {Q}", "{Q} Thanks!", "{Q} Thank you.", "Here is my question: {q}", "One question: {q}",
    "Could you check something? {Q}", "Hey, {q}", "So, {q}",
)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z][a-z'-]*", text.lower()))


# what the shifted split's rewording introduces (its US spelling, nouns, prefixes): a typo must not make one
_SHIFTED_VOCAB = (_words(" ".join(a for alts in SHIFTED_SHAPE_NOUNS.values() for a in alts))
                  | _words(" ".join(SHIFTED_OBJECT_NOUNS + SHIFTED_PREFIXES)) | {"color", "colors", "shapes", "items",
                                                                                   "things"})


def _typo(word: str, rng: random.Random) -> str:
    """One keyboard slip in a word: two letters swapped, one dropped or one doubled."""
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def reword(question: str, rng: random.Random, p_synonym: float = 0.5, p_frame: float = 0.5,
           p_typo: float = 0.25, p_case: float = 0.25, p_punct: float = 0.3) -> str:
    """The question in other words with the same meaning: synonyms (each with p_synonym), a frame around
    it (politeness, a clause), then surface noise: a typo in one longer word, lower/upper case, the final
    punctuation dropped."""
    q = question
    for pattern, alts in SYNONYMS:
        if re.search(pattern, q) and rng.random() < p_synonym:
            q = re.sub(pattern, rng.choice(alts), q, count=1)
    q = re.sub(r"\ban ([^aeiou])", r"a \1", q)
    q = re.sub(r"\ba ([aeiou])", r"an \1", q)
    if rng.random() < p_frame:
        q = rng.choice(FRAMES).format(Q=q, q=q[:1].lower() + q[1:])
    q = q[:1].upper() + q[1:]
    if rng.random() < p_typo:
        words = [(m.start(), m.group()) for m in re.finditer(r"[A-Za-z]{5,}", q)]
        if words:
            at, w = rng.choice(words)
            slip = _typo(w, rng)
            if slip.lower() not in _SHIFTED_VOCAB:
                q = q[:at] + slip + q[at + len(w):]
    if rng.random() < p_case:
        q = q.lower() if rng.random() < 0.8 else q.upper()
    if rng.random() < p_punct:
        q = q.rstrip("?.!") if rng.random() < 0.8 else q.rstrip("?") + "??"
    return q


# --- styles --------------------------------------------------------------------------------------------------

WIDE_SIZES = (96, 1024)                 # short side, log-uniform
WIDE_ASPECTS = (0.5, 2.0)               # width / height, log-uniform (1:2 .. 2:1)
# the shifted split holds out outlines 0.4, 0.6, 1.6, 2.0, 2.5 and JPEG qualities 60-90
WIDE_OUTLINE_SCALES = (0.75, 1.0, 1.0, 1.25, 1.4, 1.8, 3.0)
WIDE_JPEG = ((30, 55), (92, 97))


def wide_style(rng: random.Random) -> RenderStyle:
    lo, hi = WIDE_SIZES
    a_lo, a_hi = WIDE_ASPECTS
    aspect = 1.0 if rng.random() < 0.25 else math.exp(rng.uniform(math.log(a_lo), math.log(a_hi)))
    jpeg = rng.randint(*rng.choice(WIDE_JPEG)) if rng.random() < 0.6 else None
    return RenderStyle(size=round(math.exp(rng.uniform(math.log(lo), math.log(hi)))), aspect=round(aspect, 3),
                       outline_scale=rng.choice(WIDE_OUTLINE_SCALES), jpeg_quality=jpeg)


@dataclass
class WideSample(Sample):
    """A train-split sample reworded and restyled (its scene and answers unchanged)."""
    style: RenderStyle = field(default_factory=RenderStyle)

    def image(self):
        return render_styled(self.scene, self.style)


def make_wide_sample(seed: int, p_reword: float = 0.8) -> WideSample:
    """The train-split sample of `seed` (same scene, same answers) with each question reworded with
    probability p_reword and the image in a wide_style. Deterministic from seed."""
    base = make_sample(seed)
    rng = random.Random(f"wide-{seed}")
    turns = [QA(reword(t.question, rng) if rng.random() < p_reword else t.question, t.answer, t.qtype)
             for t in base.turns]
    return WideSample(id=f"wide-{seed:08d}", seed=seed, scene=base.scene, turns=turns, style=wide_style(rng))


def held_out_words(n: int = 2000) -> set[str]:
    """Words the shifted split's questions use that n train-split samples' questions never do: the
    held-out vocabulary no training input may contain."""
    from .shifted import make_shifted_split
    from .splits import make_split

    def words(texts):
        return {w for t in texts for w in re.findall(r"[a-z][a-z'-]*", t.lower())}
    train = words(qa.question for s in make_split("train", n) for qa in s.turns)
    shifted = words(qa.question for s in make_shifted_split(n) for qa in s.turns)
    return shifted - train
