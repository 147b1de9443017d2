"""Many users at once, through gradio_client on the tiny model: concurrent questions share one batch
and each equals its lone answer; a plain question goes ahead of another user's speed measurement (or
atlas); stop frees the model; limits refuse before any model work and keep the conversation; an injected
fault fails only its own request; the load test runs briefly and checks correctness; the work folder
stays under its cap. Every concurrency test runs on both decoding paths (the decode engine, "eager", and
the eager loop, "off") within a deadline: a hang fails in seconds."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import app  # noqa: F401  (environment before gradio)
from conftest import use_path
from roe_core.serving import Limits, Server

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "assets" / "examples"
IMAGES = sorted(EXAMPLES.glob("*.png"))
QUESTIONS = ["How many circles are there?", "What colour is the square?", "Is there a red triangle?",
             "Is the blue circle left of the green square?"]

gradio_client = pytest.importorskip("gradio_client")
pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]
handle_file = gradio_client.handle_file


DEADLINE = 120


@pytest.fixture(scope="module")
def served(free_port):
    """(url, pipe, server): the tiny RoE model behind a server that gathers a batch for 0.2 s, with
    a long speed measurement (200 interleaved repeats) to have something to interrupt."""
    from app.layout import build_demo, launch_options

    from roe_core.systems import load_systems
    pipe = load_systems(["roe"], model="tiny", fresh=True)["roe"]
    server = Server(max_batch=8, window_s=0.2, limits=Limits(max_question_tokens=64, max_history_turns=2,
                                                             rate_per_minute=None))
    demo = build_demo(pipe, max_new_tokens=8, speed_repeats=200, systems={"roe": pipe}, server=server)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True, **launch_options())
    CONTEXT["ctx"] = next(h.ctx for h in (getattr(f.fn, "__self__", None) for f in demo.fns.values())
                          if h is not None and hasattr(h, "ctx"))
    yield url, pipe, server
    demo.close()


CONTEXT: dict = {}          # the served page's AppContext


@pytest.fixture
def on_path(served, decoding):
    """The served app with its model decoding on `decoding` (a fresh engine for "eager")."""
    pipe = served[1]
    use_path(pipe, decoding)
    yield served
    pipe.use_engine("off")


def client(url):
    return gradio_client.Client(url, verbose=False)


def answer(c, image, question, history="[]", route="auto") -> dict:
    return json.loads(c.predict(handle_file(str(image)), question, history, route, None, "roe", api_name="/answer"))


def together(url, items) -> list[dict]:
    """Each (image, question) from its own client, all at once."""
    clients = [client(url) for _ in items]
    out = [None] * len(items)
    barrier = threading.Barrier(len(items))

    def go(k):
        barrier.wait()
        out[k] = answer(clients[k], *items[k])
    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def wait_for(predicate, timeout=30.0):
    t0 = time.perf_counter()
    while not predicate():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.02)


def test_questions_of_several_users_share_one_batch_and_equal_their_lone_answers(on_path, within):
    url, pipe, server = on_path
    items = [(IMAGES[k], QUESTIONS[k]) for k in range(4)]
    server.batch_sizes.clear()
    out = within(DEADLINE, together, url, items)
    assert all("error" not in o for o in out), out
    assert max(server.batch_sizes) >= 2                       # the model saw several users in one forward
    c = client(url)
    for (image, q), o in zip(items, out):
        alone = within(DEADLINE, answer, c, image, q)
        assert (o["answer"], o["trace"]["route"]) == (alone["answer"], alone["trace"]["route"])


def test_a_plain_question_goes_ahead_of_another_users_speed_measurement(on_path, within):
    """The reported deadlock (on the engine: the measurement held the engine's lock while it lent the model)."""
    url, pipe, server = on_path

    def scenario():
        a, b = client(url), client(url)
        a.predict(handle_file(str(IMAGES[0])), QUESTIONS[0], api_name="/ask")
        job = a.submit(True, api_name="/speed")                   # 200 repeats of both paths: a long measurement
        wait_for(lambda: server._jobs)
        measuring = next(iter(server._jobs))
        out = answer(b, IMAGES[1], QUESTIONS[1])
        assert "error" not in out
        assert server._jobs and measuring.pauses >= 1             # answered while the measurement went on
        a.predict(api_name="/stop")
        job.result(timeout=60)
    within(DEADLINE, scenario)


def test_a_plain_question_goes_ahead_of_another_users_atlas(on_path, within, monkeypatch):
    import app.handlers_explore as explore

    url, pipe, server = on_path
    real = explore.build_atlas

    def slow(*args, between_layers=None, **kw):                     # the tiny model is fast: a layer takes 50 ms
        def between():
            time.sleep(0.05)
            between_layers()
        return real(*args, between_layers=between, **kw)
    monkeypatch.setattr(explore, "build_atlas", slow)

    def scenario():
        a, b = client(url), client(url)
        job = a.submit("scenes", 48, None, api_name="/atlas")      # 48 questions: long background work
        wait_for(lambda: server._jobs)
        building = next(iter(server._jobs))
        out = answer(b, IMAGES[2], QUESTIONS[2])
        assert "error" not in out
        assert building.pauses >= 1
        a.predict(api_name="/stop")
        job.result(timeout=60)
        wait_for(lambda: not server._jobs, 30)
    within(DEADLINE, scenario)


def test_stop_ends_the_users_background_work_and_frees_the_model(on_path, within):
    url, pipe, server = on_path

    def scenario():
        a = client(url)
        a.predict(handle_file(str(IMAGES[2])), QUESTIONS[2], api_name="/ask")
        job = a.submit(True, api_name="/speed")
        wait_for(lambda: server._jobs)
        status, _ = a.predict(api_name="/stop")
        assert status == "Stopped."
        _, _, summary = job.result(timeout=30)
        assert "stopped" in summary
        wait_for(lambda: not server._jobs, 10)
        assert "error" not in answer(client(url), IMAGES[0], QUESTIONS[0])
    within(DEADLINE, scenario)


def test_limits_refuse_before_any_model_work_and_say_why(served):
    url, pipe, server = served
    c = client(url)
    n = len(server.batch_sizes)
    out = answer(c, IMAGES[0], "how many " * 5000)
    assert "too long" in out["error"] and "at most 64 tokens" in out["error"]
    out = answer(c, IMAGES[0], "and?", json.dumps([["a?", "b"]] * 3))
    assert "3 earlier turns" in out["error"] and "new conversation" in out["error"]
    assert len(server.batch_sizes) == n                       # no model work for either

    # in the chat: the conversation survives, the question stays in the box
    turns = []
    for q in QUESTIONS[:3]:
        turns = c.predict(handle_file(str(IMAGES[0])), q, api_name="/ask")[1]
    out = c.predict(handle_file(str(IMAGES[0])), "one more?", api_name="/ask")
    assert "3 earlier turns" in out[0] and out[1] == turns and out[-1] == "one more?"
    out = c.predict(handle_file(str(IMAGES[0])), "x " * 500, api_name="/ask")
    assert "too long" in out[0] and out[1] == turns

    server.limits.rate_per_minute, server.limits.burst = 1.0, 2
    try:
        r = client(url)
        assert "error" not in answer(r, IMAGES[0], "ok?") and "error" not in answer(r, IMAGES[0], "ok?")
        out = answer(r, IMAGES[0], "ok?")
        assert "too many questions" in out["error"] and "Try again in" in out["error"]
        assert "error" not in answer(client(url), IMAGES[0], "ok?")    # another user is not limited
    finally:
        server.limits.rate_per_minute = None


def test_a_faulty_request_fails_alone_and_the_app_keeps_serving(on_path, monkeypatch, within):
    url, pipe, server = on_path
    poison = pipe.encoder.tokenizer("zebra", add_special_tokens=False)["input_ids"]
    real = pipe.generate

    def faulty(batch, *a, **kw):
        if any(all(t in row for t in poison) for row in batch.input_ids.tolist()):
            raise RuntimeError("injected fault")
        return real(batch, *a, **kw)
    monkeypatch.setattr(pipe, "generate", faulty)
    items = [(IMAGES[0], QUESTIONS[0]), (IMAGES[1], "zebra zebra?"), (IMAGES[2], QUESTIONS[2])]
    out = within(DEADLINE, together, url, items)
    assert "injected fault" in out[1]["error"]
    assert "error" not in out[0] and "error" not in out[2]
    monkeypatch.setattr(pipe, "generate", real)
    assert "error" not in answer(client(url), *items[0])


def test_the_load_test_runs_and_every_answer_equals_its_lone_answer(on_path, decoding, within):
    from app.loadtest import load_test

    url, pipe, server = on_path
    results = within(DEADLINE, load_test, url, [3], duration=2.0, pool_size=6, verbose=False)
    assert results["one_by_one"]["answers"] > 0 and results["one_by_one"]["errors"] == 0
    run = results["runs"][0]
    assert run["clients"] == 3 and run["answers"] > 0
    assert run["errors"] == 0 and run["differ_from_alone"] == 0
    if decoding != "off":                                       # the engine's counts, per 100 requests
        e = run["engine"]
        assert e["generations"] > 0 and e["arenas_built_per_100"] < 100
        assert e["one_arena_per_bucket"] and e["arenas_built_total"] == e["shape_buckets"]   # no arena rebuilt
    else:
        assert run["engine"] == {}


def test_the_load_test_refuses_other_machines():
    from app.loadtest import check_loopback

    check_loopback("http://127.0.0.1:7860/")
    with pytest.raises(SystemExit, match="only runs against this machine"):
        check_loopback("http://10.1.2.3:7860/")


def test_closing_the_tab_ends_that_users_background_work(on_path, monkeypatch, within):
    """A page (or a client) holds a heartbeat stream open; when it goes, gradio's unload event cancels
    that session's work at its next token."""
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")      # gradio notices a closed page at its next beat
    url, pipe, server = on_path

    def scenario():
        a = client(url)
        a.predict(handle_file(str(IMAGES[3])), QUESTIONS[3], api_name="/ask")
        a.submit(True, api_name="/speed")                       # 200 repeats: long
        wait_for(lambda: server._jobs)
        measuring = next(iter(server._jobs))
        a.close()                                               # the tab closes
        wait_for(lambda: not server._jobs, 30)
        assert measuring.cancelled.is_set()
        assert "error" not in answer(client(url), IMAGES[0], QUESTIONS[0])
    within(DEADLINE, scenario)


def test_the_load_test_times_an_over_long_refusal(served):
    from app.loadtest import over_long

    url, pipe, server = served
    n = len(server.batch_sizes)
    out = over_long(url, chars=5000, repeats=2, verbose=False)
    assert out["refused"] and "too long" in out["message"] and len(out["seconds"]) == 2
    assert len(server.batch_sizes) == n                       # no model work


def test_the_work_folder_stays_under_its_cap_through_new_scenes_and_exports(served, within):
    """Every New scene and export writes a file to the app's private folder: the oldest go once it is over
    its cap (and every file after its age), so no visitor can fill the disk."""
    url, pipe, server = served
    work = CONTEXT["ctx"].work
    cap = 40_000
    work.max_bytes, work.min_age_s, work.every_s = cap, 0.0, 0.0
    c = client(url)
    biggest, sizes = 0, []

    def scenario():
        nonlocal biggest
        for k in range(12):
            c.predict(api_name="/new_scene")
            c.predict(handle_file(str(IMAGES[k % 4])), QUESTIONS[k % 4], api_name="/ask")
            c.predict(api_name="/export")
            files = work.files()
            biggest = max([biggest] + [size for _, size, _ in files])
            sizes.append(sum(size for _, size, _ in files))
    within(DEADLINE, scenario)
    assert work.removed > 0
    assert max(sizes) <= cap + 3 * biggest                     # at most one round's new files over the cap
    work.tidy()
    assert work.size() <= cap
    work.max_age_s = 0.0                                        # and files past their age go whatever the size
    work.tidy()
    assert work.files() == []


def test_side_by_side_hands_the_model_over_inside_every_systems_prefill(monkeypatch):
    """Side by side (and the atlas's fixed path beside) run systems whose answer_batch has no between_layers
    of its own: their prefills still reach the job's checkpoint after every layer, not only per token."""
    from app.background import AppContext
    from app.handlers_compare import CompareHandlers
    from app.session import Conversation
    from roe_core.serving import Gate, Job
    from roe_core.systems import load_systems

    pipes = load_systems(["roe", "dense", "static"], model="tiny", fresh=True)
    ctx = AppContext(pipes["roe"], pipes, Server(), max_new_tokens=4)
    calls = []
    real_yield = Job._yield_to

    def checkpoint(self):
        calls.append(threading.get_ident())
        return real_yield(self, Gate.PLAIN)
    monkeypatch.setattr(Job, "checkpoint", checkpoint)
    monkeypatch.setattr(Job, "step", lambda self, step=None, tokens=None: real_yield(self, Gate.PLAIN))   # not counted
    conv = Conversation.about(str(IMAGES[0]), IMAGES[0].name)
    out = CompareHandlers(ctx).compare_systems(conv, ["roe", "dense", "static"], QUESTIONS[0])
    assert "systems_table" in out, out
    L = pipes["roe"].num_layers                         # RoE's own between_layers: after each of its layers
    static = pipes["static"].answer(IMAGES[0], QUESTIONS[0], max_new_tokens=1).trace.layers_executed
    assert len(calls) == L + L + static                 # after every layer each system's prefill ran
    assert set(calls) == {threading.get_ident()}        # only this job's own forwards were hooked


def test_app_py_serves_either_decoding_path(capsys):
    """--engine picks how every system decodes; graphs on a CPU is refused with a message."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("app_main", REPO / "app.py")     # the script (app/ is the package)
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    for mode in ("auto", "graphs", "eager", "off"):
        assert main.parse_args(["--engine", mode]).engine == mode
    with pytest.raises(SystemExit):
        main.parse_args(["--engine", "fast"])
    if not torch.cuda.is_available():
        assert main.main(["--model", "tiny", "--device", "cpu", "--engine", "graphs"]) == 2
        assert "--engine graphs needs a CUDA device" in capsys.readouterr().err
