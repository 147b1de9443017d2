"""In your own words: ordinary questions about the shipped example images, as a new user would type
them (not the training templates), answered by every system side by side, with the right answer where
the scene determines one.

    python -m roe_core.bench.own_words                       # the embedded model, every shipped system
    python -m roe_core.bench.own_words --systems dense,roe --json rows.json
    python -m roe_core.bench.own_words --examples            # the examples' own suggested questions
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from ..scenes import NUMBER_WORDS, answers_match, make_sample
from ..systems import load_base, load_systems, registry, shipped_systems

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


def _count(scene) -> str:
    return NUMBER_WORDS[len(scene.objects)].capitalize() + "."


def _any(colour: str) -> Callable:
    return lambda scene: "Yes." if any(o.colour == colour for o in scene.objects) else "No."


# (example image, question, the right answer from the scene, or None where the wording leaves it open)
QUESTIONS: tuple[tuple[str, str, Callable | None], ...] = (
    ("2-colour.png", "How many shapes are in this picture?", _count),
    ("3-count.png", "How many shapes are in this picture?", _count),
    ("4-spatial.png", "How many shapes are in this picture?", _count),
    ("2-colour.png", "What shapes can you see?", None),
    ("3-count.png", "How many things are there?", _count),
    ("7-relcount.png", "how many objects are there in total", _count),
    ("1-exist.png", "is there anything red in here?", _any("red")),
    ("6-describe.png", "Is anything blue in this image?", _any("blue")),
    ("5-compare.png", "Which one is the biggest?", None),
    ("6-describe.png", "Can you describe what you see?", None),
)


def examples_own_questions(folder: Path = EXAMPLES) -> list[tuple[str, str, Callable]]:
    """The shipped examples' own suggested questions (examples.json), with their answers."""
    return [(e["image"], e["question"], lambda scene, a=e["answer"]: a)
            for e in json.loads((folder / "examples.json").read_text())]


def ask(pipes: dict, folder: Path = EXAMPLES, max_new_tokens: int = 32, questions=QUESTIONS) -> list[dict]:
    """One row per question: the question, the right answer (or None) and each system's answer, whether it
    is right, and the layers it ran."""
    entries = {e["image"]: e for e in json.loads((folder / "examples.json").read_text())}
    rows = []
    for image, question, gold_of in questions:
        e = entries[image]
        scene = make_sample(e["seed"], n_turns=1, qtypes=(e["qtype"],)).scene
        gold = gold_of(scene) if gold_of else None
        row = {"image": image, "question": question, "gold": gold, "answers": {}}
        for name, pipe in pipes.items():
            ans = pipe.answer(str(folder / image), question, max_new_tokens=max_new_tokens)
            row["answers"][name] = {"text": ans.text, "layers": ans.trace.layers_executed,
                                    "right": None if gold is None else answers_match(ans.text, gold)}
        rows.append(row)
    return rows


def markdown(rows: list[dict], num_layers: int) -> str:
    names = list(rows[0]["answers"]) if rows else []
    head = "| image | question | right answer | " + " | ".join(registry.label(n) for n in names) + " |"
    lines = [head, "|---" * (3 + len(names)) + "|"]
    for r in rows:
        cells = []
        for n in names:
            a = r["answers"][n]
            mark = "" if a["right"] is None else (" ✓" if a["right"] else " ✗")
            cells.append(f"{a['text']}{mark} ({a['layers']})")
        lines.append(f"| {r['image']} | {r['question']} | {r['gold'] or '-'} | " + " | ".join(cells) + " |")
    judged = [r for r in rows if r["gold"] is not None]
    lines += ["", f"Right, of the {len(judged)} questions the scene answers: " + ", ".join(
        f"{registry.label(n)} {sum(r['answers'][n]['right'] for r in judged)}" for n in names)
        + f". In brackets: decoder layers run, of {num_layers}."]
    if "dense" in names and len(names) > 1:
        lines[-1] += " The same answer as Dense, of all " + str(len(rows)) + ": " + ", ".join(
            f"{registry.label(n)} {sum(r['answers'][n]['text'] == r['answers']['dense']['text'] for r in rows)}"
            for n in names if n != "dense") + "."
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--systems", default=None, help="comma-separated (default: every shipped system)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--examples", action="store_true",
                    help="ask the shipped examples' own suggested questions instead (examples.json)")
    args = ap.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",")] if args.systems else shipped_systems(args.model)
    pipes = load_systems(systems, loaded=load_base(args.model, args.device))
    rows = ask(pipes, questions=examples_own_questions() if args.examples else QUESTIONS)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows, next(iter(pipes.values())).num_layers))


if __name__ == "__main__":
    main()
