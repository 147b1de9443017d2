"""The wider training inputs (scenes/grammar.py): deterministic, meaning-preserving, and disjoint from the
shifted split's held-out words and styles, so that split still measures what was never seen."""
import json
import random
import re

from roe_core import scenes
from roe_core.scenes.grammar import (WIDE_JPEG, held_out_words, make_wide_sample, reword, wide_style)
from roe_core.scenes.shifted import SHIFTED_BACKGROUND_PALETTE, SHIFTED_JPEG, SHIFTED_OUTLINE_SCALES

N = 800


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z][a-z'-]*", text.lower()))


def test_it_is_deterministic():
    assert [make_wide_sample(s).turns for s in range(50)] == [make_wide_sample(s).turns for s in range(50)]
    assert reword("How many red objects are there?", random.Random(3)) == \
        reword("How many red objects are there?", random.Random(3))


def test_it_keeps_the_scene_and_the_answers_and_changes_the_words():
    seeds = scenes.split_seeds("train", 300)
    changed = 0
    for seed, plain in zip(seeds, scenes.make_split("train", 300)):
        wide = make_wide_sample(seed)
        assert wide.scene == plain.scene
        assert [(t.answer, t.qtype) for t in wide.turns] == [(t.answer, t.qtype) for t in plain.turns]
        changed += sum(a.question != b.question for a, b in zip(wide.turns, plain.turns))
    assert changed > 0.6 * sum(len(s.turns) for s in scenes.make_split("train", 300))


def test_every_kind_of_rewording_occurs():
    rng = random.Random(0)
    out = [reword(q, rng) for q in ["How many red objects are there?", "Is the red circle above the blue square?",
                                    "What colour is the large cross in the image?"] * 200]
    assert any(q.islower() for q in out) and any(q.isupper() for q in out)            # casing
    assert any(not q.endswith(("?", ".", "!")) for q in out)                           # punctuation dropped
    assert any(q.startswith(("Please", "Quick", "Hi!", "Hello")) for q in out)         # politeness
    assert any("pieces" in q or "elements" in q for q in out)                          # synonyms
    vocab = words(" ".join(scenes.make_split("train", 300)[k].turns[0].question for k in range(300)))
    typos = [w for q in out for w in words(q) if len(w) >= 4 and w not in vocab and w not in words(
        " ".join(a for _, alts in __import__("roe_core.scenes.grammar", fromlist=["SYNONYMS"]).SYNONYMS for a in alts))]
    assert typos                                                                       # keyboard slips


def test_no_held_out_word_or_style_of_the_shifted_split_is_used():
    held = held_out_words(800)
    assert {"color", "picture", "disc", "things"} <= held                             # the check has teeth
    for seed in scenes.split_seeds("train", N):
        w = make_wide_sample(seed)
        for t in w.turns:
            assert not (words(t.question) & held), (t.question, words(t.question) & held)
        st = w.style
        assert 96 <= st.size <= 1024 and 0.5 <= st.aspect <= 2.0
        assert st.outline_scale not in SHIFTED_OUTLINE_SCALES
        assert st.jpeg_quality is None or not SHIFTED_JPEG[0] <= st.jpeg_quality <= SHIFTED_JPEG[1]
        assert st.jpeg_quality is None or any(lo <= st.jpeg_quality <= hi for lo, hi in WIDE_JPEG)
    # backgrounds: the training palette's, never the shifted split's held-out tones
    held_tones = {c for tones in SHIFTED_BACKGROUND_PALETTE.values() for c in tones}
    assert all(make_wide_sample(s).scene.background.colour not in held_tones for s in scenes.split_seeds("train", 300))
    styles = [wide_style(random.Random(k)) for k in range(300)]
    assert min(s.size for s in styles) < 150 and max(s.size for s in styles) > 700


def test_wide_export_writes_restyled_images(tmp_path):
    path = scenes.export_llava_json("train", 6, tmp_path, wide=True)
    assert path.name == "train_wide.json"
    records = json.loads(path.read_text())
    from PIL import Image
    sizes = {Image.open(tmp_path / "images" / r["image"]).size for r in records}
    assert len(sizes) > 1                                                             # not one fixed size
    assert [r["conversations"][1]["value"] for r in records] == \
        [s.turns[0].answer for s in scenes.make_split("train", 6)]


def test_wide_questions_are_the_split_reworded_with_the_same_answers():
    plain = scenes.test_questions(12, split="val")
    wide = scenes.wide_questions(12, split="val")
    assert [q.gold for q in wide] == [q.gold for q in plain] and [q.qtype for q in wide] == [q.qtype for q in plain]
    assert sum(a.question != b.question for a, b in zip(wide, plain)) >= 6
    assert [q.question for q in scenes.wide_questions(12, split="val")] == [q.question for q in wide]
    held = held_out_words(800)
    assert not any(words(q.question) & held for q in wide)
    assert wide[1].history and wide[1].history[0][0] == wide[0].question           # earlier turns as asked


def test_routing_stages_read_the_wide_data_when_asked(tmp_path, monkeypatch):
    from roe_core.embedded import data
    monkeypatch.setattr(data, "RUNS", tmp_path)
    js = data.roe_data(4, 0, wide=True)
    assert js == tmp_path / "data_wide" / "train_wide.json"
    assert data.roe_data(4, 8, wide=True) == tmp_path / "data_wide_from8" / "train_wide.json"
    assert data.roe_data(4) == tmp_path / "data" / "train.json"
