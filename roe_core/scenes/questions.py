"""Question sets: what the benchmark, the route atlas and the threshold sweep ask.

    test_questions(n)               the first n questions of a fixed scene split (test by default)
    shifted_questions(n)            the shifted split: phrasings, sizes and tones never trained on
    wide_questions(n, split)        a split's scenes reworded and restyled by scenes.grammar (its
                                    training-side grammar: never the shifted split's held-out words)
    load_llava_questions(path)      a LLaVA JSON file (or a folder holding one) of your own images

Each Question has an image, the question, the conversation before it, the reference answer (gold;
None when the set has none) and a type (the scene question type, or "question" for other sets).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..runtime.conversation import IMAGE_PLACEHOLDER, InputError
from .rendering import render
from .shifted import make_shifted_split
from .splits import make_sample, split_seeds


@dataclass
class Question:
    image: object                    # PIL image or a path
    question: str
    history: list[tuple[str, str]]
    gold: str | None
    qtype: str


def test_questions(n: int, image_size: int = 256, split: str = "test") -> list[Question]:
    """The first n questions of a fixed split (test by default), each with its conversation so far (gold answers)."""
    out = []
    for seed in split_seeds(split, n):   # every sample has >= 1 turn: n samples suffice
        if len(out) >= n:
            break
        s = make_sample(seed)
        img = render(s.scene, image_size)
        hist = []
        for qa in s.turns:
            out.append(Question(img, qa.question, list(hist), qa.answer, qa.qtype))
            hist.append((qa.question, qa.answer))
    return out[:n]


def wide_questions(n: int, split: str = "val") -> list[Question]:
    """The first n questions of a split's scenes as grammar.make_wide_sample rewords and restyles them
    (the distribution of `--wide-data` training, on val or test scenes), with the conversation so far."""
    from .grammar import make_wide_sample
    out = []
    for seed in split_seeds(split, n):
        if len(out) >= n:
            break
        s = make_wide_sample(seed)
        img = s.image()
        hist = []
        for qa in s.turns:
            out.append(Question(img, qa.question, list(hist), qa.answer, qa.qtype))
            hist.append((qa.question, qa.answer))
    return out[:n]


def shifted_questions(n: int) -> list[Question]:
    """The first n questions of the shifted split (shifted.make_shifted_split): held-out phrasings,
    sizes, aspect ratios, JPEG, outline widths and background tones; one question per scene."""
    return [Question(s.image(), s.turns[0].question, [], s.turns[0].answer, s.turns[0].qtype)
            for s in make_shifted_split(n)]


def load_llava_questions(path: str | Path, limit: int | None = None,
                         image_folder: str | Path | None = None) -> list[Question]:
    """Questions from LLaVA-format JSON: [{"image": "a.png", "conversations": [{"from": "human",
    "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}, ...], images relative to `image_folder`,
    else to the JSON's folder (or an "images" folder beside it). `path` is the file, or a folder holding
    one *.json file.
    Every human turn becomes a question (with the turns before it as history and the gpt turn as its
    reference). Raises InputError with what is wrong."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        if len(found) != 1:
            raise InputError(f"{path} should hold one LLaVA JSON file (a list of {{image, conversations}}); "
                             f"it holds {len(found)}")
        path = found[0]
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise InputError(f"image folder {image_folder} does not exist")
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path.name} is not JSON ({e})") from None
    if not isinstance(records, list):
        raise InputError(f"{path.name} should be a JSON list of {{image, conversations}} records")
    out: list[Question] = []
    for k, rec in enumerate(records):
        if not isinstance(rec, dict) or "image" not in rec or not isinstance(rec.get("conversations"), list):
            raise InputError(f"record {k} of {path.name} has no image or no conversations list")
        if image_folder is not None:
            image = Path(image_folder) / rec["image"]
            if not image.is_file():
                raise InputError(f"record {k} of {path.name}: image {rec['image']!r} not found in {image_folder}")
        else:
            image = path.parent / rec["image"]
            if not image.is_file() and (path.parent / "images" / rec["image"]).is_file():
                image = path.parent / "images" / rec["image"]
            if not image.is_file():
                raise InputError(f"record {k} of {path.name}: image {rec['image']!r} not found next to the JSON")
        turns = rec["conversations"]
        history: list[tuple[str, str]] = []
        for t in range(0, len(turns) - 1, 2):
            human, gpt = turns[t], turns[t + 1]
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise InputError(f"record {k} of {path.name}: turns should alternate human, gpt")
            q = str(human.get("value", "")).replace(IMAGE_PLACEHOLDER, "").strip()
            a = str(gpt.get("value", "")).strip()
            out.append(Question(str(image), q, list(history), a or None, rec.get("type", "question")))
            history.append((q, a))
            if limit is not None and len(out) >= limit:
                return out
        if len(turns) % 2 == 1 and turns[-1].get("from") == "human":     # a last question with no answer
            q = str(turns[-1].get("value", "")).replace(IMAGE_PLACEHOLDER, "").strip()
            out.append(Question(str(image), q, list(history), None, rec.get("type", "question")))
            if limit is not None and len(out) >= limit:
                return out
    if not out:
        raise InputError(f"{path.name} holds no questions")
    return out
