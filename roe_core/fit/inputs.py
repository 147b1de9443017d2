"""Calibration inputs for a fit: (image, question) pairs, no answers (the dense model's own answers are
the targets).

    scene_inputs(n, split="train", start=0)              the built-in scenes (roe_core.scenes)
    llava_inputs(json_path, image_folder=None, limit=None)   a LLaVA JSON's human turns with their images
    folder_inputs(image_folder, questions, limit=None)   every image of a folder with every question of a
                                                         list (a file, one question a line, or a list)

Each returns a list of (PIL.Image, question str). Earlier turns of a conversation are dropped: a fit
routes single questions, the way RoE decides a route per question.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..runtime.conversation import InputError
from ..runtime.images import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
Inputs = list[tuple[Image.Image, str]]


def scene_inputs(n: int, split: str = "train", start: int = 0) -> Inputs:
    """n questions of a built-in scene split (from its `start`-th question), images rendered at 256 px.
    Answers are dropped; history too."""
    from ..scenes.questions import test_questions
    qs = test_questions(start + n, split=split)[start:]
    return [(q.image, q.question) for q in qs]


def llava_inputs(json_path: str | Path, image_folder: str | Path | None = None, limit: int | None = None) -> Inputs:
    """The questions of a LLaVA JSON ([{"image", "conversations": [{"from": "human", "value": ...}, ...]}]),
    images under `image_folder` (default: next to the JSON, or its images/ folder), read by
    scenes.load_llava_questions. InputError says what is wrong."""
    from ..scenes.questions import load_llava_questions
    out: Inputs = []
    images: dict[str, Image.Image] = {}          # each record's image read once
    for q in load_llava_questions(json_path, limit, image_folder):
        if q.image not in images:
            images[q.image] = load_image(q.image)
        out.append((images[q.image], q.question))
    return out


def folder_inputs(image_folder: str | Path, questions: str | Path | Sequence[str], limit: int | None = None,
                  seed: int = 0) -> Inputs:
    """Every image of a folder paired with every question (a text file with one question a line, or a
    list), shuffled with `seed`, the first `limit` pairs."""
    folder = Path(image_folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if isinstance(questions, (str, Path)):
        qfile = Path(questions)
        try:
            questions = [line.strip() for line in qfile.read_text().splitlines()]
        except OSError:
            raise InputError(f"questions file {qfile} cannot be read") from None
    qs = [q for q in questions if q and q.strip()]
    if not qs:
        raise InputError("no questions given")
    pairs = [(p, q) for p in paths for q in qs]
    random.Random(seed).shuffle(pairs)
    pairs = pairs[:limit] if limit is not None else pairs
    cache: dict[Path, Image.Image] = {}
    return [(cache.setdefault(p, load_image(str(p))), q) for p, q in pairs]
