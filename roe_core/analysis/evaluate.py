"""Answering question sets, written once for the benchmark, the embedded recipe's validation checks and
the analysis views: every system the same way (greedy, exact match by scenes.answers_match).

    preds, correct, traces = evaluate(pipe, questions, batch_size=16, max_new_tokens=24, route="auto")
"""
from __future__ import annotations

from ..scenes import answers_match
from ..scenes.questions import Question


def batches(xs, size: int) -> list:
    return [xs[i:i + size] for i in range(0, len(xs), size)]


def evaluate(pipe, qs: list[Question], batch_size: int = 16, max_new_tokens: int = 24, progress: str | None = None,
             **options) -> tuple[list[str], list[bool], list]:
    """(predictions, correct, traces) of a system on questions, in batches. options: the system's own
    answer keywords (RoE's route and threshold); progress: a tqdm label (None: no bar)."""
    chunks = batches(qs, batch_size)
    if progress is not None:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=progress, unit="batch")
    preds, traces = [], []
    for chunk in chunks:
        answers = pipe.answer_batch([(q.image, q.question, q.history) for q in chunk], max_new_tokens=max_new_tokens,
                                    **options)
        preds += [a.text for a in answers]
        traces += [a.trace for a in answers]
    return preds, [answers_match(p, q.gold) for p, q in zip(preds, qs)], traces


def teacher_forced(pipe, qs: list[Question], size: int = 16):
    """Collated batches of the questions with their gold answers (the training layout), on the device."""
    for chunk in batches(qs, size):
        convs = [pipe.encoder.encode(list(q.history) + [(q.question, q.gold)]) for q in chunk]
        yield pipe.encoder.collate(convs, [q.image for q in chunk]).to(pipe.device)
