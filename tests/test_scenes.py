"""Tests for roe_core.scenes: determinism, coverage, answer correctness, rendering, export."""

import json
import math
import random
import re
from collections import Counter

import pytest
from PIL import Image

from roe_core import scenes as S
from roe_core.scenes import (
    COLOURS, DIFFICULTY, QTYPES, SHAPES, SIZE_RADIUS, SIZES, Background, NotAskable, Scene, SceneObject,
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
        m = re.match(r"(?:How many|Count the) (.+?)(?: are there| are in the image| can you see)?[?.]$", q)
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
    else:
        raise AssertionError(qa.qtype)


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
