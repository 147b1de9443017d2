"""Export: LLaVA-style conversation records and JSON files of a split (with the rendered images),
and a preview grid of rendered scenes with their questions and answers."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .rendering import render
from .scene import scene_to_dict
from .splits import Sample, make_split


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
        # a sample with its own render style (grammar.WideSample) keeps it; the others at image_size
        (s.image() if hasattr(s, "style") else render(s.scene, image_size)).save(image_dir / f"{s.id}.png")
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


def export_llava_json(split: str, n: int, out_dir, image_size: int = 256, start: int = 0, wide: bool = False) -> Path:
    """Write out_dir/<split>.json (samples start .. start+n-1) and the images to out_dir/images/
    (shared by all splits; ids are unique across splits). Returns the JSON path. wide (train split
    only): the same scenes and answers, questions reworded and images restyled (grammar.py), written
    as out_dir/<split>_wide.json."""
    out_dir = Path(out_dir)
    if wide:
        from .grammar import make_wide_sample
        from .splits import split_seeds
        if split != "train":
            raise ValueError("wide inputs are for training: split must be 'train'")
        samples = [make_wide_sample(seed) for seed in split_seeds(split, start + n)[start:]]
    else:
        samples = make_split(split, n, start)
    records = to_llava_records(samples, out_dir / "images", image_size)
    path = out_dir / f"{split}{'_wide' if wide else ''}.json"
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
