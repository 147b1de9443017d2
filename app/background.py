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

The app's private work folder (`WorkFolder`: new scenes, exports, atlas CSVs, uploaded question sets, pasted
images) is bounded, as gradio's `delete_cache` bounds gradio's own cache: a file goes once it is older than
`max_age_s` (gradio has served its own copy by then), and the oldest go first whenever the folder is over
`max_bytes`. Every handler reaches the folder through `ctx.workdir`, which tidies it (at most every
`every_s`) before anything new is written; it is removed whole at exit.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import queue
import shutil
import tempfile
import threading
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

log = logging.getLogger("roe_explorer")


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
    work: "WorkFolder" = field(default_factory=lambda: WorkFolder())

    @property
    def workdir(self) -> Path:
        """The private work folder, tidied first (files past their age, then the oldest over the cap)."""
        self.work.maybe_tidy()
        return self.work.path

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


class WorkFolder:
    """A private temporary folder whose size stays bounded (see the module docstring). max_bytes: the cap on
    its files' total size; max_age_s: a file's lifetime; min_age_s: a file younger than this is never
    removed (a handler may be about to hand it to gradio), so a burst may pass the cap for that long;
    every_s: how often `maybe_tidy` looks."""

    def __init__(self, root: str | Path | None = None, max_bytes: int = 256 << 20, max_age_s: float = 3600.0,
                 min_age_s: float = 5.0, every_s: float = 1.0):
        if root is None:
            root = tempfile.mkdtemp(prefix="roe_explorer_")
            atexit.register(shutil.rmtree, root, ignore_errors=True)    # gradio serves its own copies
        self.path = Path(root)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_age_s, self.min_age_s, self.every_s = max_bytes, max_age_s, min_age_s, every_s
        self.removed = 0
        self._lock = threading.Lock()
        self._last = 0.0

    def files(self) -> list[tuple[float, int, Path]]:
        """(modified time, size, path) of every file under the folder, oldest first."""
        out = []
        for dirpath, _, names in os.walk(self.path):
            for name in names:
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except OSError:             # removed meanwhile
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def size(self) -> int:
        return sum(size for _, size, _ in self.files())

    def maybe_tidy(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.tidy()

    def tidy(self) -> int:
        """Removes files past max_age_s, then the oldest (older than min_age_s) while over max_bytes, then
        subfolders left empty as long. Returns how many files went."""
        with self._lock:
            now = time.time()
            files = self.files()
            total = sum(size for _, size, _ in files)
            gone = 0
            for mtime, size, p in files:
                age = now - mtime
                if age < self.min_age_s:
                    break                           # oldest first: the rest are younger still
                if age > self.max_age_s or total > self.max_bytes:
                    try:
                        p.unlink()
                    except OSError:
                        continue
                    total -= size
                    gone += 1
            for dirpath, dirs, names in os.walk(self.path, topdown=False):   # subfolders empty for max_age_s
                if Path(dirpath) != self.path and not dirs and not names:
                    try:
                        if now - os.stat(dirpath).st_mtime > self.max_age_s:
                            os.rmdir(dirpath)
                    except OSError:
                        pass
            if gone:
                log.info("work folder: removed %d file(s); %d bytes left", gone, total)
            self.removed += gone
            return gone


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
