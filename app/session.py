"""One user's conversation about one image: its turns, their route traces, what-ifs, and the export.

A Conversation lives in that user's gr.State (never in a module global) and is treated as a value:
handlers build a new one (`with_turn`, `with_speed`...) and return it, so a failed request leaves the
old one untouched.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from roe_core import RouteTrace, SpeedComparison
from roe_core.runtime.images import load_image

# Kept images are downscaled to this side: the vision tower resizes to a few hundred pixels anyway,
# and a session should not hold a 4096x4096 copy.
KEEP_SIDE = 1024


@dataclass
class Turn:
    question: str
    answer: str
    trace: RouteTrace
    speed: SpeedComparison | None = None     # measured on demand (dense baseline, interleaved repeats)
    note: str | None = None                   # e.g. the image looks unlike the model's training images


@dataclass
class WhatIf:
    """The last question re-answered on a hand-picked route or another router threshold."""
    turn: int                                 # index of the turn re-asked
    how: str                                  # "layers" or "threshold"
    speed: SpeedComparison                    # .roe = the what-if answer, .dense = every layer

    @property
    def trace(self) -> RouteTrace:
        return self.speed.roe.trace


@dataclass
class Conversation:
    image: Image.Image | None = None
    image_key: str = ""                       # sha1 of the image file: a new key starts a new conversation
    image_name: str = ""
    image_path: str | None = None             # where the image was read from (to show it again)
    turns: list[Turn] = field(default_factory=list)
    whatifs: list[WhatIf] = field(default_factory=list)

    @classmethod
    def about(cls, path: str | Path, name: str | None = None) -> "Conversation":
        """A new conversation about the image file at `path`. Raises InputError for unreadable images."""
        path = Path(path)
        image = load_image(path)
        if max(image.size) > KEEP_SIDE:
            image.thumbnail((KEEP_SIDE, KEEP_SIDE))
        return cls(image=image, image_key=file_key(path), image_name=name or path.name, image_path=str(path))

    @property
    def last(self) -> Turn | None:
        return self.turns[-1] if self.turns else None

    def history(self, upto: int | None = None) -> list[tuple[str, str]]:
        """(question, answer) pairs of the turns before `upto` (all by default)."""
        return [(t.question, t.answer) for t in self.turns[:upto]]

    def with_turn(self, turn: Turn) -> "Conversation":
        return dataclasses.replace(self, turns=[*self.turns, turn])

    def with_speed(self, speed: SpeedComparison) -> "Conversation":
        last = dataclasses.replace(self.turns[-1], speed=speed)
        return dataclasses.replace(self, turns=[*self.turns[:-1], last])

    def with_whatif(self, whatif: WhatIf) -> "Conversation":
        return dataclasses.replace(self, whatifs=[*self.whatifs, whatif])

    def cleared(self) -> "Conversation":
        """Same image, no turns."""
        return dataclasses.replace(self, turns=[], whatifs=[])

    # --- views ---
    def chat_messages(self, pending: tuple[str, str] | None = None) -> list[dict]:
        """The conversation as gr.Chatbot messages; `pending` = (question, answer so far) being streamed.
        Each answer is followed by its route summary, a collapsed block (a message with a metadata title)."""
        messages = []
        for t in self.turns:
            messages.append({"role": "user", "content": t.question})
            messages.append({"role": "assistant", "content": t.answer if t.answer else "…"})
            if t.note:
                messages.append({"role": "assistant", "content": f"*{t.note}*"})
            messages.append(route_note(t.trace))
        if pending:
            messages.append({"role": "user", "content": pending[0]})
            messages.append({"role": "assistant", "content": pending[1] if pending[1] else "…"})
        return messages

    def without_last_turn(self) -> "Conversation":
        """Undo: the conversation before its last turn (what-ifs of that turn go with it)."""
        n = len(self.turns) - 1
        return dataclasses.replace(self, turns=self.turns[:n], whatifs=[w for w in self.whatifs if w.turn < n])

    # --- export ---
    def rows(self) -> list[dict]:
        """One row per (turn or what-if) x decoder layer."""
        out = []
        for t, turn in enumerate(self.turns):
            out += _layer_rows("turn", t + 1, turn.question, turn.answer, turn.trace, turn.speed)
        for w in self.whatifs:
            turn = self.turns[w.turn]
            out += _layer_rows(f"what-if ({w.how})", w.turn + 1, turn.question, w.speed.roe.text, w.trace, w.speed)
        return out

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows(), columns=CSV_COLUMNS)

    def to_json(self) -> dict:
        return {
            "image": self.image_name,
            "image_sha1": self.image_key,
            "turns": [{"turn": t + 1, "question": turn.question, "answer": turn.answer,
                       "trace": turn.trace.to_dict(), "speed": speed_dict(turn.speed)}
                      for t, turn in enumerate(self.turns)],
            "what_ifs": [{"turn": w.turn + 1, "how": w.how, "answer": w.speed.roe.text,
                          "trace": w.trace.to_dict(), "speed": speed_dict(w.speed)} for w in self.whatifs],
        }

    def export(self, folder: str | Path) -> tuple[Path, Path]:
        """Writes <folder>/roe-conversation-<time>.csv and .json; returns both paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"roe-conversation-{time.strftime('%Y%m%d-%H%M%S')}-{self.image_key[:8]}"
        csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
        self.to_dataframe().to_csv(csv_path, index=False)
        json_path.write_text(json.dumps(self.to_json(), indent=1))
        return csv_path, json_path


CSV_COLUMNS = ["kind", "turn", "question", "answer", "layer", "executed", "p_run", "l1", "l1_dense",
               "route_mode", "threshold", "layers_executed", "new_tokens", "total_s", "tokens_per_s",
               "roe_s", "dense_s", "speedup"]


def _layer_rows(kind: str, turn: int, question: str, answer: str, trace: RouteTrace,
                speed: SpeedComparison | None) -> list[dict]:
    timing = trace.timing
    rows = []
    for i, executed in enumerate(trace.route):
        rows.append({
            "kind": kind, "turn": turn, "question": question, "answer": answer, "layer": i,
            "executed": bool(executed), "p_run": trace.p_run[i],
            "l1": trace.l1[i] if trace.l1 is not None else None,
            "l1_dense": trace.l1_dense[i] if trace.l1_dense is not None else None,
            "route_mode": trace.route_mode, "threshold": trace.threshold,
            "layers_executed": trace.layers_executed, "new_tokens": trace.new_tokens,
            "total_s": timing.total_s if timing else None, "tokens_per_s": timing.tokens_per_s if timing else None,
            "roe_s": speed.roe_s if speed else None, "dense_s": speed.dense_s if speed else None,
            "speedup": speed.speedup if speed else None,
        })
    return rows


def spans(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0–2, 5, 7–8"."""
    out, start = [], None
    for k, i in enumerate(layers):
        if start is None:
            start = i
        if k + 1 == len(layers) or layers[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}–{i}")
            start = None
    return ", ".join(out) or "none"


def route_note(trace: RouteTrace) -> dict:
    """A turn's route as a collapsed chat block: which layers ran, which adapters stood in, its cost."""
    ran = [i for i, r in enumerate(trace.route) if r]
    skipped = trace.adapters_used
    timing = trace.timing
    if trace.route_mode == "dense":     # RoE not fitted when this was asked: the base alone answered
        lines = ["**Ran:** every layer. RoE was not fitted: no router decided and no adapter stood in."]
        if timing is not None:
            lines.append(f"{timing.total_s:.3f} s for {trace.new_tokens} tokens (prefill {timing.prefill_s:.3f} s).")
        return {"role": "assistant", "content": "  \n".join(lines),
                "metadata": {"title": f"Every layer · {trace.summary()}", "status": "done"}}
    lines = [f"**Ran:** {spans(ran)}", f"**Skipped, adapter stood in:** {spans(skipped)}",
             f"Router threshold {trace.threshold:.2f}; route {trace.route_mode}."]
    guarded = getattr(trace, "guarded", [])
    if guarded:
        lines.insert(2, f"**Run by the route guard** (this input is unlike training there): {spans(guarded)}")
    if timing is not None:
        lines.append(f"{timing.total_s:.3f} s for {trace.new_tokens} tokens (prefill {timing.prefill_s:.3f} s).")
    return {"role": "assistant", "content": "  \n".join(lines),
            "metadata": {"title": f"Route · {trace.summary()}", "status": "done"}}


def speed_dict(s: SpeedComparison | None) -> dict | None:
    if s is None:
        return None
    return {"roe_answer": s.roe.text, "dense_answer": s.dense.text, "roe_s": s.roe_s, "dense_s": s.dense_s,
            "speedup": s.speedup, "repeats": s.repeats, "roe_times": s.roe_times, "dense_times": s.dense_times,
            "roe_layers_executed": s.roe.trace.layers_executed, "dense_layers_executed": s.dense.trace.layers_executed,
            "roe_new_tokens": s.roe.trace.new_tokens, "dense_new_tokens": s.dense.trace.new_tokens}


def file_key(path: str | Path) -> str:
    """sha1 of a file's bytes: the same image uploaded twice (or echoed back by the page) is the same image."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
