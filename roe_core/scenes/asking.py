"""Asking: the question types and their difficulty, and the generators that ask one question of a
type about a scene (ask, askable, describe), with its canonical answer."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .scene import COLOURS, SHAPE_PLURALS, SHAPES, Scene, SceneObject

# -----------------------------------------------------------------------------
# question vocabulary

QTYPES = ("exist", "colour", "shape", "count", "spatial", "compare", "describe", "relcount")
# relcount is multi-step: filter by attribute, locate a reference, count on one side of it
DIFFICULTY = {"exist": 1, "colour": 1, "shape": 1, "count": 2, "spatial": 3, "compare": 3, "describe": 3,
              "relcount": 3}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

SPATIAL_MARGIN = 0.12  # centres must differ by this much on an axis to ask about it
DESCRIBE_MARGIN = 0.06  # describe lists objects left to right: their centres differ by this much in x


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
