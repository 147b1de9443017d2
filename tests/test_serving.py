"""roe_core.serving: questions that arrive together are answered in one mixed-route batch and each
equals its lone answer; each request streams its own text; one faulty request fails alone; background
work gives the model to plain questions at the next token; cancel stops a user's work; limits refuse
before any model work."""
import threading
import time

import pytest
import torch

from conftest import QUESTIONS, use_path
from roe_core.serving import Cancelled, Gate, LimitError, Limits, Server

pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 8
DEADLINE = 60          # seconds a concurrency test may take before it counts as a hang


@pytest.fixture
def on_path(tiny_roe, decoding):
    """tiny_roe decoding on `decoding` ("eager": a fresh decode engine, "off": the eager loop)."""
    use_path(tiny_roe, decoding)
    yield tiny_roe
    tiny_roe.use_engine("off")


@pytest.fixture
def pipe(on_path):
    return on_path


def calls_of(pipe, monkeypatch):
    """Records the batch size of every generate call of `pipe`."""
    sizes = []
    real = pipe.generate

    def counting(batch, *a, **kw):
        sizes.append(batch.input_ids.shape[0])
        return real(batch, *a, **kw)
    monkeypatch.setattr(pipe, "generate", counting)
    return sizes


def submit_together(server, pipe, items, **kw):
    """Submits every item from its own thread at (nearly) the same moment; returns the futures."""
    futures = [None] * len(items)
    barrier = threading.Barrier(len(items))

    def go(k):
        barrier.wait()
        futures[k] = server.submit(pipe, *items[k], owner=f"user{k}", max_new_tokens=N_NEW, **kw)
    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return futures


def test_questions_that_arrive_together_share_one_batch_and_equal_their_lone_answers(on_path, routed, images,
                                                                                     monkeypatch):
    items = [(images[0], QUESTIONS[0], ()), (images[1], QUESTIONS[1], [("Is it big?", "Yes.")]),
             (images[2], QUESTIONS[2], ())]
    alone = [routed.answer(*it, max_new_tokens=N_NEW, trace_l1=True, dense_l1=False) for it in items]
    assert len({tuple(a.trace.route) for a in alone}) > 1                    # the routes differ
    sizes = calls_of(routed, monkeypatch)
    streamed = [[] for _ in items]
    server = Server(max_batch=8, window_s=0.5)
    futures = [server.submit(routed, *it, owner=k, max_new_tokens=N_NEW, trace_l1=True,
                             on_token=streamed[k].append) for k, it in enumerate(items)]
    together = [f.result(timeout=60) for f in futures]
    assert sizes == [3] and list(server.batch_sizes) == [3]                  # one forward for all three
    for t, a, s in zip(together, alone, streamed):
        assert t.text == a.text and t.question == a.question
        assert t.trace.route == a.trace.route
        torch.testing.assert_close(torch.tensor(t.trace.p_run), torch.tensor(a.trace.p_run), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(t.trace.l1), torch.tensor(a.trace.l1), atol=1e-4, rtol=1e-4)
        assert s and s[-1] == t.text                                         # each streamed its own answer


def test_max_batch_and_options_split_batches(pipe, images, monkeypatch):
    sizes = calls_of(pipe, monkeypatch)
    server = Server(max_batch=2, window_s=0.5)
    items = [(images[k % 4], QUESTIONS[k % 3], ()) for k in range(3)]
    futures = [server.submit(pipe, *it, max_new_tokens=N_NEW) for it in items]
    futures.append(server.submit(pipe, *items[0], max_new_tokens=N_NEW, route="dense"))   # other options
    [f.result(timeout=60) for f in futures]
    assert sorted(sizes) == [1, 1, 2]
    assert max(server.batch_sizes) <= 2


def test_a_faulty_request_fails_alone_and_the_others_are_answered(pipe, images, monkeypatch):
    poison = pipe.encoder.tokenizer("zebra", add_special_tokens=False)["input_ids"]
    real = pipe.generate

    def faulty(batch, *a, **kw):
        rows = batch.input_ids.tolist()
        if any(all(t in row for t in poison) for row in rows):
            raise RuntimeError("injected fault")
        return real(batch, *a, **kw)
    monkeypatch.setattr(pipe, "generate", faulty)
    items = [(images[0], QUESTIONS[0], ()), (images[1], "zebra zebra?", ()), (images[2], QUESTIONS[1], ())]
    server = Server(max_batch=8, window_s=0.5)
    futures = submit_together(server, pipe, items)
    good = [futures[0].result(timeout=60), futures[2].result(timeout=60)]
    with pytest.raises(RuntimeError, match="injected fault"):
        futures[1].result(timeout=60)
    monkeypatch.setattr(pipe, "generate", real)
    assert [g.text for g in good] == [pipe.answer(*items[k], max_new_tokens=N_NEW).text for k in (0, 2)]
    assert server.answer(pipe, *items[0], max_new_tokens=N_NEW).text == good[0].text   # it keeps serving


def test_bad_input_is_refused_at_submit_before_any_model_work(pipe, images, monkeypatch):
    sizes = calls_of(pipe, monkeypatch)
    server = Server(limits=Limits(max_question_tokens=20, max_history_turns=2, rate_per_minute=None))
    t0 = time.perf_counter()
    with pytest.raises(LimitError, match="too long"):
        server.submit(pipe, images[0], "what " * 20_000)
    assert time.perf_counter() - t0 < 0.2
    with pytest.raises(LimitError, match="too long .* tokens"):
        server.submit(pipe, images[0], "is it " * 15)
    with pytest.raises(LimitError, match="3 earlier turns.*New conversation|3 earlier turns.*new conversation"):
        server.submit(pipe, images[0], "ok?", [("a?", "b")] * 3)
    with pytest.raises(ValueError, match="question is empty"):
        server.submit(pipe, images[0], "  ")
    with pytest.raises(ValueError, match="no image"):
        server.submit(pipe, None, "ok?")
    assert sizes == []


def test_the_rate_limit_is_per_user_and_says_when_to_come_back():
    lim = Limits(rate_per_minute=60, burst=2)
    lim.check_rate("a")
    lim.check_rate("a")
    with pytest.raises(LimitError, match=r"at most 60 a minute.*Try again in \d+ s"):
        lim.check_rate("a")
    lim.check_rate("b")                      # another user is not limited by the first
    Limits(rate_per_minute=None).check_rate("a")


def test_the_gate_serves_plain_before_background_and_in_order():
    gate, order = Gate(), []
    gate.acquire(Gate.BACKGROUND)            # someone holds the model
    threads = []
    for name, prio in (("bg1", Gate.BACKGROUND), ("plain1", Gate.PLAIN), ("bg2", Gate.BACKGROUND),
                       ("plain2", Gate.PLAIN)):
        def take(name=name, prio=prio):
            with gate.hold(prio):
                order.append(name)
        threads.append(threading.Thread(target=take))
        threads[-1].start()
        time.sleep(0.05)
    assert gate.waiting(Gate.PLAIN) and gate.waiting(Gate.BACKGROUND)
    gate.release()
    for t in threads:
        t.join(5)
    assert order == ["plain1", "plain2", "bg1", "bg2"]


def test_background_work_yields_to_a_plain_question_at_the_next_token(pipe, images):
    server = Server(window_s=0.0)
    started, stop, served_during = threading.Event(), threading.Event(), []

    def long_work():
        with server.background(owner="measurer") as job:
            started.set()
            while not stop.is_set():          # stands for a long measurement: a token at a time
                job.checkpoint()
                time.sleep(0.002)
            served_during.append(job.pauses)
    worker = threading.Thread(target=long_work)
    worker.start()
    assert started.wait(10)
    ans = server.submit(pipe, images[0], QUESTIONS[0], max_new_tokens=N_NEW).result(timeout=60)
    assert ans.text
    stop.set()
    worker.join(10)
    assert served_during and served_during[0] >= 1           # the job paused for the question


def test_cancel_stops_background_work_and_pending_questions(pipe, images):
    server = Server(window_s=0.0)
    started, outcome = threading.Event(), []

    def long_work():
        try:
            with server.background(owner="u1") as job:
                started.set()
                for _ in range(100_000):
                    job.checkpoint()
                    time.sleep(0.001)
            outcome.append("finished")
        except Cancelled:
            outcome.append("cancelled")
    worker = threading.Thread(target=long_work)
    worker.start()
    assert started.wait(10)
    assert server.cancel("u1") == 1
    worker.join(10)
    assert outcome == ["cancelled"]
    assert server.answer(pipe, images[0], QUESTIONS[0], max_new_tokens=N_NEW).text     # the model is free

    with server.background(owner="holder"):      # a question waits behind nothing but the holder...
        fut = server.submit(pipe, images[0], QUESTIONS[0], owner="u2", max_new_tokens=N_NEW)
        time.sleep(0.1)
        assert server.cancel("u2") == 1          # ...and its user stops it before it runs
    with pytest.raises(Cancelled):
        fut.result(timeout=60)


def test_a_speed_measurement_reruns_a_timed_run_that_was_paused(pipe, images, monkeypatch):
    import roe_core.systems.roe as roe

    runs = []
    real = roe.generate

    def counting(*a, **kw):
        runs.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(roe, "generate", counting)
    pipe.compare(images[0], QUESTIONS[0], max_new_tokens=N_NEW, repeats=2)
    n_plain = len(runs)                       # 2 untimed answers + 2 x 2 timed runs
    assert n_plain == 6
    paused = []

    def checkpoint():
        if len(runs) == 3 and not paused:     # inside the first timed run (its prefill): pause once
            paused.append(1)
            return True
        return False
    runs.clear()
    cmp = pipe.compare(images[0], QUESTIONS[0], max_new_tokens=N_NEW, repeats=2, checkpoint=checkpoint)
    assert paused and len(runs) == n_plain + 1     # that timed run was run again
    assert len(cmp.roe_times) == len(cmp.dense_times) == 2


def test_background_prefills_yield_between_layers(pipe, images):
    """A prefill is the longest step: background work hands the model over after any layer of it."""
    calls = []
    pipe.answer_batch([(images[0], QUESTIONS[0], ())], max_new_tokens=2, between_layers=lambda: calls.append(1))
    assert len(calls) == pipe.model.num_layers
    calls.clear()
    pipe.answer_batch([(images[0], QUESTIONS[0], ())], max_new_tokens=2, dense_l1=True,
                      between_layers=lambda: calls.append(1))
    assert len(calls) == 2 * pipe.model.num_layers              # the dense L1 prefill too


# --- under load, on both decoding paths: no hang, nobody's failure passed on ---

def speed_run_in_background(server, pipe, image, question, repeats, outcome, started):
    """A thread running another user's speed measurement (pipe.compare) as background work."""
    def run():
        try:
            with server.background(owner="measurer") as job:
                def checkpoint():
                    started.set()
                    return job.checkpoint()
                outcome["cmp"] = pipe.compare(image, question, max_new_tokens=N_NEW, repeats=repeats,
                                              checkpoint=checkpoint)
                outcome["pauses"] = job.pauses
        except BaseException as e:  # noqa: BLE001
            outcome["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def eight_users(images):
    return [(images[k % 4], QUESTIONS[k % 3] if k < 6 else f"Is there anything {k}?", ()) for k in range(8)]


def test_eight_users_during_a_speed_run_get_their_lone_answers_and_the_run_finishes(pipe, images, within):
    """The reported deadlock: with the decode engine, a speed run's checkpoint handed the model to a plain
    batch that then waited on the engine's lock, held by the speed run. Both paths, within a deadline."""
    items = eight_users(images)
    alone = [pipe.answer(*it, max_new_tokens=N_NEW).text for it in items]

    def scenario():
        server = Server(max_batch=8, window_s=0.2)
        outcome, started = {}, threading.Event()
        t = speed_run_in_background(server, pipe, images[3], QUESTIONS[0], 8, outcome, started)
        assert started.wait(30)
        futures = submit_together(server, pipe, items)
        texts = [f.result(timeout=DEADLINE) for f in futures]
        t.join(DEADLINE)
        return [a.text for a in texts], outcome
    texts, outcome = within(DEADLINE, scenario)
    assert "error" not in outcome, outcome.get("error")
    assert texts == alone
    assert outcome["pauses"] >= 1 and outcome["cmp"].roe.text                # answered during the run


def test_eight_users_during_an_atlas_get_their_lone_answers_and_the_atlas_finishes(pipe, images, within):
    from roe_core.analysis.atlas import build_atlas
    from roe_core.scenes.questions import test_questions

    items = eight_users(images)
    alone = [pipe.answer(*it, max_new_tokens=N_NEW).text for it in items]
    questions = test_questions(16, image_size=64)

    def scenario():
        server = Server(max_batch=8, window_s=0.2)
        outcome, started = {}, threading.Event()

        def atlas():
            try:
                with server.background(owner="atlas") as job:
                    def between():
                        started.set()
                        job.checkpoint()
                    outcome["atlas"] = build_atlas(pipe, questions, batch_size=4, max_new_tokens=N_NEW,
                                                   on_step=job.step, between_layers=between)
                    outcome["pauses"] = job.pauses
            except BaseException as e:  # noqa: BLE001
                outcome["error"] = e
        t = threading.Thread(target=atlas, daemon=True)
        t.start()
        assert started.wait(30)
        futures = submit_together(server, pipe, items)
        texts = [f.result(timeout=DEADLINE).text for f in futures]
        t.join(DEADLINE)
        return texts, outcome
    texts, outcome = within(DEADLINE, scenario)
    assert "error" not in outcome, outcome.get("error")
    assert texts == alone and outcome["pauses"] >= 1
    assert len(outcome["atlas"].entries) == 16


def test_a_cancelled_request_never_fails_its_batch_mates(pipe, images, within):
    """Request 0 of a batch of three is cancelled (Future.cancel) while it waits: 1 and 2 get their answers."""
    items = [(images[k], QUESTIONS[k], ()) for k in range(3)]
    alone = [pipe.answer(*it, max_new_tokens=N_NEW).text for it in items]

    def scenario():
        server = Server(max_batch=8, window_s=0.5)
        with server.background(owner="holder"):              # the batch forms and waits for the model
            futures = [server.submit(pipe, *it, owner=f"u{k}", max_new_tokens=N_NEW) for k, it in enumerate(items)]
            time.sleep(0.7)
            assert futures[0].cancel()
        return futures, [f.result(timeout=DEADLINE).text for f in futures[1:]], list(server.batch_sizes)
    futures, texts, sizes = within(DEADLINE, scenario)
    assert texts == alone[1:]
    assert futures[0].cancelled()
    assert sizes in ([3], [2])                                # one batch


def test_a_server_without_limits_has_the_documented_defaults(pipe, images):
    server = Server()
    assert server.limits.max_question_tokens == Limits().max_question_tokens == 256
    assert server.limits.max_history_turns == 16 and server.limits.rate_per_minute == 30.0
    with pytest.raises(LimitError, match="too long"):
        server.submit(pipe, images[0], "what " * 20_000)


def test_a_request_refused_as_a_bad_image_spends_no_rate_token(pipe, images, tmp_path):
    server = Server(limits=Limits(rate_per_minute=60, burst=2))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    for _ in range(3):
        with pytest.raises(ValueError):
            server.submit(pipe, str(bad), QUESTIONS[0], owner="u")
        with pytest.raises(ValueError, match="no image"):
            server.submit(pipe, None, QUESTIONS[0], owner="u")
    server.answer(pipe, images[0], QUESTIONS[0], owner="u", max_new_tokens=2)      # both tokens still there
    server.answer(pipe, images[0], QUESTIONS[0], owner="u", max_new_tokens=2)
    with pytest.raises(LimitError, match="too many questions"):
        server.submit(pipe, images[0], QUESTIONS[0], owner="u")


def test_a_batch_out_of_memory_is_split_in_half_and_every_user_gets_an_answer(pipe, images, monkeypatch, within):
    """torch.cuda.OutOfMemoryError from a batch (injected: batches over 2 rows run out) is retried in halves;
    a single request that runs out gets a clear message; the server keeps serving."""
    items = eight_users(images)[:6]
    alone = [pipe.answer(*it, max_new_tokens=N_NEW).text for it in items]
    real = pipe.generate
    limit = [2]

    def tight(batch, *a, **kw):
        if batch.input_ids.shape[0] > limit[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(batch, *a, **kw)
    monkeypatch.setattr(pipe, "generate", tight)
    server = Server(max_batch=8, window_s=0.3)
    texts = within(DEADLINE, lambda: [f.result(timeout=DEADLINE).text for f in submit_together(server, pipe, items)])
    assert texts == alone
    assert max(server.batch_sizes) == 6 and 2 in server.batch_sizes and 3 in server.batch_sizes
    limit[0] = 0                                              # even one request does not fit
    with pytest.raises(RuntimeError, match="out of (GPU )?memory.*(shorter|later)"):
        server.answer(pipe, images[0], QUESTIONS[0], max_new_tokens=N_NEW)
    limit[0] = 8
    assert server.answer(pipe, images[0], QUESTIONS[0], max_new_tokens=N_NEW).text == alone[0]   # still serving


def test_work_inside_a_background_job_that_asks_a_plain_question_does_not_hang(pipe, images, within):
    """A job that asks the server a plain question (or opens another job) from its own thread: the job
    lends the model while it waits, instead of waiting on itself."""
    server = Server(window_s=0.0)
    alone = pipe.answer(images[0], QUESTIONS[0], max_new_tokens=N_NEW).text

    def scenario():
        with server.background(owner="u") as job:
            with server.background(owner="u") as inner:
                assert inner is job
            return server.answer(pipe, images[0], QUESTIONS[0], max_new_tokens=N_NEW).text
    assert within(30, scenario) == alone
