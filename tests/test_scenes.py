"""Tests for roe_core.scenes: determinism, coverage, answer correctness, rendering, export."""

import itertools
import json
import math
import random
import re
from collections import Counter

import pytest
from PIL import Image

from roe_core import scenes as S
from roe_core.scenes import (
    COLOURS, DIFFICULTY, QA, QTYPES, SHAPES, SIZE_RADIUS, SIZES, Background, NotAskable, Scene, SceneObject,
    answers_match, ask, make_sample, make_split, normalise_answer, render, scene_targets, to_llava_records,
)

N = 300


@pytest.fixture(scope="module")
def train():
    return make_split("train", N)


# -----------------------------------------------------------------------------
# independent question parsing (regexes over the fixed vocabulary)

_NP = re.compile(
    r"\b(?:(small|large) )?(?:(" + "|".join(COLOURS) + r") )?(" + "|".join(SHAPES) + r"|object)\b"
)
_NUM = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"])}


def noun_phrases(text):
    # a bare "object" ("Which object is ...") names nothing
    return [m.groups() for m in _NP.finditer(text.lower()) if m.groups() != (None, None, "object")]


def resolve(scene, np_):
    size, colour, shape = np_
    hits = [o for o in scene.objects
            if (size is None or o.size == size) and (colour is None or o.colour == colour)
            and (shape == "object" or o.shape == shape)]
    assert len(hits) == 1, (np_, scene)
    return hits[0]


def relation_of(question):
    q = question.lower()
    if "left" in q:
        return "left"
    if "right" in q:
        return "right"
    if re.search(r"\b(above|over)\b", q):
        return "above"
    assert re.search(r"\b(below|under|beneath)\b", q), question
    return "below"


def holds(a, b, rel, margin=S.SPATIAL_MARGIN):
    d = {"left": b.x - a.x, "right": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[rel]
    return d >= margin


def clearly_false(a, b, rel, margin=S.SPATIAL_MARGIN):
    d = {"left": b.x - a.x, "right": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[rel]
    return d <= -margin


_COLOURS_RE = "|".join(COLOURS)
_SHAPES_RE = "|".join(SHAPES)
_PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}
# relation phrases, longest first so "to the left of" is never read as "left of"
_REL_PHRASE = {
    "to the left of": "left", "on the left of": "left", "left of": "left",
    "to the right of": "right", "on the right of": "right", "right of": "right",
    "above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below",
}
_REL_RE = "|".join(sorted(_REL_PHRASE, key=len, reverse=True))
NUMBER_WORD_ANSWERS = [w.capitalize() + "." for w in _NUM]
# one noun phrase, as the question generator may write it ("circle", "red circle", "large red circle",
# "red object", "small red object")
_NP_RE = rf"(?:(?:small|large) )?(?:(?:{_COLOURS_RE}) )?(?:{_SHAPES_RE}|object)"
# what a count question counts: "objects", "red objects" or a shape plural
_CLASS_RE = rf"(?:(?:{_COLOURS_RE}) )?objects|{'|'.join(_PLURALS)}"
_SLOTS = {
    "art": r"an?", "np": _NP_RE, "np2": _NP_RE, "p": _CLASS_RE, "rel": _REL_RE, "w": r"bigger|larger|smaller",
}
# every phrasing a training question may have (the checker's own copy: a new template must be added here)
_TEMPLATES = {
    "exist": ("Is there {art} {np}?", "Is there {art} {np} in the image?", "Can you see {art} {np}?",
              "Does the image contain {art} {np}?", "Is {art} {np} visible?", "Do you see {art} {np} anywhere?"),
    "colour": ("What colour is the {np}?", "What is the colour of the {np}?", "Which colour is the {np}?",
               "Name the colour of the {np}.", "The {np} is which colour?"),
    "shape": ("What shape is the {np}?", "What is the shape of the {np}?", "Which shape is the {np}?",
              "Name the shape of the {np}.", "The {np} has which shape?"),
    "count": ("How many {p} are there?", "How many {p} are in the image?", "How many {p} can you see?",
              "Count the {p}.", "What is the number of {p}?", "How many {p} does the image show?"),
    "spatial": ("What is {rel} the {np}?", "Which object is {rel} the {np}?", "Is the {np} {rel} the {np2}?"),
    "compare": ("Is the {np} {w} than the {np2}?", "Which is {w}, the {np} or the {np2}?",
                "Which object is {w}: the {np} or the {np2}?"),
    "describe": ("Describe the objects from left to right.", "List the objects from left to right.",
                 "What is in the image, from left to right?", "Name every object, left to right."),
    "relcount": ("How many {p} are {rel} the {np}?", "Count the {p} {rel} the {np}."),
}


def _template_re(template):
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_SLOTS[part]})")
    return re.compile("".join(out))


_TEMPLATE_RES = {qtype: [_template_re(t) for t in ts] for qtype, ts in _TEMPLATES.items()}


def parse_question(qa):
    """The slots of the one template that `qa.question` is an instance of (asserts there is one)."""
    hits = [m.groupdict() for r in _TEMPLATE_RES[qa.qtype] if (m := r.fullmatch(qa.question))]
    assert len(hits) == 1, (qa.qtype, qa.question, hits)
    return hits[0]


def parse_class(p):
    """'red objects' -> ('red', None); 'crosses' -> (None, 'cross'); 'objects' -> (None, None)."""
    m = re.fullmatch(rf"(?:({_COLOURS_RE}) )?objects|({'|'.join(_PLURALS)})", p)
    assert m, p
    return m.group(1), _PLURALS.get(m.group(2))


def member(o, colour, shape):
    return (colour is None or o.colour == colour) and (shape is None or o.shape == shape)


def in_band(a, b, rel, margin=S.SPATIAL_MARGIN):
    return not holds(a, b, rel, margin) and not clearly_false(a, b, rel, margin)


def check_template(qa):
    """The question is one of the known phrasings, with the right article; the answer is well formed."""
    f = parse_question(qa)
    if "art" in f:
        assert f["art"] == ("an" if f["np"][0] in "aeiou" else "a"), qa.question
    a = qa.answer
    if qa.qtype in ("exist",):
        assert a in ("Yes.", "No."), a
    elif qa.qtype == "colour":
        assert a[:-1].lower() in COLOURS and a == a[:-1].capitalize() + ".", a
    elif qa.qtype == "shape":
        assert re.fullmatch(rf"A (?:{_SHAPES_RE})\.", a), a
    elif qa.qtype in ("count", "relcount"):
        assert a in NUMBER_WORD_ANSWERS, a
    elif qa.qtype in ("spatial", "compare"):
        assert a in ("Yes.", "No.") or re.fullmatch(rf"The {_NP_RE}\.", a), a


def check_qa(scene, qa):
    q, a, objs = qa.question, qa.answer, scene.objects
    na = normalise_answer(a)
    if qa.qtype == "exist":
        (np_,) = noun_phrases(q)
        _, colour, shape = np_
        present = any(o.shape == shape and (colour is None or o.colour == colour) for o in objs)
        assert a == ("Yes." if present else "No."), (q, a)
    elif qa.qtype == "colour":
        (np_,) = noun_phrases(q)
        assert np_[1] is None  # the colour must not be named in the question
        assert na == resolve(scene, np_).colour
    elif qa.qtype == "shape":
        (np_,) = noun_phrases(q)
        assert np_[2] == "object"
        assert na == resolve(scene, np_).shape
    elif qa.qtype == "count":
        m = re.match(r"(?:How many|Count the|What is the number of) (.+?)"
                     r"(?: are there| are in the image| can you see| does the image show)?[?.]$", q)
        words = m.group(1).split()
        target = words[-1]
        colour = words[0] if len(words) == 2 else None
        shape = None if target == "objects" else target[:-2] if target == "crosses" else target[:-1]
        n = sum((shape is None or o.shape == shape) and (colour is None or o.colour == colour) for o in objs)
        assert _NUM[na] == n, (q, a)
    elif qa.qtype == "spatial":
        rel = relation_of(q)
        nps = noun_phrases(q)
        if a in ("Yes.", "No."):
            x, y = resolve(scene, nps[0]), resolve(scene, nps[1])
            if a == "Yes.":
                assert holds(x, y, rel), (q, a)
            else:
                assert clearly_false(x, y, rel), (q, a)
        else:
            (ref_np,) = nps
            ref = resolve(scene, ref_np)
            (ans_np,) = noun_phrases(a)
            ans = resolve(scene, ans_np)
            assert holds(ans, ref, rel), (q, a)
            for o in objs:  # the answer is the only object in that relation, and no one is borderline
                if o is not ref and o is not ans:
                    assert clearly_false(o, ref, rel), (q, a, o)
    elif qa.qtype == "compare":
        x, y = (resolve(scene, np_) for np_ in noun_phrases(q)[:2])
        assert x.size != y.size
        assert all(np_[0] is None for np_ in noun_phrases(q))  # size is never given away
        wants_large = "smaller" not in q
        if a in ("Yes.", "No."):
            assert a == ("Yes." if (x.size == "large") == wants_large else "No."), (q, a)
        else:
            winner = resolve(scene, noun_phrases(a)[0])
            assert (winner.size == "large") == wants_large, (q, a)
    elif qa.qtype == "describe":
        nps = noun_phrases(a)
        assert len(nps) == len(objs)
        listed = [resolve(scene, np_) for np_ in nps]
        assert [o.x for o in listed] == sorted(o.x for o in objs)
        assert all(np_[0] is not None for np_ in nps)
        xs = sorted(o.x for o in objs)  # the order is never a judgement call
        assert all(b - a >= S.DESCRIBE_MARGIN for a, b in zip(xs, xs[1:])), (q, a)
    elif qa.qtype == "relcount":
        f = parse_question(qa)
        (ref_np,) = noun_phrases(f["np"])
        rel, ref = _REL_PHRASE[f["rel"]], resolve(scene, ref_np)
        colour, shape = parse_class(f["p"])
        others = [o for o in objs if o is not ref]
        # documented guarantee: no other object at all sits in the ambiguous band on that axis
        assert not any(in_band(o, ref, rel) for o in others), (q, a)
        n = sum(member(o, colour, shape) and holds(o, ref, rel) for o in others)
        assert _NUM[na] == n, (q, a)
        assert a == NUMBER_WORD_ANSWERS[n], (q, a)
    else:
        raise AssertionError(qa.qtype)
    check_template(qa)


# -----------------------------------------------------------------------------
# brute force: the SET of answers a careful reader could defend, from the scene alone

_NUM_WORDS = list(_NUM)


def referents(scene, np_text):
    """Every object a noun phrase could mean (no uniqueness assumed)."""
    (np_,) = noun_phrases(np_text)
    size, colour, shape = np_
    return [o for o in scene.objects if (size is None or o.size == size) and (colour is None or o.colour == colour)
            and (shape == "object" or o.shape == shape)]


def name_of(scene, o):
    """How an answer names an object: colour + shape, with the size only when colour + shape is shared."""
    twins = [p for p in scene.objects if p.shape == o.shape and p.colour == o.colour]
    return f"{o.size} {o.colour} {o.shape}" if len(twins) > 1 else f"{o.colour} {o.shape}"


def _listing(objs):
    parts = [f"{'an' if o.size[0] in 'aeiou' else 'a'} {o.size} {o.colour} {o.shape}" for o in objs]
    return normalise_answer((parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]) + ".")


def answer_set(scene, qa):
    """All normalised answers that are right under some reading of the question: every referent a noun
    phrase could mean, and every side an object in the ambiguous band (|delta| < SPATIAL_MARGIN) could be
    said to be on; for describe every order that does not list an object before one DESCRIBE_MARGIN or
    more to its left."""
    f, objs, t = parse_question(qa), scene.objects, qa.qtype
    if t == "exist":
        return {"yes" if referents(scene, f["np"]) else "no"}
    if t == "colour":
        return {o.colour for o in referents(scene, f["np"])}
    if t == "shape":
        return {o.shape for o in referents(scene, f["np"])}
    if t == "count":
        colour, shape = parse_class(f["p"])
        return {_NUM_WORDS[sum(member(o, colour, shape) for o in objs)]}
    if t == "relcount":
        colour, shape = parse_class(f["p"])
        rel, out = _REL_PHRASE[f["rel"]], set()
        for ref in referents(scene, f["np"]):
            cands = [o for o in objs if o is not ref and member(o, colour, shape)]
            sure = sum(holds(o, ref, rel) for o in cands)
            maybe = sum(in_band(o, ref, rel) for o in cands)
            out |= {_NUM_WORDS[n] for n in range(sure, sure + maybe + 1)}
        return out
    if t == "spatial":
        rel, out = _REL_PHRASE[f["rel"]], set()
        if "np2" in f:  # yes / no
            for a in referents(scene, f["np"]):
                for b in referents(scene, f["np2"]):
                    if holds(a, b, rel):
                        out.add("yes")
                    elif clearly_false(a, b, rel):
                        out.add("no")
                    else:
                        out |= {"yes", "no"}
            return out
        for b in referents(scene, f["np"]):  # open: anything not clearly on the wrong side could be meant
            out |= {name_of(scene, o) for o in objs if o is not b and not clearly_false(o, b, rel)}
        return out
    if t == "compare":
        wants_large, out = f["w"] != "smaller", set()
        for a in referents(scene, f["np"]):
            for b in referents(scene, f["np2"]):
                if qa.question.startswith("Is "):
                    out.add("yes" if a.size != b.size and (a.size == "large") == wants_large else "no")
                elif a.size == b.size:
                    out |= {name_of(scene, a), name_of(scene, b)}
                else:
                    out.add(name_of(scene, a if (a.size == "large") == wants_large else b))
        return out
    if t == "describe":
        n = len(objs)
        return {_listing(perm) for perm in itertools.permutations(objs)
                if all(perm[i].x - perm[j].x < S.DESCRIBE_MARGIN for i in range(n) for j in range(i + 1, n))}
    raise AssertionError(t)


def assert_unique(scene, qa):
    """Every noun phrase of the question names exactly one object, and exactly one answer is right: the
    generated one."""
    f = parse_question(qa)
    if qa.qtype != "exist":  # "Is there a circle?" may well match several
        for slot in ("np", "np2"):
            if slot in f:
                assert len(referents(scene, f[slot])) == 1, (qa.question, f[slot], scene)
    got = answer_set(scene, qa)
    assert got == {normalise_answer(qa.answer)}, (qa.question, qa.answer, got, scene)


# -----------------------------------------------------------------------------
# determinism and splits


def test_determinism():
    a, b = make_sample(123), make_sample(123)
    assert a == b
    assert render(a.scene).tobytes() == render(b.scene).tobytes()
    assert make_split("val", 5) == make_split("val", 5)
    assert make_sample(123) != make_sample(124)


def test_splits_disjoint():
    splits = {name: make_split(name, 50) for name in ("train", "val", "test")}
    ids = [s.id for v in splits.values() for s in v]
    seeds = [s.seed for v in splits.values() for s in v]
    assert len(set(ids)) == len(ids) == 150
    assert len(set(seeds)) == 150
    ranges = [S.split_seeds(name, S.SPLIT_SPAN) for name in ("train", "val", "test")]
    assert not set(ranges[0]) & {ranges[1][0], ranges[2][0]} and ranges[0][-1] < ranges[1][0] < ranges[2][0]
    with pytest.raises(ValueError):
        make_split("dev", 3)


def test_split_slice_from_start():
    assert make_split("train", 3, start=4) == make_split("train", 7)[4:]
    with pytest.raises(ValueError, match="start"):
        make_split("train", 3, start=-1)
    with pytest.raises(ValueError):
        make_split("train", 3, start=S.SPLIT_SPAN - 2)      # past the split's end


# -----------------------------------------------------------------------------
# question coverage and correctness


def test_vocab():
    assert len(SHAPES) == 4 and len(COLOURS) == 6 and SIZES == ("small", "large")
    assert set(DIFFICULTY) == set(QTYPES)
    rgb = list(S.COLOUR_RGB.values())
    assert min(math.dist(p, q) for i, p in enumerate(rgb) for q in rgb[i + 1:]) > 60


def test_all_qtypes_and_both_yes_no(train):
    turns = [qa for s in train for qa in s.turns]
    counts = Counter(qa.qtype for qa in turns)
    assert set(counts) == set(QTYPES)
    assert min(counts.values()) > 0.5 * len(turns) / len(QTYPES)  # roughly balanced
    for qtype in ("exist", "spatial", "compare"):
        answers = Counter(qa.answer for qa in turns if qa.qtype == qtype)
        assert answers["Yes."] > 0 and answers["No."] > 0, (qtype, answers)
    ex = Counter(qa.answer for qa in turns if qa.qtype == "exist")
    assert abs(ex["Yes."] - ex["No."]) < 0.4 * (ex["Yes."] + ex["No."])
    assert any(qa.answer == "Zero." for qa in turns if qa.qtype == "count")
    assert any(not qa.answer.startswith(("Yes", "No")) for qa in turns if qa.qtype == "spatial")
    for s in train:
        assert 1 <= len(s.turns) <= 3
        assert len({qa.qtype for qa in s.turns}) == len(s.turns)  # distinct types within a sample
    # template variety: several phrasings per type
    for qtype in QTYPES:
        starts = {" ".join(qa.question.split()[:3]) for qa in turns if qa.qtype == qtype}
        assert len(starts) >= 2, qtype


def test_answers_correct(train):
    for s in train:
        for qa in s.turns:
            check_qa(s.scene, qa)


def test_ask_every_type_many_scenes():
    rng = random.Random(7)
    asked = 0
    for _ in range(150):
        scene = S.random_scene(rng)
        for qtype in QTYPES:
            try:
                qa = ask(scene, qtype, rng)
            except NotAskable:
                assert not S.askable(scene, qtype)
                continue
            assert qa.qtype == qtype and qa.answer.endswith(".") and qa.question[-1] in "?."
            check_qa(scene, qa)
            asked += 1
    assert asked > 500


def test_not_askable_and_restricted_qtypes():
    one = Scene([SceneObject("circle", "red", "small", 0.5, 0.5)])
    for qtype in ("spatial", "compare"):
        with pytest.raises(NotAskable):
            ask(one, qtype, random.Random(0))
    with pytest.raises(ValueError):
        ask(one, "nonsense", random.Random(0))
    s = make_sample(5, n_turns=2, qtypes=("exist", "count"))
    assert sorted(qa.qtype for qa in s.turns) == ["count", "exist"]
    s = make_sample(6, n_turns=1, qtypes=("compare",))
    assert [qa.qtype for qa in s.turns] == ["compare"]
    assert S.qtypes_up_to(1) == ("exist", "colour", "shape")


def test_describe_example():
    scene = Scene([SceneObject("square", "blue", "small", 0.8, 0.3), SceneObject("circle", "red", "large", 0.2, 0.6)])
    assert S.describe(scene) == "A large red circle and a small blue square."
    qa = ask(scene, "describe", random.Random(0))
    assert qa.answer == "A large red circle and a small blue square."


# -----------------------------------------------------------------------------
# geometry and rendering


def test_objects_inside_and_non_overlapping(train):
    for s in train:
        objs = s.scene.objects
        assert 1 <= len(objs) <= 4
        for o in objs:
            r = SIZE_RADIUS[o.size]
            assert r <= o.x <= 1 - r and r <= o.y <= 1 - r
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                assert math.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius


def test_render_size_and_visible_at_64(train):
    for s in train[:40]:
        for size in (256, 64):
            img = render(s.scene, size)
            assert img.mode == "RGB" and img.size == (size, size)
        img = render(s.scene, 64)
        bg = render(Scene([], s.scene.background), 64)
        for o in s.scene.objects:
            px = (min(int(o.x * 64), 63), min(int(o.y * 64), 63))
            diff = sum(abs(p - q) for p, q in zip(img.getpixel(px), bg.getpixel(px)))
            assert diff > 60, (o, s.scene.background)
            fill = S.COLOUR_RGB[o.colour]
            assert math.dist(img.getpixel(px), fill) < 40  # the centre shows the object's own colour


def test_backgrounds_neutral_and_varied(train):
    kinds = Counter(s.scene.background.kind for s in train)
    assert set(kinds) == set(S.BACKGROUND_KINDS)
    assert {s.scene.background.tone for s in train} == {"light", "dark"}
    for s in train[:40]:
        small = render(Scene([], s.scene.background), 32)
        for r, g, b in (small.getpixel((x, y)) for x in range(32) for y in range(32)):  # near-grey: far from every saturated object colour
            assert max(r, g, b) - min(r, g, b) < 40


# -----------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("pred,gold", [
    ("Two.", "2"), ("2", "two"), ("A triangle.", "triangle"), ("triangle", "A triangle."),
    ("  yes ", "Yes."), ("The red circle.", "red circle"), ("An orange square!", "orange square"),
    ("Blue", "Blue."), ("zero", "0"),
])
def test_answers_match(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize("pred,gold", [("Three.", "Two."), ("No.", "Yes."), ("red square", "red circle"), ("", "Yes.")])
def test_answers_mismatch(pred, gold):
    assert not answers_match(pred, gold)


def test_normalise_answer():
    assert normalise_answer("A large red circle, and a small blue square.") == "large red circle and a small blue square"
    assert normalise_answer("Two.") == "two"
    assert normalise_answer("the 3") == "three"


# -----------------------------------------------------------------------------
# vision targets


def test_scene_targets(train):
    for s in train[:50]:
        t = scene_targets(s.scene)
        k = S.GRID * S.GRID
        assert all(len(t[key]) == k for key in ("cell_shape", "cell_colour", "cell_size", "cell_class"))
        assert t["n_objects"] == len(s.scene.objects) == sum(c > 0 for c in t["cell_class"])
        assert sum(t["shape_counts"]) == sum(t["colour_counts"]) == sum(t["size_counts"]) == t["n_objects"]
        assert all(0 <= c < S.N_CELL_CLASSES for c in t["cell_class"])
    scene = Scene([SceneObject("cross", "orange", "large", 0.9, 0.1)])
    t = scene_targets(scene)
    i = 0 * S.GRID + 3  # top row, right-most column
    assert (t["cell_shape"][i], t["cell_colour"][i], t["cell_size"][i]) == (4, 6, 2)
    assert t["cell_class"][i] == S.N_CELL_CLASSES - 1
    assert t["shape_counts"] == [0, 0, 0, 1]


# -----------------------------------------------------------------------------
# LLaVA export


def test_llava_export(tmp_path):
    samples = make_split("test", 6)
    records = to_llava_records(samples, tmp_path / "img", image_size=64)
    assert len(records) == 6
    for rec, s in zip(records, samples):
        assert rec["id"] == s.id and rec["image"] == f"{s.id}.png"
        conv = rec["conversations"]
        assert len(conv) == 2 * len(s.turns)
        assert [c["from"] for c in conv] == ["human", "gpt"] * len(s.turns)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum("<image>" in c["value"] for c in conv) == 1
        assert [c["value"] for c in conv[1::2]] == [qa.answer for qa in s.turns]
        assert rec["qtypes"] == [qa.qtype for qa in s.turns]
        assert S.scene_from_dict(json.loads(json.dumps(rec["scene"]))) == s.scene
        with Image.open(tmp_path / "img" / rec["image"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"

    path = S.export_llava_json("val", 3, tmp_path / "out", image_size=64)
    data = json.loads(path.read_text())
    assert path.name == "val.json" and len(data) == 3
    assert all((tmp_path / "out" / "images" / r["image"]).exists() for r in data)


def test_cli(tmp_path):
    S.main(["--split", "train", "--n", "2", "--out", str(tmp_path / "d"), "--image-size", "64",
            "--preview", str(tmp_path / "p.png"), "--preview-n", "2"])
    assert len(json.loads((tmp_path / "d" / "train.json").read_text())) == 2
    with Image.open(tmp_path / "p.png") as im:
        assert im.size[0] > 256


# -----------------------------------------------------------------------------
# every answer is defined uniquely


@pytest.fixture(scope="module")
def shifted():
    return S.make_shifted_split(200)


def test_every_answer_unique(train, shifted):
    samples = train + make_split("val", 150) + make_split("test", 150)
    seen = Counter()
    for s in samples:
        for qa in s.turns:
            assert_unique(s.scene, qa)
            seen[qa.qtype] += 1
    for s in shifted:
        (qa,) = s.turns
        if not _garbled(qa.question):
            assert_unique(s.scene, QA(unshift(qa.question), qa.answer, qa.qtype))
            seen[qa.qtype] += 1
    assert set(seen) == set(QTYPES) and min(seen.values()) >= 40, seen
    # and straight from ask(), over every type the scene allows
    rng = random.Random(11)
    for _ in range(100):
        scene = S.random_scene(rng, max_objects=S.MAX_OBJECTS)
        for qtype in QTYPES:
            if S.askable(scene, qtype):
                assert_unique(scene, ask(scene, qtype, rng))


def assert_caught(scene, bad, readings):
    """`bad` (a question the generator must never ask) has these valid readings, so the uniqueness
    check rejects it."""
    assert answer_set(scene, bad) == readings
    with pytest.raises(AssertionError):
        assert_unique(scene, bad)


def test_uniqueness_check_can_fail():
    # two objects 0.03 apart in x: "left to right" has two readings, so describe is not askable
    close = Scene([SceneObject("circle", "red", "small", 0.30, 0.25), SceneObject("square", "blue", "small", 0.33, 0.75),
                   SceneObject("cross", "green", "large", 0.75, 0.5)])
    with pytest.raises(NotAskable):
        ask(close, "describe", random.Random(0))
    assert not S.askable(close, "describe")
    bad = QA("Describe the objects from left to right.", S.describe(close), "describe")
    assert len(answer_set(close, bad)) == 2
    with pytest.raises(AssertionError):
        assert_unique(close, bad)
    # 0.06 apart is enough
    spaced = Scene([SceneObject("circle", "red", "small", 0.30, 0.25), SceneObject("square", "blue", "small", 0.36, 0.75)])
    qa = ask(spaced, "describe", random.Random(0))
    assert qa.answer == "A small red circle and a small blue square."
    assert_unique(spaced, qa)

    # relcount: the circle at x 0.45 is in the band around the square at x 0.5, so "left of the red square"
    # could count one or two circles; only above / below may be asked about the square
    scene = Scene([SceneObject("square", "red", "large", 0.5, 0.5), SceneObject("circle", "blue", "small", 0.45, 0.15),
                   SceneObject("circle", "green", "small", 0.15, 0.85)])
    bad = QA("How many circles are left of the red square?", "One.", "relcount")
    assert_caught(scene, bad, {"one", "two"})
    with pytest.raises(AssertionError):
        check_qa(scene, bad)
    rels = Counter()
    for seed in range(200):
        qa = ask(scene, "relcount", random.Random(seed))
        check_qa(scene, qa)
        assert_unique(scene, qa)
        f = parse_question(qa)
        ref = resolve(scene, noun_phrases(f["np"])[0])
        rels[(ref.shape, _REL_PHRASE[f["rel"]])] += 1
    assert not {("square", "left"), ("square", "right")} & set(rels), rels
    assert ("square", "above") in rels or ("square", "below") in rels
    # every object has another one in its band on both axes: relcount is not askable at all
    crowded = Scene([SceneObject("circle", "red", "small", 0.2, 0.2), SceneObject("square", "red", "small", 0.25, 0.8),
                     SceneObject("cross", "blue", "small", 0.8, 0.25), SceneObject("triangle", "blue", "small", 0.75, 0.75)])
    with pytest.raises(NotAskable):
        ask(crowded, "relcount", random.Random(0))

    # an ambiguous reference and an ambiguous open spatial question are caught too
    two = Scene([SceneObject("circle", "red", "small", 0.2, 0.2), SceneObject("circle", "blue", "large", 0.7, 0.7)])
    assert_caught(two, QA("What colour is the circle?", "Red.", "colour"), {"red", "blue"})
    band = Scene([SceneObject("circle", "red", "small", 0.5, 0.2), SceneObject("square", "blue", "small", 0.2, 0.8),
                  SceneObject("cross", "green", "small", 0.42, 0.8)])
    assert_caught(band, QA("What is left of the red circle?", "The blue square.", "spatial"),
                  {"blue square", "green cross"})


def test_relcount_in_splits(train):
    turns = [qa for s in train for qa in s.turns if qa.qtype == "relcount"]
    assert len(turns) > 20
    answers = Counter(qa.answer for qa in turns)
    assert answers["Zero."] > 0 and sum(v for a, v in answers.items() if a != "Zero.") > 0, answers
    assert DIFFICULTY["relcount"] == 3 and "relcount" not in S.qtypes_up_to(2)
    phrasings = {parse_question(qa)["rel"] for qa in turns}
    assert len(phrasings) >= 5, phrasings
    assert {parse_class(parse_question(qa)["p"])[0] is None for qa in turns} == {True, False}  # shapes and colours


def test_new_templates_used(train):
    """Each template of the checker's list is drawn by the generator (so the list is neither stale nor short)."""
    rng = random.Random(3)
    used = {qtype: set() for qtype in QTYPES}
    for s in train:
        for qa in s.turns:
            used[qa.qtype] |= {i for i, r in enumerate(_TEMPLATE_RES[qa.qtype]) if r.fullmatch(qa.question)}
    for _ in range(300):
        scene = S.random_scene(rng)
        for qtype in QTYPES:
            if S.askable(scene, qtype):
                qa = ask(scene, qtype, rng)
                used[qtype] |= {i for i, r in enumerate(_TEMPLATE_RES[qtype]) if r.fullmatch(qa.question)}
    for qtype, ts in _TEMPLATES.items():
        assert used[qtype] == set(range(len(ts))), (qtype, [t for i, t in enumerate(ts) if i not in used[qtype]])


# -----------------------------------------------------------------------------
# the shifted split

def _plural(noun):
    return noun + ("es" if noun[-1] in "sx" else "s")


# shifted noun -> canonical noun; longest first, so "round shapes" goes before "shapes" and "disc"
_SHIFT_BACK = sorted(
    [(_plural(alt), S.SHAPE_PLURALS[shape]) for shape, alts in S.SHIFTED_SHAPE_NOUNS.items() for alt in alts]
    + [(alt, shape) for shape, alts in S.SHIFTED_SHAPE_NOUNS.items() for alt in alts]
    + [(w, "objects") for w in ("shapes", "items", "things")] + [(w, "object") for w in S.SHIFTED_OBJECT_NOUNS],
    key=lambda kv: -len(kv[0]))
_SHIFT_MARKER = re.compile(
    r"\bcolor|^(?:" + "|".join(map(re.escape, S.SHIFTED_PREFIXES)) + r")|^Of the |^Tell me how many "
    + "|" + "|".join(rf"\b{re.escape(w)}\b" for w, _ in _SHIFT_BACK))


def unshift(q):
    """A shifted question back in training words (the reverse of shift_question, written independently)."""
    for prefix in S.SHIFTED_PREFIXES:
        if q.startswith(prefix):
            q = q[len(prefix)].upper() + q[len(prefix) + 1:]
            break
    if m := re.fullmatch(r"Of the (.+) and the (.+), which is (\w+)\?", q):
        q = f"Which is {m[3]}, the {m[1]} or the {m[2]}?"
    if m := re.fullmatch(r"Tell me how many (.+) there are\.", q):
        q = f"How many {m[1]} are there?"
    q = re.sub(r"\bcolor", "colour", q)
    for alt, canon in _SHIFT_BACK:
        q = re.sub(rf"\b{re.escape(alt)}\b", canon, q)
    q = re.sub(r"\ban ([^aeiou])", r"a \1", q)
    return re.sub(r"\ba ([aeiou])", r"an \1", q)


def _garbled(q):
    # known shift_question bug (see test_shift_question_square_plural): "squares" -> "square shape shapes";
    # skipped elsewhere so the other shifted tests keep checking everything else
    return "square shape shapes" in q


def test_shift_question_square_plural(shifted):
    """shift_question replaces "squares" by "square shapes" and then the "square" inside it by
    "square shape" again: "How many square shape shapes are there?" (about 1 shifted question in 100)."""
    for seed in range(40):
        q = S.shift_question("How many squares are to the left of the red circle?", random.Random(seed))
        assert "shape shapes" not in q, (seed, q)
    bad = [s.turns[0].question for s in shifted if _garbled(s.turns[0].question)]
    assert not bad, bad


def _same_meaning(q):
    # the shifted reorder drops "object" from "Which object is bigger: the A or the B?"
    return re.sub(r"^Which object is (\w+): the (.+) or the (.+)\?$", r"Which is \1, the \2 or the \3?", q)


def test_shift_nouns_invertible():
    alts = [w for w, _ in _SHIFT_BACK]
    assert len(set(alts)) == len(alts)
    vocab = set(SHAPES) | set(S.SHAPE_PLURALS.values()) | set(COLOURS) | set(SIZES) | {"object", "objects", "shape"}
    assert not set(alts) & vocab
    assert unshift("In the scene, how many discs are to the left of the large blue box?") == \
        "How many circles are to the left of the large blue square?"
    assert unshift("Of the orange plus shape and the red three-sided shape, which is larger?") == \
        "Which is larger, the orange cross or the red triangle?"
    assert unshift("Tell me how many green things there are.") == "How many green objects are there?"
    assert unshift("Tell me: is there an orange round shape?") == "Is there an orange circle?"
    assert unshift("Is there a orange thing?") == "Is there an orange object?"


def test_shifted_deterministic(shifted):
    again = S.make_shifted_split(200)
    assert again == shifted  # questions, answers, scenes and styles
    assert S.make_shifted_split(5, start=7) == shifted[7:12]
    assert S.make_shifted_sample(S.SPLIT_BASE["shifted"] + 3) == shifted[3]
    with pytest.raises(ValueError, match="start"):
        S.make_shifted_split(3, start=-1)
    small = [s for s in shifted if s.style.size <= 200]
    picks = [next(s for s in small if s.style.jpeg_quality is not None and s.style.aspect != 1.0),
             next(s for s in small if s.style.jpeg_quality is None)]
    for s in picks:
        img = s.image()
        assert img.tobytes() == S.make_shifted_sample(s.seed).image().tobytes()
        assert img.tobytes() == S.render_styled(s.scene, s.style).tobytes()


def test_shifted_disjoint_from_training(train, shifted):
    base, span = S.SPLIT_BASE["shifted"], S.SPLIT_SPAN
    others = [S.split_seeds(name, span) for name in ("train", "val", "test")]
    assert [s.seed for s in shifted] == list(range(base, base + len(shifted)))
    for s in shifted:
        assert isinstance(s, S.ShiftedSample) and len(s.turns) == 1
        assert s.id == f"shifted-{s.seed:08d}"
        assert not any(s.seed in r for r in others)
    assert not {s.id for s in shifted} & {s.id for s in train}
    assert not any(s.scene.objects == t.scene.objects for s in shifted for t in train[:100])
    # the held-out words and phrasings never reach a training question ...
    for split in ("train", "val", "test"):
        for smp in make_split(split, 150):
            for qa in smp.turns:
                assert not _SHIFT_MARKER.search(qa.question), (split, qa.question)
    # ... and almost every shifted question uses some; those that do not are their source question verbatim
    marked = 0
    for s in shifted:
        (qa,) = s.turns
        assert not re.search(r"colour", qa.question), qa.question
        src = make_sample(s.seed, n_turns=1).turns[0]
        if _SHIFT_MARKER.search(qa.question):
            marked += 1
            assert qa.question != src.question
        else:
            assert qa.question == src.question
    assert marked >= 0.8 * len(shifted), marked


def test_shifted_answers_correct(shifted):
    """Shifted back into training words, each question is its source question (same meaning), and the
    canonical answer is right for the shifted sample's own scene."""
    reordered = 0
    for s in shifted:
        (qa,) = s.turns
        src = make_sample(s.seed, n_turns=1)
        assert s.scene.objects == src.scene.objects
        (sq,) = src.turns
        assert (qa.answer, qa.qtype) == (sq.answer, sq.qtype)
        if _garbled(qa.question):
            continue
        back = unshift(qa.question)
        assert not _SHIFT_MARKER.search(back), (qa.question, back)
        assert _same_meaning(back) == _same_meaning(sq.question), (qa.question, back, sq.question)
        check_qa(s.scene, QA(back, qa.answer, qa.qtype))
        reordered += qa.question.startswith(("Of the ", "Tell me how many "))
    assert reordered > 0


def test_shifted_styles(shifted):
    sizes, aspects, jpegs, scales = [], [], [], set()
    for s in shifted:
        st = s.style
        assert isinstance(st.size, int) and S.SHIFTED_SIZES[0] <= st.size <= S.SHIFTED_SIZES[1], st
        assert S.SHIFTED_ASPECTS[0] <= st.aspect <= S.SHIFTED_ASPECTS[1], st
        assert st.outline_scale in S.SHIFTED_OUTLINE_SCALES and st.outline_scale != 1.0, st
        assert st.jpeg_quality is None or (isinstance(st.jpeg_quality, int)
                                           and S.SHIFTED_JPEG[0] <= st.jpeg_quality <= S.SHIFTED_JPEG[1]), st
        sizes.append(st.size)
        aspects.append(st.aspect)
        jpegs.append(st.jpeg_quality)
        scales.add(st.outline_scale)
    assert min(sizes) < 150 and max(sizes) > 700
    assert min(aspects) < 0.7 and max(aspects) > 1.4 and 1.0 in aspects
    assert None in jpegs and sum(j is not None for j in jpegs) > len(jpegs) / 2
    assert scales == set(S.SHIFTED_OUTLINE_SCALES)


def _possible_colours(palette):
    out = set()
    for tone, cols in palette.items():
        towards_middle = -1 if tone == "light" else 1
        for c in cols:
            for d in (0, 22, 40):
                out.add(tuple(max(0, min(255, v + d * towards_middle)) for v in c))
    return out


def test_shifted_backgrounds(shifted):
    assert not _possible_colours(S.SHIFTED_BACKGROUND_PALETTE) & _possible_colours(S.BACKGROUND_PALETTE)
    train_colours = _possible_colours(S.BACKGROUND_PALETTE)
    for s in shifted:
        bg = s.scene.background
        assert bg.colour in S.SHIFTED_BACKGROUND_PALETTE[bg.tone], bg
        assert bg.colour not in train_colours and bg.colour2 not in train_colours, bg
    assert {s.scene.background.kind for s in shifted} == set(S.BACKGROUND_KINDS)
    for s in shifted[:20]:
        small = render(Scene([], s.scene.background), 32)
        for r, g, b in (small.getpixel((x, y)) for x in range(32) for y in range(32)):  # still neutral
            assert max(r, g, b) - min(r, g, b) < 40


def test_non_square_render(shifted):
    s = next(s for s in shifted if len(s.scene.objects) >= 2)
    for size, aspect, want in ((100, 2.0, (200, 100)), (100, 0.5, (100, 200)), (96, 1.5, (144, 96)),
                               (120, 1.0, (120, 120))):
        for outline in (0.4, 2.5):
            img = render(s.scene, size, aspect, outline)
            assert img.mode == "RGB" and img.size == want
            w, h = img.size
            for o in s.scene.objects:  # each centre, at its fraction of width and height, shows its colour
                px = (min(int(o.x * w), w - 1), min(int(o.y * h), h - 1))
                assert math.dist(img.getpixel(px), S.COLOUR_RGB[o.colour]) < 40, (size, aspect, o)
    # the samples' own images: short side is style.size, width / height is style.aspect
    for st in [x.style for x in shifted if x.style.size <= 160 and x.style.aspect != 1.0][:3]:
        img = S.render_styled(s.scene, st)
        w, h = img.size
        assert min(w, h) == st.size and abs(w / h - st.aspect) <= 1 / st.size, (img.size, st)
        assert (w > h) == (st.aspect > 1)
    plain = render(s.scene, 100, 2.0)
    squeezed = S.jpeg(plain, 60)
    assert squeezed.size == plain.size and squeezed.mode == "RGB" and squeezed.tobytes() != plain.tobytes()
    with pytest.raises(ValueError, match="aspect"):
        render(s.scene, 64, aspect=5.0)


def test_patch_labels_follow_the_padded_frame():
    """patch_labels: the patch under an object's centre shows it, far patches show background, every
    object claims a patch; on a 2:1 canvas padded to a square the same scene moves into the middle
    band of rows (the top and bottom quarters are padding)."""
    scene = Scene([SceneObject("circle", "red", "large", 0.3, 0.3), SceneObject("square", "blue", "small", 0.8, 0.8)])
    lab = S.patch_labels(scene, 1.0)
    assert len(lab) == 64
    assert lab[int(0.3 * 8) * 8 + int(0.3 * 8)] == 1 and lab[int(0.8 * 8) * 8 + int(0.8 * 8)] == 2
    assert lab[0] == 0 and lab[7] == 0 and lab[56] == 0
    assert {1, 2} <= set(lab)
    wide = S.patch_labels(scene, 2.0)
    assert {1, 2} <= set(wide)
    assert set(wide[:16]) == {0} and set(wide[48:]) == {0}      # rows 0-1 and 6-7: padding
    x, y = S.padded_xy(0.3, 0.3, 2.0)
    assert (x, y) == (0.3, pytest.approx(0.4))
    assert wide[int(y * 8) * 8 + int(x * 8)] == 1
    assert S.padded_xy(0.3, 0.3, 0.5) == (pytest.approx(0.4), 0.3)   # tall: columns squeezed instead
