"""Splits: a sample (a scene and its question turns) made deterministically from a seed, and the
fixed, disjoint seed ranges of the train, val, test and shifted splits."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .asking import QA, QTYPES, ask, askable
from .scene import Scene, random_scene

# bumped whenever a seed's sample changes (caches of rendered splits key on it): 2 added relcount,
# the training paraphrases and the left-to-right describe
WORLD_VERSION = 2

# fixed, disjoint seed ranges per split; "shifted" is only ever built by make_shifted_split
SPLIT_BASE = {"train": 0, "val": 10_000_000, "test": 20_000_000, "shifted": 30_000_000}
SPLIT_SPAN = 10_000_000


# -----------------------------------------------------------------------------
# samples and splits


@dataclass
class Sample:
    id: str
    seed: int
    scene: Scene
    turns: list[QA]


def make_sample(seed: int, n_turns: int | None = None, qtypes=None) -> Sample:
    """Deterministic sample (scene + 1..3 QA turns by default) from `seed`.

    Question types are drawn first (a shuffled pass over `qtypes`, so types are
    balanced across samples and distinct within a sample unless n_turns exceeds
    len(qtypes)), then scenes are re-sampled until all chosen types are askable.
    After 50 tries, unaskable types are dropped (others from `qtypes` fill in).
    """
    qtypes = tuple(qtypes) if qtypes is not None else QTYPES
    for q in qtypes:
        if q not in QTYPES:
            raise ValueError(f"unknown qtype {q!r}")
    rng = random.Random(seed)
    if n_turns is None:
        n_turns = rng.randint(1, 3)
    chosen: list[str] = []
    while len(chosen) < n_turns:
        pool = list(qtypes)
        rng.shuffle(pool)
        chosen += pool
    chosen = chosen[:n_turns]
    for _ in range(50):
        scene = random_scene(rng)
        if all(askable(scene, q) for q in chosen):
            break
    else:
        ok = [q for q in chosen if askable(scene, q)]
        spare = [q for q in qtypes if q not in ok and askable(scene, q)]
        chosen = (ok + spare)[:n_turns]
        if not chosen:
            raise ValueError(f"seed {seed}: no askable question type among {qtypes}")
    turns = [ask(scene, q, rng) for q in chosen]
    return Sample(id=f"scene-{seed:08d}", seed=seed, scene=scene, turns=turns)


def split_seeds(split: str, n: int) -> range:
    if split not in SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_BASE)}")
    if not 0 <= n <= SPLIT_SPAN:
        raise ValueError(f"n must be in [0, {SPLIT_SPAN}]")
    return range(SPLIT_BASE[split], SPLIT_BASE[split] + n)


def make_split(split: str, n: int, start: int = 0, **kwargs) -> list[Sample]:
    """Samples start .. start+n-1 of a split ("train" | "val" | "test"); kwargs go to make_sample."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    return [make_sample(seed, **kwargs) for seed in split_seeds(split, start + n)[start:]]
