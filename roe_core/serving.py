"""Serving many users from one model: questions that arrive together are answered in one mixed-route
batch, long work gives way to them at every token, and limits refuse what would hold the model.

    server = Server(max_batch=8, window_s=0.03)
    ticket = server.submit(pipe, image, question, history, owner="session-1", on_token=print,
                           trace_l1=True)            # options go to pipe.answer_batch
    answer = ticket.result()                          # that request's own Answer, or its own error

    with server.background(owner="session-1") as job:  # long work (speed measurements, sweeps...)
        cmp = pipe.compare(image, question, checkpoint=job.checkpoint)

    server.cancel("session-1")                        # stop button, closed tab: ends at the next layer or token

One worker thread runs the batches. Requests with the same pipe and options that arrive within
`window_s` of the first (at most `max_batch`) are answered by one `answer_batch` call: RoE routes each
example on its own, so one forward serves users whose routes differ, and each answer equals the one the
request gets alone. Every request streams its own text (on_token) and can be cancelled on its own; if
a batch's model call raises, its requests are answered one by one so that only the faulty one fails;
if it runs out of GPU memory it is split in half and retried (down to one request, which then gets a
clear message). A request's fate is its own: a Future cancelled by its caller stops only that request's
stream and never fails its batch-mates.

The model itself is a `Gate`, a lock with two priorities. Batches of plain questions take it first.
Background work (a `Job`) holds it only between prefill layers and tokens: `job.checkpoint()` hands it
over whenever a plain batch is waiting (and `job.turn()` between model calls hands it to other
background work too), so a question asked during someone's speed measurement waits for one layer or
token, not for the measurement. Nothing that can wait on the gate is called with a lock held: the decode
engine checks an arena out per generation (runtime.engine), so a plain batch answered at a background
generation's checkpoint decodes in its own arena. A job that waits for a plain answer itself
(`server.answer` inside `server.background`) lends the model while it waits, and a job opened inside a
job of the same thread is that job.

Why not gradio's own `batch=True`: it batches the calls of one event only (a chat turn and an /answer
call never meet), cannot stream each user's answer, cannot cancel one user's part, and has no wait
window. This module has no UI code; app/ wires it to gradio.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

import torch

from .runtime.conversation import InputError
from .systems.pipeline import Answer, History, Pipeline, Prepared

log = logging.getLogger("roe_core.serving")


class Cancelled(Exception):
    """The request's owner stopped it (a stop button, a closed tab, a newer question)."""


class LimitError(InputError):
    """A request refused by a limit (question length, history turns, rate): the message says which
    limit and what to do. Raised before any model work."""


class OutOfMemory(RuntimeError):
    """Even this request alone ran out of GPU memory (its batch was split down to it first)."""


# ----------------------------------------------------------------------------------------------- the gate

class Gate:
    """The model, as a lock with priorities: of the waiters the most urgent (lowest priority number)
    gets it next, first come first served within one priority."""
    PLAIN = 0
    BACKGROUND = 1

    def __init__(self):
        self._cv = threading.Condition()
        self._holder: tuple[int, int] | None = None
        self._waiting: list[tuple[int, int]] = []
        self._seq = itertools.count()

    def acquire(self, priority: int) -> None:
        with self._cv:
            me = (priority, next(self._seq))
            heapq.heappush(self._waiting, me)
            try:
                self._cv.wait_for(lambda: self._holder is None and self._waiting[0] == me)
            except BaseException:
                self._waiting.remove(me)
                heapq.heapify(self._waiting)
                self._cv.notify_all()
                raise
            heapq.heappop(self._waiting)
            self._holder = me

    def release(self) -> None:
        with self._cv:
            self._holder = None
            self._cv.notify_all()

    def waiting(self, priority: int) -> bool:
        """Is anyone of this priority or a more urgent one waiting?"""
        with self._cv:
            return bool(self._waiting) and self._waiting[0][0] <= priority

    @contextmanager
    def hold(self, priority: int) -> Iterator[None]:
        self.acquire(priority)
        try:
            yield
        finally:
            self.release()


# ------------------------------------------------------------------------------------------- background work

class Job:
    """Long work holding the model at background priority (from `Server.background`)."""

    def __init__(self, server: "Server", owner: Hashable | None):
        self.server = server
        self.owner = owner
        self.cancelled = threading.Event()
        self.holder: int | None = None          # the thread that holds the model for it, while it does
        self.pauses = 0
        self.paused_s = 0.0

    def _check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("stopped")

    def _hand_over(self) -> None:
        t0 = time.perf_counter()
        gate = self.server.gate
        gate.release()
        gate.acquire(Gate.BACKGROUND)
        self.pauses += 1
        self.paused_s += time.perf_counter() - t0

    def _yield_to(self, priority: int) -> bool:
        """Raises Cancelled when the owner stopped this work; hands the model to anyone waiting at
        `priority` or a more urgent one and takes it back after them. True when it paused."""
        self._check()
        if not self.server.gate.waiting(priority):
            return False
        self._hand_over()
        self._check()
        return True

    def checkpoint(self) -> bool:
        """Call between tokens and prefill layers: waiting plain questions go first."""
        return self._yield_to(Gate.PLAIN)

    def step(self, step: int | None = None, tokens: Any = None) -> None:
        """checkpoint() with generate's callback signature (step, tokens)."""
        self.checkpoint()

    def turn(self) -> bool:
        """Call between model calls: anyone waiting goes first (other background work too)."""
        return self._yield_to(Gate.BACKGROUND)


# ---------------------------------------------------------------------------------------------- the limits

@dataclass
class Limits:
    """What the server refuses before any model work. 0 or None turns a limit off."""
    max_question_tokens: int | None = 256     # tokens of the new question, far below the context
    max_history_turns: int | None = 16        # earlier turns sent with a question
    rate_per_minute: float | None = 30.0      # questions per owner per minute (burst: `burst`)
    burst: int = 10
    _buckets: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check_question(self, pipe: Pipeline, question: str, history: History = ()) -> None:
        """LimitError when the question is too long or the conversation has too many turns."""
        if self.max_question_tokens and question:
            # a cheap bound first: no tokenizer yields fewer tokens than a quarter of the characters
            # of ordinary text, and a 1 MB string should not even be tokenized
            rough = len(question) > 40 * self.max_question_tokens
            n = (len(question) // 4 if rough
                 else len(pipe.encoder.tokenizer(question, add_special_tokens=False)["input_ids"]))
            if n > self.max_question_tokens:
                raise LimitError(f"the question is too long ({'over ' if rough else ''}{n:,} tokens, "
                                 f"{len(question):,} characters); this "
                                 f"server takes at most {self.max_question_tokens} tokens per question. Shorten it "
                                 "and ask again")
        if self.max_history_turns and len(history) > self.max_history_turns:
            raise LimitError(f"this conversation has {len(history)} earlier turns; this server sends at most "
                             f"{self.max_history_turns} with a question. Start a new conversation (the old one "
                             "can be exported first)")

    def check_rate(self, owner: Hashable | None) -> None:
        """LimitError when `owner` asked more than rate_per_minute (after a burst of `burst`)."""
        if not self.rate_per_minute or owner is None:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(owner, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate_per_minute / 60.0)
            if tokens < 1.0:
                self._buckets[owner] = (tokens, now)
                wait = (1.0 - tokens) * 60.0 / self.rate_per_minute
                raise LimitError(f"too many questions: this server answers at most {self.rate_per_minute:g} a "
                                 f"minute per user. Try again in {wait:.0f} s")
            self._buckets[owner] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:     # forget owners idle long enough to have a full bucket
                idle = self.burst * 60.0 / self.rate_per_minute
                for k in [k for k, (_, t) in self._buckets.items() if now - t > idle]:
                    del self._buckets[k]


# ---------------------------------------------------------------------------------------------- the server

@dataclass
class Request:
    pipe: Pipeline
    prepared: Prepared
    options: dict
    key: tuple
    owner: Hashable | None = None
    on_token: Callable[[str], None] | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    finished: bool = False


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class Server:
    """Answers requests from many threads through one model (see the module's docstring).
    max_batch: most requests in one batch; window_s: how long the first request of a batch waits for
    others to join it; limits: what is refused before any model work."""

    def __init__(self, max_batch: int = 8, window_s: float = 0.03, limits: Limits | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.window_s = max(0.0, window_s)
        self.limits = limits if limits is not None else Limits()    # the defaults; Limits(None, None, None): none
        self._local = threading.local()                  # the job this thread holds the model for, if any
        self.gate = Gate()
        self._cv = threading.Condition()
        self._pending: deque[Request] = deque()
        self._jobs: set[Job] = set()
        self._running: list[Request] = []
        self._worker: threading.Thread | None = None
        self.batch_sizes: deque[int] = deque(maxlen=1000)   # sizes of the last batches run (for tests, stats)

    # --- plain questions ---
    def submit(self, pipe: Pipeline, image, question: str, history: History = (), *, owner: Hashable | None = None,
               on_token: Callable[[str], None] | None = None, max_new_tokens: int = 48, **options) -> Future:
        """Queues one question; returns a Future of its Answer. Bad input and limits raise here
        (InputError, LimitError), before any model work. Options go to pipe.answer_batch."""
        self.limits.check_question(pipe, question, history)
        prepared = pipe.prepare(image, question, history)      # bad input is refused before the rate counts it
        self.limits.check_rate(owner)
        options = dict(options, max_new_tokens=max_new_tokens)
        req = Request(pipe, prepared, options, (id(pipe), _freeze(options)), owner, on_token)
        # the caller cancelling its Future stops this request (its stream, its part of the batch) only
        req.future.add_done_callback(lambda f: f.cancelled() and req.cancelled.set())
        with self._cv:
            self._pending.append(req)
            self._start_worker()
            self._cv.notify_all()
        return req.future

    def answer(self, pipe: Pipeline, image, question: str, history: History = (), **kw) -> Answer:
        """submit(...).result(): blocks until this question is answered (or raises its own error). Called
        by background work holding the model (in this thread), it lends the model while it waits."""
        future = self.submit(pipe, image, question, history, **kw)
        job = self._held()
        if job is None:
            return future.result()
        self.gate.release()
        try:
            return future.result()
        finally:
            self.gate.acquire(Gate.BACKGROUND)

    def cancel(self, owner: Hashable, questions: bool = True) -> int:
        """Stops the background jobs of `owner` (and its questions, unless questions=False) at their next
        token; returns how many."""
        n = 0
        with self._cv:
            for req in [*self._pending, *self._running] if questions else ():
                if req.owner == owner and not req.future.done() and not req.cancelled.is_set():
                    req.cancelled.set()
                    n += 1
            for job in self._jobs:
                if job.owner == owner and not job.cancelled.is_set():
                    job.cancelled.set()
                    n += 1
        return n

    # --- background work ---
    @contextmanager
    def background(self, owner: Hashable | None = None) -> Iterator[Job]:
        """Holds the model at background priority; the work inside calls job.checkpoint() between tokens
        (or passes job.step as generate's callback) and job.turn() between model calls. Inside a job held
        by the same thread this is that job (the gate is not taken twice)."""
        outer = self._held()
        if outer is not None:
            outer._check()
            yield outer
            return
        job = Job(self, owner)
        with self._cv:
            self._jobs.add(job)
        try:
            self.gate.acquire(Gate.BACKGROUND)
            self._local.job, job.holder = job, threading.get_ident()
            try:
                job._check()
                yield job
            finally:
                self._local.job, job.holder = None, None
                self.gate.release()
        finally:
            with self._cv:
                self._jobs.discard(job)

    def _held(self) -> Job | None:
        """The job this thread holds the model for (None: none, or it ended on another thread)."""
        job = getattr(self._local, "job", None)
        return job if job is not None and job.holder == threading.get_ident() else None

    # --- the worker ---
    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._loop, name="roe-serving", daemon=True)
            self._worker.start()

    def _next_batch(self) -> list[Request]:
        """Waits for a request, then up to window_s (from its arrival) for others with its key."""
        with self._cv:
            self._cv.wait_for(lambda: self._pending)
            head = self._pending[0]

            def mates():
                return [r for r in self._pending if r.key == head.key][:self.max_batch]
            while len(mates()) < self.max_batch:
                left = head.arrived + self.window_s - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch = mates()
            for r in batch:
                self._pending.remove(r)
            self._running = batch
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                self._serve(batch)
            except BaseException as e:  # noqa: BLE001  (the worker never dies; each request gets an outcome)
                log.exception("serving failed")
                for r in batch:
                    _settle(r, error=e)
            finally:
                with self._cv:
                    self._running = []

    def _serve(self, batch: list[Request]) -> None:
        live = []
        for r in batch:
            if r.cancelled.is_set() or r.future.cancelled():
                _settle(r, error=Cancelled("stopped before it started"))
            else:
                live.append(r)
        if not live:
            return
        pipe, options = live[0].pipe, live[0].options
        for r in live:
            r.tokens, r.finished = [], False
        try:
            with self.gate.hold(Gate.PLAIN):
                self.batch_sizes.append(len(live))
                answers = pipe.answer_batch([r.prepared for r in live], on_step=self._stepper(pipe, live), **options)
        except Cancelled as e:
            for r in live:
                _settle(r, error=e)
        except torch.OutOfMemoryError as e:
            free_memory(pipe)
            if len(live) == 1:
                log.warning("one request ran out of GPU memory alone: %s", e)
                _settle(live[0], error=OutOfMemory(
                    "the model ran out of GPU memory answering this question, even on its own. Try again later "
                    "(other users' work holds memory too), or ask a shorter question or start a new conversation"))
                return
            half = (len(live) + 1) // 2
            log.warning("a batch of %d ran out of GPU memory; retrying it in halves of %d and %d", len(live), half,
                        len(live) - half)
            self._serve(live[:half])
            self._serve(live[half:])
        except Exception as e:  # noqa: BLE001
            if len(live) == 1:
                _settle(live[0], error=e)
                return
            log.warning("a batch of %d failed (%s: %s); answering its requests one by one", len(live),
                        type(e).__name__, e)
            for r in live:          # only the faulty request fails; the others are answered alone
                self._serve([r])
        else:
            for r, a in zip(live, answers):
                if r.cancelled.is_set():
                    _settle(r, error=Cancelled("stopped"))
                else:
                    _settle(r, result=a)

    @staticmethod
    def _stepper(pipe: Pipeline, live: list[Request]):
        """generate's callback: streams each request's own text; stops the batch when all are cancelled."""
        stop = pipe.encoder.stop_ids
        tok = pipe.encoder.tokenizer

        def step(_, tokens):
            values = tokens.tolist()
            for r, t in zip(live, values):
                if r.finished:
                    continue
                if t in stop:
                    r.finished = True
                    continue
                r.tokens.append(t)
                if r.on_token is not None and not r.cancelled.is_set():
                    try:
                        r.on_token(tok.decode(r.tokens, skip_special_tokens=True))
                    except Exception:  # noqa: BLE001  (one listener's failure is not the batch's)
                        log.exception("on_token failed")
            if all(r.cancelled.is_set() for r in live):
                raise Cancelled("stopped")
        return step


def _settle(r: Request, result: Any = None, error: BaseException | None = None) -> None:
    """Gives a request its outcome unless it has one (its caller may have cancelled the Future): one
    request's state never fails another's."""
    if r.future.done():
        return
    try:
        if error is not None:
            r.future.set_exception(error)
        else:
            r.future.set_result(result)
    except InvalidStateError:       # cancelled between the check and the set
        pass


def free_memory(pipe: Pipeline) -> None:
    """After running out of GPU memory: the pipe's engine drops its idle arenas, torch its cached blocks."""
    engine = getattr(pipe, "engine", None)
    if engine is not None:
        engine.release_idle()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def prefill_checkpoints(pipe: Pipeline, between_layers: Callable[[], object]) -> Iterator[None]:
    """between_layers() after each decoder layer's attention during a prefill (more than one position),
    for a system whose answer_batch takes no `between_layers` of its own (RoE's does). Only forwards of
    the calling thread are hooked: the base's layers are shared by every system, and other users' batches
    run on them at these very checkpoints. Decode steps (one position) are left alone, so nothing waits
    inside a captured graph."""
    me = threading.get_ident()

    def hook(module, args, kwargs, output):
        if threading.get_ident() != me:
            return
        h = output[0] if isinstance(output, tuple) else output
        if h.dim() >= 2 and h.shape[-2] > 1:
            between_layers()
    layers = pipe.model.base.model.language_model.layers
    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def answer_yielding(pipe: Pipeline, items, job: Job, on_step: Callable | None = None, **options) -> list[Answer]:
    """pipe.answer_batch as background work: job's checkpoint at every token (on_step, default job.step)
    and after every prefill layer, whatever the system (its own between_layers, else prefill_checkpoints)."""
    on_step = job.step if on_step is None else on_step
    if "between_layers" in pipe.spec.options:
        return pipe.answer_batch(items, on_step=on_step, between_layers=job.checkpoint, **options)
    with prefill_checkpoints(pipe, job.checkpoint):
        return pipe.answer_batch(items, on_step=on_step, **options)
