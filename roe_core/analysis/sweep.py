"""The live trade-off curve: what each point of sparsity costs.

    points = sweep_thresholds(pipe, test_questions(32), [0.3, 0.4, 0.5, 0.6, 0.7])
    [(p.threshold, p.mean_layers_executed, p.accuracy, p.speedup) for p in points]

    points = sweep_fixed(pipe, questions, order, [4, 8, 12])   # a fixed path at each k, RoE's adapters

Every threshold answers the same questions in the same batches (routes decided per example), and so
does the dense path (every layer), all in one run; speed is examples per second of those passes and
speedup is the dense pass's time over the threshold's. Accuracy is exact match against the reference
answers; a set without references reports agreement with the dense answers instead.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from ..scenes.questions import Question
from ..scenes.answers import answers_match
from ..systems.roe import RoEPipeline


@dataclass
class SweepPoint:
    threshold: float | None           # None: the dense path (every layer)
    mean_layers_executed: float
    accuracy: float | None            # exact match with the references (None when the set has none)
    agreement_with_dense: float       # fraction of answers equal to the dense path's
    seconds: float                    # the pass over the set (pauses for other users excluded)
    examples_per_s: float
    speedup: float                    # dense pass's seconds / this pass's
    calibrated: bool = False          # the model's own threshold
    fixed_k: int | None = None        # sweep_fixed: the fixed path skipping the first k layers of its order

    def to_dict(self) -> dict:
        return asdict(self)


def _pass(pipe, questions, route, threshold, batch_size, max_new_tokens, on_step, clock, between_layers=None):
    texts, layers = [], []
    t0 = clock()
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        answers = pipe.answer_batch([(q.image, q.question, q.history) for q in chunk], route=route,
                                    threshold=threshold, max_new_tokens=max_new_tokens, on_step=on_step, between_layers=between_layers)
        texts += [a.text for a in answers]
        layers += [a.trace.layers_executed for a in answers]
    return texts, layers, clock() - t0


def sweep_thresholds(pipe: RoEPipeline, questions: Sequence[Question], thresholds: Sequence[float],
                     batch_size: int = 8, max_new_tokens: int = 24,
                     progress: Callable[[int, int], None] | None = None, on_step: Callable | None = None,
                     clock: Callable[[], float] = time.perf_counter,
                     between_layers: Callable | None = None) -> list[SweepPoint]:
    """The dense point first, then one point per threshold (ascending). progress(done, total) after each
    pass; on_step(step, tokens) after every token and between_layers() after every prefill layer; clock()
    times the passes (a server passes one that stops while its work is paused for others)."""
    if not questions:
        raise ValueError("the question set is empty")
    thresholds = sorted({float(t) for t in thresholds})
    if not thresholds or any(not 0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError("thresholds must be between 0 and 1")
    total = len(thresholds) + 1
    golds = [q.gold for q in questions]
    has_gold = all(g is not None for g in golds)

    def point(thr, texts, layers, secs, dense_texts, dense_secs):
        n = len(texts)
        return SweepPoint(thr, sum(layers) / n,
                          sum(answers_match(t, g) for t, g in zip(texts, golds)) / n if has_gold else None,
                          sum(a == b for a, b in zip(texts, dense_texts)) / n, secs, n / secs if secs > 0 else 0.0,
                          dense_secs / secs if secs > 0 else float("nan"),
                          thr is not None and abs(thr - pipe.threshold) < 1e-9)

    d_texts, d_layers, d_secs = _pass(pipe, questions, "dense", None, batch_size, max_new_tokens, on_step, clock,
                                      between_layers)
    points = [point(None, d_texts, d_layers, d_secs, d_texts, d_secs)]
    if progress is not None:
        progress(1, total)
    for k, thr in enumerate(thresholds):
        texts, layers, secs = _pass(pipe, questions, "auto", thr, batch_size, max_new_tokens, on_step, clock,
                                    between_layers)
        points.append(point(thr, texts, layers, secs, d_texts, d_secs))
        if progress is not None:
            progress(k + 2, total)
    return points


def sweep_fixed(pipe: RoEPipeline, questions: Sequence[Question], order: Sequence[int], ks: Sequence[int],
                batch_size: int = 8, max_new_tokens: int = 24,
                progress: Callable[[int, int], None] | None = None, on_step: Callable | None = None,
                clock: Callable[[], float] = time.perf_counter,
                between_layers: Callable | None = None) -> list[SweepPoint]:
    """A fixed path (the same layers skipped for every input) at each k, through the RoE pipeline with its
    adapters standing in: the first k layers of `order` (e.g. a static system's skip_order()) skipped.
    With the adapters shared, the curve against sweep_thresholds' isolates what per-example routing
    adds. The dense point first (as sweep_thresholds), then one point per k (ascending)."""
    if not questions:
        raise ValueError("the question set is empty")
    L = pipe.num_layers
    if sorted(order) != list(range(L)):
        raise ValueError(f"order must list each of the {L} layers once")
    ks = sorted({int(k) for k in ks})
    if not ks or any(not 0 <= k < L for k in ks):
        raise ValueError(f"each k must be in 0..{L - 1}")
    golds = [q.gold for q in questions]
    has_gold = all(g is not None for g in golds)
    total = len(ks) + 1
    d_texts, _, d_secs = _pass(pipe, questions, "dense", None, batch_size, max_new_tokens, on_step, clock, between_layers)
    n = len(questions)

    def point(k, texts, secs):          # k None: the dense pass
        return SweepPoint(None, float(L - (k or 0)),
                          sum(answers_match(t, g) for t, g in zip(texts, golds)) / n if has_gold else None,
                          sum(a == b for a, b in zip(texts, d_texts)) / n, secs, n / secs if secs > 0 else 0.0,
                          d_secs / secs if secs > 0 else float("nan"), fixed_k=k)

    points = [point(None, d_texts, d_secs)]
    if progress is not None:
        progress(1, total)
    for j, k in enumerate(ks):
        skip = set(order[:k])
        route = [i not in skip for i in range(L)]
        texts, _, secs = _pass(pipe, questions, route, None, batch_size, max_new_tokens, on_step, clock, between_layers)
        points.append(point(k, texts, secs))
        if progress is not None:
            progress(j + 2, total)
    return points
