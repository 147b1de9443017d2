"""How the embedded recipe's stages run on `train.loop.fit`: where a `--resume` starts, and the
learning curves in assets/embedded/logs/.

Every stage trains with fit into runs/embedded/<stage>/ (fit's checkpoint: trainer_state.json,
optimizer.safetensors, the trained tensors, train_log.jsonl) and ships its weights into
assets/embedded at each checkpoint. The curve in assets/embedded/logs/<stage>.jsonl keeps the rows
of earlier runs and mirrors fit's train_log.jsonl of this one.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from .base import LOGS, read_state

TRAINER_STATE = "trainer_state.json"     # what train.loop.fit resumes from


def log_row(name: str, row: dict) -> None:
    """Appends a row to assets/embedded/logs/<name>.jsonl."""
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / f"{name}.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def resume_point(out: Path, stage: str) -> tuple[int, bool]:
    """Makes `out` something fit can resume from, for `--resume`; returns (step, from_shipped).

    - fit's own checkpoint: resumed as it is.
    - a checkpoint of the recipe's former loop (state.json + params.safetensors + optimizer.safetensors,
      the same tensor names): converted in place to fit's layout.
    - none (e.g. a fresh clone): the shipped weights already in the model are the start, at the step
      stages.json records for the stage; the checkpoint written says so and holds no optimizer state
      (AdamW starts afresh; from_shipped tells the stage to warm the LR up again). Step 0: nothing
      is written and fit starts afresh."""
    if (out / TRAINER_STATE).is_file():
        return int(json.loads((out / TRAINER_STATE).read_text())["step"]), False
    old = out / "state.json"
    if old.is_file() and (out / "params.safetensors").is_file() and (out / "optimizer.safetensors").is_file():
        step = int(json.loads(old.read_text())["step"])
        (out / "params.safetensors").replace(out / "backbone.safetensors")
        _write_trainer_state(out, step, "a checkpoint of the recipe's former loop")
        old.unlink()
        return step, False
    step = int(read_state().get(stage, {}).get("step", 0))
    if step:
        out.mkdir(parents=True, exist_ok=True)
        save_file({}, str(out / "optimizer.safetensors"), metadata={"steps": "{}"})
        (out / "backbone.safetensors").unlink(missing_ok=True)    # the model holds the shipped weights
        _write_trainer_state(out, step, "the shipped weights, without optimizer state")
    return step, True


def _write_trainer_state(out: Path, step: int, source: str) -> None:
    (out / TRAINER_STATE).write_text(json.dumps({"step": step, "config": {}, "last": {}, "from": source}, indent=1))


class CurveMirror:
    """assets/embedded/logs/<name>.jsonl = the rows it held before this run + the rows fit appends to
    <out>/train_log.jsonl during it; sync() at every checkpoint and at the end. Call after
    resume_point (whether fit resumes decides whether its train_log.jsonl starts afresh)."""

    def __init__(self, name: str, out: Path, resume: bool):
        self.path = LOGS / f"{name}.jsonl"
        self.before = self.path.read_text() if self.path.is_file() else ""
        if self.before and not self.before.endswith("\n"):
            self.before += "\n"
        self.log = out / "train_log.jsonl"
        resumes = resume and (out / TRAINER_STATE).is_file()
        self.skip = len(self.log.read_text().splitlines()) if resumes and self.log.is_file() else 0

    def sync(self) -> None:
        rows = self.log.read_text().splitlines()[self.skip:] if self.log.is_file() else []
        LOGS.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(self.before + "".join(r + "\n" for r in rows))
        tmp.replace(self.path)
