"""How the page's handlers use the one model (roe_core.serving.Server), written once.

    ctx = AppContext(pipe, systems, server, ...)       # what every handler reads
    @background_task("fid_md", stopped="_The fidelity run was stopped._", failed="Could not measure the adapters")
    def fidelity(self, conv, request=None):
        with self.ctx.job(request) as job:              # the model at background priority, this user's
            ...                                         # job.step / job.checkpoint between tokens and layers
        return {"fid_md": ..., "fid_plot": ...}

Background work (speed measurements, what-ifs, side by side, the Explore views) hands the model to plain
questions at every token and layer; Stop (or closing the tab) ends it at the next one, and the handler's
summary output says so (`Cancelled`). Any other error becomes a message there and a toast; the other outputs,
and the conversation, stay as they were. Plain questions stream through `stream_ticket`.
"""
from __future__ import annotations

import atexit
import functools
import queue
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr

from roe_core import InputError
from roe_core.serving import Cancelled, Job, Server
from roe_core.systems import registry
from roe_core.systems.pipeline import Pipeline

from .inputs import problem


def owner_of(request: gr.Request | None):
    """Whose request this is: the browser tab's (or gradio_client's) session."""
    return getattr(request, "session_hash", None) if request is not None else None


@dataclass
class AppContext:
    """What every handler reads: the routed system the page is built around (`pipe`), every loaded system,
    the server that schedules the model, the answer length and the timing repeats, and a work folder."""
    pipe: Pipeline
    systems: dict[str, Pipeline]
    server: Server
    max_new_tokens: int = 48
    speed_repeats: int = 3
    workdir: Path = field(default_factory=lambda: _workdir())

    @property
    def num_layers(self) -> int:
        return int(self.pipe.num_layers)

    def system(self, name: str) -> Pipeline:
        name = (name or self.pipe.system).strip()
        if name not in self.systems:
            raise InputError(f"unknown system {name!r}: this app has {', '.join(self.systems)}")
        return self.systems[name]

    def expert_systems(self) -> list[str]:
        """The loaded systems whose traces offer the experts view (their panels in Side by side)."""
        return [n for n in self.systems if "experts" in registry.get(n).trace_views]

    @contextmanager
    def job(self, request: gr.Request | None) -> Iterator[Job]:
        """The model at background priority for this user's long work (ends at Stop or a closed tab)."""
        with self.server.background(owner_of(request)) as job:
            yield job


def _workdir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="roe_explorer_"))         # rendered scenes, exports
    atexit.register(shutil.rmtree, folder, ignore_errors=True)       # gradio serves its own copies
    return folder


def background_task(summary: str, stopped: str, failed: str) -> Callable:
    """Decorates a handler that returns its outputs by name: when it is stopped (Cancelled) it returns
    {summary: stopped}; when anything else goes wrong (bad input included) {summary: the problem}, with a
    toast. Its other outputs are left as they were."""
    def wrap(fn):
        @functools.wraps(fn)
        def handler(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Cancelled:
                return {summary: stopped}
            except Exception as e:  # noqa: BLE001  (every failure is shown; the app keeps serving)
                return {summary: problem(failed, e)}
        return handler
    return wrap


def own_seconds(job: Job, run: Callable[[Callable], object]) -> tuple[object, float]:
    """run(on_step) -> an Answer, and the seconds its generation took without the time it spent handing
    the model to other users' questions (job.paused_s, as the sweep's clock does)."""
    paused = job.paused_s
    ans = run(job.step)
    return ans, max(1e-9, ans.timing.total_s - (job.paused_s - paused))


def stream_ticket(submit, every: float = 0.05):
    """submit(on_token) -> Future of an Answer (Server.submit). Yields the text so far (at most every
    `every` s) while the server answers, then the Answer; raises the request's own error."""
    q: queue.Queue = queue.Queue()
    future = submit(q.put)
    future.add_done_callback(lambda f: q.put(None))
    shown = 0.0
    while True:
        item = q.get()
        if item is None:
            yield future.result()
            return
        if time.perf_counter() - shown >= every:
            shown = time.perf_counter()
            yield item
