"""Answer matching: normalising a free-text answer ("The Red circle.", "2") and comparing it with
the canonical one."""

from __future__ import annotations

import re

from .asking import NUMBER_WORDS


# -----------------------------------------------------------------------------
# scoring


def normalise_answer(text: str) -> str:
    """'The Red circle.' -> 'red circle', '2' -> 'two', 'A triangle.' -> 'triangle'."""
    words = re.sub(r"[^\w\s]|_", " ", text.lower()).split()
    words = [NUMBER_WORDS[int(w)] if w.isdigit() and int(w) < len(NUMBER_WORDS) else w for w in words]
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def answers_match(pred: str, gold: str) -> bool:
    return normalise_answer(pred) == normalise_answer(gold)
