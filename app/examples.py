"""The examples gallery: generated scenes (roe_core.scenes, 256 px) with a suggested question each.

    python -m app.examples      # (re)writes assets/examples/*.png and examples.json
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from roe_core.scenes import make_sample, render

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
# one question type each, easiest first; seeds picked from the test split's range so they were never trained on
KINDS = ("exist", "colour", "count", "spatial", "compare", "describe", "relcount")
FIRST_SEED = 20_000_000
# The example the page opens with (the README's screenshot): one every shipped system answers right
# (`python -m roe_core.bench.own_words --examples`; the count example's "How many blue objects are
# there?" is answered "Two." for three by the round-three dense model and every system on it).
OPENING_KIND = "spatial"


def opening_example(examples: list[dict]) -> dict | None:
    """The example the Chat tab opens with: the OPENING_KIND one, else the first; None when there are none."""
    return next((e for e in examples if e["qtype"] == OPENING_KIND), examples[0] if examples else None)


def load_examples(folder: Path = EXAMPLES_DIR) -> list[dict]:
    """[{"image": path, "question": str, "answer": str, "qtype": str}, ...]; [] when there are none."""
    index = folder / "examples.json"
    if not index.is_file():
        return []
    return [dict(e, image=str(folder / e["image"])) for e in json.loads(index.read_text())
            if (folder / e["image"]).is_file()]


def scene_sample(seed: int | None = None, qtypes=None):
    """A random scene (or the one of `seed`) with one question about it: (seed, PIL image, QA)."""
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    sample = make_sample(seed, n_turns=1, qtypes=qtypes)
    return seed, render(sample.scene, 256), sample.turns[0]


def write_examples(folder: Path = EXAMPLES_DIR) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, qtype in enumerate(KINDS):
        seed, image, qa = scene_sample(FIRST_SEED + 101 * k, qtypes=(qtype,))
        name = f"{k + 1}-{qtype}.png"
        image.save(folder / name)
        entries.append({"image": name, "question": qa.question, "answer": qa.answer, "qtype": qa.qtype,
                        "seed": seed})
    (folder / "examples.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


if __name__ == "__main__":
    for e in write_examples():
        print(f"{e['image']}: {e['question']}  ->  {e['answer']}")
