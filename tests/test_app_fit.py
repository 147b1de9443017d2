"""RoE on the user's own LLaVA (issue 34): a base without parts loads RoE and the fixed path "not fitted",
and no routed answer ever comes from untrained parts (the library refuses; the app says so on every tab and
in /answer); the Fit tab fits them in the background, live on the same page; a LLaVA folder written by
save_pretrained goes through `app.py --model <folder>`, the fit, answers and a reload of its parts."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import app  # noqa: F401  (environment before gradio)
from roe_core import NotFittedError
from roe_core.systems import NOT_FITTED, load_base, load_systems

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "assets" / "examples"
IMAGE = EXAMPLES / "3-count.png"
QUESTION = "How many circles are there?"
VIEWS = ["status", "chat", "trace", "l1", "route", "usage", "adapters", "layers", "threshold",
         "speed_fig", "speed_table", "speed_md"]
# /fit returns these, in this order
FIT_OUT = ["fit_md", "fit_json", "fit_zip", "header", "systems_pick", "threshold", "sweep_thresholds"]

gradio_client = pytest.importorskip("gradio_client")
pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]
handle_file = gradio_client.handle_file


def has_fit() -> bool:
    return importlib.util.find_spec("roe_core.fit") is not None and hasattr(
        importlib.import_module("roe_core.fit"), "fit_parts")


needs_fit_package = pytest.mark.skipif(not has_fit(), reason="roe_core.fit (the fit itself) is not in this checkout")


# --- the library: untrained parts only when asked for -------------------------------------------------------

def test_a_base_without_parts_is_not_fitted_and_refuses_every_routed_answer():
    loaded = load_base("tiny", device="cpu")
    pipes = load_systems(["dense", "roe", "static"], loaded=loaded)
    roe, static, dense = pipes["roe"], pipes["static"], pipes["dense"]
    L = roe.num_layers
    image = Image.open(IMAGE).convert("RGB")
    assert roe.needs_fit and static.needs_fit and not dense.needs_fit
    assert roe.info["parts"] == static.info["parts"] == NOT_FITTED and not roe.fitted
    refused = [lambda: roe.answer(image, QUESTION, max_new_tokens=3),
               lambda: roe.answer(image, QUESTION, route=[i % 2 == 0 for i in range(L)], max_new_tokens=3),
               lambda: roe.answer_batch([(image, QUESTION, ())], threshold=0.0, max_new_tokens=3),
               lambda: roe.compare(image, QUESTION, max_new_tokens=3, repeats=1),
               lambda: static.answer(image, QUESTION, max_new_tokens=3)]
    for call in refused:
        with pytest.raises(NotFittedError, match="is not fitted for this model"):
            call()
    # every layer run: nothing untrained takes part, so it answers, as the dense system does, with no
    # router probabilities in its trace
    every = roe.answer(image, QUESTION, route="dense", max_new_tokens=5)
    assert every.text == dense.answer(image, QUESTION, max_new_tokens=5).text
    assert every.trace.route == [True] * L and every.trace.p_run == [None] * L


def test_untrained_parts_only_when_asked_and_a_parts_folder_is_fitted(tmp_path):
    loaded = load_base("tiny", device="cpu")
    image = Image.open(IMAGE).convert("RGB")
    fresh = load_systems(["roe", "static"], loaded=loaded, fresh=True)
    assert not fresh["roe"].needs_fit and "untrained" in fresh["roe"].info["parts"] and not fresh["roe"].fitted
    routed = fresh["roe"].answer(image, QUESTION, max_new_tokens=3)
    assert routed.trace.route_mode == "auto" and None not in routed.trace.p_run
    fresh["roe"].model.save_roe(tmp_path / "roe")
    back = load_systems(["roe"], loaded=loaded, parts={"roe": str(tmp_path / "roe")})["roe"]
    assert back.fitted and not back.needs_fit and back.info["parts"] == str(tmp_path / "roe")
    assert back.answer(image, QUESTION, max_new_tokens=3).text == routed.text


# --- the app over a base without parts ----------------------------------------------------------------------

def launch(pipes: dict, free_port):
    from app.layout import build_demo, launch_options

    demo = build_demo(pipes["roe"], max_new_tokens=6, speed_repeats=1, systems=pipes)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True, **launch_options())
    return demo, url


@pytest.fixture(scope="module")
def unfitted(entry, free_port):
    """The app as `python app.py --model tiny` loads it (RoE and the fixed path not fitted)."""
    pipes, notice = entry.load_pipelines(entry.parse_args(["--model", "tiny", "--device", "cpu"]))
    assert notice is None and pipes["roe"].needs_fit and pipes["static"].needs_fit
    demo, url = launch(pipes, free_port)
    yield demo, url, pipes["roe"].num_layers
    demo.close()


def header_of(demo) -> str:
    return next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "header")


def test_the_answer_endpoint_says_not_fitted_and_never_answers(unfitted):
    demo, url, L = unfitted
    c = gradio_client.Client(url, verbose=False)
    for system, route in (("roe", "auto"), ("roe", "dense"), ("roe", json.dumps([True, False] * (L // 2))),
                          ("static", "auto")):
        out = json.loads(c.predict(handle_file(str(IMAGE)), QUESTION, "[]", route if system == "roe" else "auto",
                                   None, system, api_name="/answer"))
        assert "answer" not in out and "is not fitted for this model" in out["error"], (system, route, out)
        assert ("RoE" if system == "roe" else "Static") in out["error"] and "Fit" in out["error"]
    dense = json.loads(c.predict(handle_file(str(IMAGE)), QUESTION, "[]", "auto", None, "dense", api_name="/answer"))
    assert isinstance(dense["answer"], str) and "error" not in dense
    assert "**RoE parts** **not fitted**" in header_of(demo) and "**Static parts** **not fitted**" in header_of(demo)


def test_the_chat_answers_with_every_layer_and_says_roe_is_not_fitted(unfitted):
    _, url, L = unfitted
    c = gradio_client.Client(url, verbose=False)
    out = dict(zip(VIEWS + ["question"], c.predict(handle_file(str(IMAGE)), QUESTION, api_name="/ask")))
    assert "not fitted" in out["status"] and "every layer" in out["status"]
    assert out["trace"]["route"] == [True] * L and out["trace"]["route_mode"] == "dense"
    assert out["trace"]["p_run"] == [None] * L and out["trace"]["adapters_used"] == []
    note = [m for m in out["chat"] if (m.get("metadata") or {}).get("title")][-1]
    assert "not fitted" in json.dumps(note["content"]) and note["metadata"]["title"].startswith("Every layer")
    speed = c.predict(True, api_name="/speed")
    assert "not fitted" in speed[-1]                       # nothing routed to time
    # What if on the router, and every Explore view that needs routes, say why they cannot run
    whatif = c.predict("threshold", list(range(L)), 0.3, api_name="/whatif")
    assert "not fitted" in whatif[0]
    assert "not fitted" in c.predict("scenes", 4, [], api_name="/atlas")[0]
    assert "not fitted" in c.predict("0.3, 0.5", 4, api_name="/sweep")[0]
    assert "not fitted" in c.predict([0, 1], api_name="/batching")[0]
    assert "not fitted" in c.predict(api_name="/fidelity")[0]
    assert "RoE is not fitted" in c.predict(["roe"], "", api_name="/systems")[0]
    both = c.predict(["dense", "moe_llava"], "", api_name="/systems")   # the systems that need no fit answer
    assert "fastest" in both[0]
    # every layer ticked by hand is the base alone: answered
    assert "re-answered" in c.predict("layers", list(range(L)), 0.5, api_name="/whatif")[0]


# --- the fit, live on the page --------------------------------------------------------------------------------

def fit_result(client, *args) -> dict:
    return dict(zip(FIT_OUT, client.predict(*args, api_name="/fit")))


@needs_fit_package
def test_fit_on_the_scenes_makes_routes_live_on_the_same_page(free_port, tmp_path):
    pipes = load_systems(["dense", "roe", "static"], loaded=load_base("tiny", device="cpu"))
    demo, url = launch(pipes, free_port)
    try:
        c = gradio_client.Client(url, verbose=False)
        out = fit_result(c, "scenes", 12, [])
        assert "Fitted on 12 inputs" in out["fit_md"] and "on the 3 held-out inputs" in out["fit_md"], out["fit_md"]
        assert out["fit_json"]["n_inputs"] == 12 and out["threshold"] == out["fit_json"]["threshold"]
        assert "fitted here on 12 inputs" in out["header"] and "not fitted" not in out["header"]
        with zipfile.ZipFile(out["fit_zip"]) as z:
            names = set(z.namelist())
        assert {"roe/roe_config.json", "static/static_config.json", "fit.json"} <= names
        answer = json.loads(c.predict(handle_file(str(IMAGE)), QUESTION, "[]", "auto", None, "roe", api_name="/answer"))
        assert "error" not in answer, answer
        assert answer["trace"]["route_mode"] == "auto" and None not in answer["trace"]["p_run"]
        static = json.loads(c.predict(handle_file(str(IMAGE)), QUESTION, "[]", "auto", None, "static",
                                      api_name="/answer"))
        assert "error" not in static, static
        turn = dict(zip(VIEWS + ["question"], c.predict(handle_file(str(IMAGE)), QUESTION, api_name="/ask")))
        assert turn["trace"]["route_mode"] == "auto" and "not fitted" not in turn["status"]
        assert turn["trace"]["route"] == answer["trace"]["route"]
        # Side by side now offers the fitted systems
        assert "roe" in json.dumps(out["systems_pick"]) and "static" in json.dumps(out["systems_pick"])
    finally:
        demo.close()


@needs_fit_package
def test_a_fit_can_be_cancelled_and_changes_nothing(free_port):
    pipes = load_systems(["dense", "roe", "static"], loaded=load_base("tiny", device="cpu"))
    demo, url = launch(pipes, free_port)
    try:
        c = gradio_client.Client(url, verbose=False)
        job = c.submit("scenes", 400, [], api_name="/fit")
        deadline = time.time() + 120
        while not (job.status().progress_data or job.done()) and time.time() < deadline:
            time.sleep(0.1)
        assert job.status().progress_data, "the fit showed no progress"
        # a plain question during the fit: the fit lends the model between its batches
        other = gradio_client.Client(url, verbose=False)
        dense = json.loads(other.predict(handle_file(str(IMAGE)), QUESTION, "[]", "auto", None, "dense",
                                         api_name="/answer"))
        assert "error" not in dense and not job.done(), "the plain question waited for the whole fit"
        said = ""
        deadline = time.time() + 120
        while "Cancelling" not in said and not job.done() and time.time() < deadline:
            said = c.predict(api_name="/fit_cancel")
            time.sleep(0.2)
        assert "Cancelling" in said, "the fit finished before it could be cancelled"
        out = dict(zip(FIT_OUT, job.result()))
        assert "cancelled" in out["fit_md"]
        refused = json.loads(c.predict(handle_file(str(IMAGE)), QUESTION, "[]", "auto", None, "roe",
                                       api_name="/answer"))
        assert "is not fitted" in refused["error"]
    finally:
        demo.close()


# --- the real-checkpoint path, end to end ----------------------------------------------------------------------

def llava_folder(folder: Path) -> Path:
    """A tiny LlavaForConditionalGeneration with its tokenizer and image processor, written by save_pretrained."""
    from roe_core.runtime.tiny import tiny_llava
    for part in tiny_llava(seed=0):
        part.save_pretrained(folder)
    return folder


def llava_json(folder: Path) -> list[Path]:
    """A LLaVA JSON about the shipped example images, and those images (what a user uploads)."""
    images = sorted(EXAMPLES.glob("*.png"))[:4]
    records = [{"image": p.name, "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                   {"from": "gpt", "value": "unused"}]}
               for p in images for q in ("How many circles are there?", "What colour is the square?",
                                         "Is there a triangle?")]
    (folder / "mine.json").write_text(json.dumps(records))
    return [folder / "mine.json", *images]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"app.py exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            return gradio_client.Client(url, verbose=False)
        except Exception:  # noqa: BLE001  (not listening yet)
            time.sleep(1.0)
    raise AssertionError(f"app.py did not listen on {url} within {seconds} s")


@needs_fit_package
def test_a_saved_llava_folder_is_fitted_in_the_app_answered_and_its_parts_reloaded(entry, tmp_path, free_port):
    model = llava_folder(tmp_path / "my-llava")
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "app.py", "--model", str(model), "--device", "cpu", "--port", str(port),
                             "--max-new-tokens", "6", "--speed-repeats", "1", "--rate-limit", "0"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        c = wait_for(f"http://127.0.0.1:{port}/", proc)
        refused = json.loads(c.predict(handle_file(str(IMAGE)), QUESTION, "[]", "auto", None, "roe",
                                       api_name="/answer"))
        assert "RoE is not fitted" in refused["error"]
        uploads = llava_json(tmp_path)
        out = fit_result(c, "upload", 12, [handle_file(str(p)) for p in uploads])
        assert "Fitted on 12 inputs" in out["fit_md"], out["fit_md"]
        assert "fitted here on 12 inputs" in out["header"] and "my-llava" in out["header"]
        answer = json.loads(c.predict(handle_file(str(IMAGE)), QUESTION, "[]", "auto", None, "roe", api_name="/answer"))
        assert "error" not in answer and answer["trace"]["route_mode"] == "auto", answer
        parts = tmp_path / "parts"
        with zipfile.ZipFile(out["fit_zip"]) as z:
            z.extractall(parts)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # the downloaded parts, loaded as a user would: --model <folder> --roe <parts>/roe --static <parts>/static
    pipes, _ = entry.load_pipelines(entry.parse_args(["--model", str(model), "--roe", str(parts / "roe"),
                                                      "--static", str(parts / "static"), "--device", "cpu"]))
    roe = pipes["roe"]
    assert roe.fitted and not roe.needs_fit and roe.info["parts"] == str(parts / "roe")
    assert not pipes["static"].needs_fit
    again = roe.answer(Image.open(IMAGE), QUESTION, max_new_tokens=6)
    assert again.text == answer["answer"] and again.trace.route == answer["trace"]["route"]
