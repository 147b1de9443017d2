"""The route atlas: do similar questions take similar routes?

    atlas = build_atlas(pipe, test_questions(64), progress=print)
    atlas.distinct_routes, atlas.route_counts()[:5], atlas.skip_rate_by_type()["count"]
    atlas.order             # entries clustered: each next route is the nearest (Hamming) to the last

Every question is answered through the pipe's batched greedy decoding (routes decided per example, as in
the app); each entry keeps its route, answer and whether it matched the reference.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from ..scenes.questions import Question
from ..scenes.answers import answers_match
from ..systems.roe import RoEPipeline


@dataclass
class AtlasEntry:
    index: int                       # position in the question set
    question: str
    qtype: str
    answer: str
    gold: str | None
    correct: bool | None             # None when the set has no reference answer
    route: list[bool]
    p_run: list[float]

    @property
    def layers_executed(self) -> int:
        return sum(self.route)


@dataclass
class Atlas:
    entries: list[AtlasEntry]
    num_layers: int
    threshold: float
    order: list[int] = field(default_factory=list)     # entry indices in cluster order

    def __post_init__(self):
        if not self.order:
            self.order = hamming_order([e.route for e in self.entries])

    @property
    def distinct_routes(self) -> int:
        return len({tuple(e.route) for e in self.entries})

    def route_counts(self) -> list[tuple[tuple[bool, ...], int]]:
        """Each distinct route and how many entries took it, most frequent first."""
        return Counter(tuple(e.route) for e in self.entries).most_common()

    def skip_rate_by_type(self) -> dict[str, list[float]]:
        """Per question type: the fraction of its entries that skipped each layer."""
        by: dict[str, list[AtlasEntry]] = {}
        for e in self.entries:
            by.setdefault(e.qtype, []).append(e)
        return {t: [sum(not e.route[i] for e in es) / len(es) for i in range(self.num_layers)]
                for t, es in sorted(by.items())}

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "threshold": self.threshold, "distinct_routes": self.distinct_routes,
                "route_counts": [{"route": [int(x) for x in r], "count": n} for r, n in self.route_counts()],
                "skip_rate_by_type": self.skip_rate_by_type(), "order": self.order,
                "entries": [asdict(e) | {"layers_executed": e.layers_executed} for e in self.entries]}

    def rows(self) -> list[dict]:
        """One row per entry (for CSV), in cluster order, the route as a 0/1 string."""
        out = []
        for rank, k in enumerate(self.order):
            e = self.entries[k]
            out.append({"rank": rank, "index": e.index, "qtype": e.qtype, "question": e.question, "answer": e.answer,
                        "gold": e.gold, "correct": e.correct, "layers_executed": e.layers_executed,
                        "route": "".join("1" if r else "0" for r in e.route)})
        return out


def hamming_order(routes: Sequence[Sequence[bool]]) -> list[int]:
    """A seriation of routes: identical routes together, each next group the nearest (Hamming) to the
    last one, starting from the most common route; ties go to the more common group, then the first seen."""
    if not routes:
        return []
    groups: dict[tuple, list[int]] = {}
    for k, r in enumerate(routes):
        groups.setdefault(tuple(bool(x) for x in r), []).append(k)
    keys = list(groups)
    x = torch.tensor(keys, dtype=torch.float32)
    dist = torch.cdist(x, x, p=0)                      # p=0: the number of layers that differ
    size = torch.tensor([len(groups[k]) for k in keys], dtype=torch.float32)
    left = torch.ones(len(keys), dtype=torch.bool)
    cur = int(torch.argmax(size))                      # first of the most common (argmax: first maximum)
    order = []
    while True:
        order += groups[keys[cur]]
        left[cur] = False
        if not bool(left.any()):
            return order
        # nearest remaining; among equals the larger group; among those the first seen
        score = torch.where(left, dist[cur] * (len(routes) + 1) - size, torch.tensor(float("inf")))
        cur = int(torch.argmin(score))


def build_atlas(pipe: RoEPipeline, questions: Sequence[Question], batch_size: int = 8, threshold: float | None = None,
                max_new_tokens: int = 24, progress: Callable[[int, int], None] | None = None,
                on_step: Callable | None = None, between_layers: Callable | None = None) -> Atlas:
    """Answers every question (in batches, routes decided per example) and gathers their routes.
    progress(done, total) after each batch; on_step(step, tokens) after each token and between_layers()
    after each prefill layer (a server's checkpoints)."""
    if not questions:
        raise ValueError("the question set is empty")
    thr = pipe.threshold if threshold is None else float(threshold)
    entries: list[AtlasEntry] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        answers = pipe.answer_batch([(q.image, q.question, q.history) for q in chunk], route="auto", threshold=thr,
                                    max_new_tokens=max_new_tokens, on_step=on_step, between_layers=between_layers)
        for k, (q, a) in enumerate(zip(chunk, answers)):
            entries.append(AtlasEntry(start + k, q.question, q.qtype, a.text, q.gold,
                                      None if q.gold is None else answers_match(a.text, q.gold),
                                      list(a.trace.route), [round(p, 4) for p in a.trace.p_run]))
        if progress is not None:
            progress(len(entries), len(questions))
    return Atlas(entries, pipe.model.num_layers, thr)
