"""Batch composition: what per-example routing buys a batch whose examples want different layers.

    c = compare_batching(pipe, [(image, question, history), ...], repeats=3)
    c.seconds["per_example"], c.seconds["union"], c.seconds["dense"], c.speedup_vs_union

Three ways to answer the same batch, timed in interleaved rounds (per-example, union, dense, per-example,
...) after one untimed round, medians reported:
  per_example  RoE here: each example takes its own route; a layer runs only the examples routed
               through it (gather/scatter), the others pass through its adapter;
  union        the authors' rule for batches: a layer runs for the whole batch if any example wants it
               (every example is forced onto the union of the routes);
  dense        every layer for every example.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from ..systems.roe import RoEPipeline, timed_generate


@dataclass
class Composition:
    questions: list[str]
    routes: list[list[bool]]                 # each example's own route
    union: list[bool]                        # a layer any example wants
    answers: dict[str, list[str]]            # per strategy: the answers
    layer_runs: dict[str, int]               # per strategy: (example, layer) pairs that ran the real layer
    seconds: dict[str, float]                # per strategy: median seconds for the whole batch
    times: dict[str, list[float]] = field(default_factory=dict)
    repeats: int = 3

    @property
    def speedup_vs_dense(self) -> float:
        return self.seconds["dense"] / self.seconds["per_example"]

    @property
    def speedup_vs_union(self) -> float:
        return self.seconds["union"] / self.seconds["per_example"]

    def to_dict(self) -> dict:
        return asdict(self) | {"speedup_vs_dense": self.speedup_vs_dense, "speedup_vs_union": self.speedup_vs_union}


STRATEGIES = ("per_example", "union", "dense")


def compare_batching(pipe: RoEPipeline, items: Sequence, repeats: int = 3, max_new_tokens: int = 24,
                     threshold: float | None = None, checkpoint: Callable[[], bool] | None = None) -> Composition:
    """items: [(image, question, history)] or Prepared ones, answered as one batch three ways.
    checkpoint() between tokens and prefill layers as in RoEPipeline.compare (a timed run that paused is run again)."""
    if len(items) < 2:
        raise ValueError("a batch needs at least two questions")
    prepared = [it if not isinstance(it, tuple) else pipe.prepare(*it) for it in items]
    step = None if checkpoint is None else (lambda s, t: checkpoint())
    own = pipe.answer_batch(prepared, route="auto", threshold=threshold, max_new_tokens=max_new_tokens,
                           on_step=step, between_layers=checkpoint)
    routes = [list(a.trace.route) for a in own]
    L = len(routes[0])
    union = [any(r[i] for r in routes) for i in range(L)]
    modes = {"per_example": "auto", "union": [union] * len(prepared), "dense": "dense"}
    answers = {"per_example": [a.text for a in own]}
    for name in ("union", "dense"):
        answers[name] = [a.text for a in pipe.answer_batch(prepared, route=modes[name], threshold=threshold,
                                                           max_new_tokens=max_new_tokens, on_step=step, between_layers=checkpoint)]
    B = len(prepared)
    layer_runs = {"per_example": sum(map(sum, routes)), "union": B * sum(union), "dense": B * L}
    batch = pipe.batch(prepared)
    times: dict[str, list[float]] = {k: [] for k in STRATEGIES}
    for r in range(max(1, repeats) + 1):            # round 0 warms up, untimed
        for name in STRATEGIES:
            secs = timed_generate(pipe.model, batch, modes[name], max_new_tokens, pipe.encoder.stop_ids, threshold,
                                  checkpoint)
            if r > 0:
                times[name].append(secs)
    return Composition([p.question for p in prepared], routes, union, answers, layer_runs,
                       {k: statistics.median(v) for k, v in times.items()}, times, max(1, repeats))
