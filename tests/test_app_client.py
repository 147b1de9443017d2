"""The app end to end through gradio_client, on the tiny random model: answers, figures, bad input that
never loses the conversation, several users at once, the stateless /answer endpoint, export."""
from __future__ import annotations

import json
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

import app  # noqa: F401  (environment before gradio)
from roe_core import RoEPipeline
from roe_core.systems import registry

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "assets" / "examples"
IMAGE, OTHER_IMAGE = EXAMPLES / "3-count.png", EXAMPLES / "2-colour.png"
# /ask, /set_image, /new_scene, /reset return these first (then the question box or the image)
VIEWS = ["status", "chat", "trace", "l1", "route", "usage", "adapters", "layers", "threshold",
         "speed_fig", "speed_table", "speed_md"]

gradio_client = pytest.importorskip("gradio_client")
# gradio's queue uses pandas options that pandas 3 deprecates; PIL warns about the 12000x12000 upload we refuse
pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]
handle_file = gradio_client.handle_file


def parts_folders(loaded, folder: Path) -> dict[str, str]:
    """RoE and fixed-path parts of the tiny base written to folders, as a user's --roe / --static would be
    (fresh parts, asked for explicitly: the app never makes untrained ones itself). The fixed path gets
    layer scores, as a trained one has (it still skips none): the sweep draws its curve."""
    from roe_core.systems import load_systems
    fresh = load_systems(["roe", "static"], loaded=loaded, fresh=True)
    L = fresh["roe"].num_layers
    fresh["static"].model.config.layer_scores = [float(L - i) for i in range(L)]
    fresh["roe"].model.save_roe(folder / "roe")
    fresh["static"].model.save_static(folder / "static")
    return {"roe": str(folder / "roe"), "static": str(folder / "static")}


@pytest.fixture(scope="module")
def server(free_port, tmp_path_factory):
    from app.layout import build_demo, launch_options

    from roe_core.systems import SYSTEMS, load_base, load_systems
    loaded = load_base("tiny", device="cpu")
    parts = parts_folders(loaded, tmp_path_factory.mktemp("parts"))
    pipes = load_systems(SYSTEMS, loaded=loaded, parts=parts)     # one tiny base, wrapped by every system
    pipe = pipes["roe"]
    assert not any(p.needs_fit for p in pipes.values())
    demo = build_demo(pipe, max_new_tokens=6, speed_repeats=1, systems=pipes)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True, **launch_options())
    yield url, pipe.info["num_layers"]
    demo.close()


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture(scope="module")
def L(server):
    return server[1]


def new_client(url):
    return gradio_client.Client(url, verbose=False)


def ask(client, image, question) -> dict:
    out = client.predict(handle_file(str(image)) if image is not None else None, question, api_name="/ask")
    return dict(zip(VIEWS + ["question"], out))


def figure(value) -> dict:
    """A gr.Plot value from the client -> the plotly figure dict."""
    return json.loads(value["plot"])


def traces(value) -> dict:
    return {t.get("name"): t for t in figure(value)["data"]}


def plain(chat) -> list[dict]:
    """The chat's questions and answers, without the collapsed route blocks (messages with a metadata title)."""
    return [m for m in chat if not (m.get("metadata") or {}).get("title")]


def notes(chat) -> list[dict]:
    return [m for m in chat if (m.get("metadata") or {}).get("title")]


def texts(chat) -> list[str]:
    return [part["text"] for m in plain(chat) for part in m["content"] if part.get("type") == "text"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good images in every awkward mode, and bad files of every kind."""
    d = tmp_path_factory.mktemp("uploads")
    base = Image.open(IMAGE).convert("RGB")
    out = {}
    for name, img, fmt in (("rgba.png", base.convert("RGBA"), "PNG"), ("gray.png", base.convert("L"), "PNG"),
                           ("palette.png", base.convert("P"), "PNG"), ("cmyk.jpg", base.convert("CMYK"), "JPEG"),
                           ("gray16.png", base.convert("L").convert("I;16"), "PNG")):
        img.save(d / name, fmt)
        out[name] = d / name
    frames = [base, base.transpose(Image.FLIP_LEFT_RIGHT)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated.gif"] = d / "animated.gif"
    (d / "notes.png").write_text("this is not an image")
    out["not_an_image"] = d / "notes.png"
    data = IMAGE.read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    out["truncated"] = d / "truncated.png"
    (d / "huge.png").write_bytes(png_header(12000, 12000))
    out["huge"] = d / "huge.png"
    (d / "bomb.png").write_bytes(png_header(30000, 30000))
    out["bomb"] = d / "bomb.png"
    return out


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h 1-bit pixels but carries almost no data (what matters is what it claims)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------------

def test_a_turn_answers_and_every_figure_carries_its_trace(url, L):
    c = new_client(url)
    job = c.submit(handle_file(str(IMAGE)), "How many blue objects are there?", api_name="/ask")
    r = dict(zip(VIEWS + ["question"], job.result()))
    assert len(job.outputs()) >= 2                                   # streamed: partial answer(s), then the turn
    assert r["status"] == "" and r["question"] == ""
    assert texts(r["chat"])[0] == "How many blue objects are there?" and len(plain(r["chat"])) == 2
    t = r["trace"]
    assert t["turn"] == 1 and len(t["route"]) == L and len(t["p_run"]) == L and len(t["l1_dense"]) == L
    assert texts(r["chat"])[1] == (t["answer"] or "…")
    run = [i for i, x in enumerate(t["route"]) if x]
    skip = [i for i, x in enumerate(t["route"]) if not x]

    l1 = traces(r["l1"])
    assert list(l1["every layer run (dense)"]["y"]) == pytest.approx(t["l1_dense"])
    assert list(l1["executed"]["x"]) == run and list(l1["skipped (adapter)"]["x"]) == skip
    lane = [x for x in figure(r["route"])["data"] if x.get("yaxis") in (None, "y")]
    assert sorted(i for x in lane for i in x["x"]) == list(range(L))
    assert next(x for x in lane if x["name"] == "executed")["customdata"] == pytest.approx([t["p_run"][i] for i in run])
    z = traces(r["usage"])["skip map"]["z"]
    assert [list(row) for row in z] == [[0 if x else 1 for x in t["route"]]]
    assert r["layers"] == run and r["threshold"] == t["threshold"]
    assert "measur" in r["speed_md"] or "time both paths" in r["speed_md"]

    s = dict(zip(["speed_fig", "speed_table", "speed_md"], c.predict(True, api_name="/speed")))
    rows = s["speed_table"]["data"]
    assert [row[0] for row in rows] == ["RoE route", "every layer (dense)"]
    assert rows[0][1] == len(run) and rows[1][1] == L
    bars = traces(s["speed_fig"])
    assert list(bars["latency (s)"]["y"]) == pytest.approx([rows[0][2], rows[1][2]], abs=1e-3)
    assert "the speed of every layer" in s["speed_md"]

    r2 = ask(c, IMAGE, "And how many circles?")
    assert r2["trace"]["turn"] == 2 and len(plain(r2["chat"])) == 4
    route_blocks = notes(r2["chat"])
    assert len(route_blocks) == 2 and f"of {L} layers ran" in route_blocks[1]["metadata"]["title"]
    assert len(traces(r2["usage"])["skip map"]["z"]) == 2           # turns x layers


def test_bad_input_shows_a_message_and_keeps_the_conversation(url, files):
    c = new_client(url)
    first = ask(c, IMAGE, "Is there a circle?")
    assert first["status"] == ""
    cases = [
        (IMAGE, "   ", "question is empty"),
        (None, "Is there a circle?", "no image"),
        (IMAGE, "x" * 700, "takes at most 256 tokens per question"),      # the server's limit, before the model
        (files["not_an_image"], "q?", "not an image"),
        (files["truncated"], "q?", "corrupt or truncated"),
        (files["huge"], "q?", "12000x12000"),
        (files["bomb"], "q?", "decompression bomb"),
    ]
    for image, question, expected in cases:
        r = ask(c, image, question)
        assert expected in r["status"], (expected, r["status"])
        assert "conversation so far is kept" in r["status"]
        assert texts(r["chat"]) == texts(first["chat"]), expected       # the earlier turn is still there
        assert r["question"] == question.strip()                       # and so is what was typed
    # the app keeps serving, the conversation goes on from where it was
    r = ask(c, IMAGE, "Is there a square?")
    assert r["status"] == "" and r["trace"]["turn"] == 2 and texts(r["chat"])[0] == "Is there a circle?"


def test_a_bad_upload_does_not_replace_the_image(url, files):
    c = new_client(url)
    ask(c, IMAGE, "Is there a circle?")
    out = dict(zip(VIEWS + ["image"], c.predict(handle_file(str(files["not_an_image"])), api_name="/set_image")))
    assert "Could not use that image" in out["status"] and len(plain(out["chat"])) == 2
    assert Path(out["image"]).read_bytes() == IMAGE.read_bytes()       # the page shows the old image again
    out = dict(zip(VIEWS + ["image"], c.predict(handle_file(str(OTHER_IMAGE)), api_name="/set_image")))
    assert "New conversation" in out["status"] and out["chat"] == []


def test_a_conversation_that_outgrows_the_context_says_so(url):
    c = new_client(url)
    q = "Describe " + "the scene " * 22            # ~230 characters = tokens for the tiny model (512 max)
    assert ask(c, IMAGE, q)["status"] == ""
    r = ask(c, IMAGE, q)
    r = r if r["status"] else ask(c, IMAGE, q)
    assert "start a new conversation" in r["status"] and r["trace"]["turn"] >= 1
    out = dict(zip(VIEWS, c.predict(api_name="/reset")))
    assert out["chat"] == [] and ask(c, IMAGE, "Short?")["status"] == ""


@pytest.mark.parametrize("name", ["rgba.png", "gray.png", "palette.png", "cmyk.jpg", "gray16.png", "animated.gif"])
def test_every_image_mode_is_answered(url, files, L, name):
    out = json.loads(new_client(url).predict(handle_file(str(files[name])), "What is in the image?", "[]", "auto",
                                             None, api_name="/answer"))
    assert "error" not in out, out
    assert len(out["trace"]["route"]) == L


def test_changing_the_image_starts_a_new_conversation(url, files):
    c = new_client(url)
    ask(c, IMAGE, "one?")
    r = ask(c, files["rgba.png"], "two?")
    assert r["trace"]["turn"] == 1 and texts(r["chat"])[0] == "two?"
    scene = c.predict(api_name="/new_scene")
    out = dict(zip(VIEWS + ["image", "question"], scene))
    assert out["chat"] == [] and out["question"].strip() and "New scene" in out["status"]   # some are imperative
    r = ask(c, out["image"], out["question"])
    assert r["trace"]["turn"] == 1 and texts(r["chat"])[0] == out["question"]


def test_users_each_get_their_own_conversation(url):
    a, b = new_client(url), new_client(url)
    ask(a, IMAGE, "A asks first?")
    jobs = {}

    def go(name, client, image, q):
        jobs[name] = ask(client, image, q)
    threads = [threading.Thread(target=go, args=("a", a, IMAGE, "A asks again?")),
               threading.Thread(target=go, args=("b", b, OTHER_IMAGE, "B asks once?"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert texts(jobs["a"]["chat"])[::2] == ["A asks first?", "A asks again?"]
    assert texts(jobs["b"]["chat"])[::2] == ["B asks once?"]
    assert jobs["a"]["trace"]["turn"] == 2 and jobs["b"]["trace"]["turn"] == 1
    assert len(traces(jobs["a"]["usage"])["skip map"]["z"]) == 2
    assert len(traces(jobs["b"]["usage"])["skip map"]["z"]) == 1


def test_whatif_and_export(url, L):
    c = new_client(url)
    ask(c, IMAGE, "How many?")
    md, table, route, speed = c.predict("layers", [0, 2], 0.5, api_name="/whatif")
    rows = table["data"]
    assert [row[0] for row in rows] == ["router's route (this turn)", "what-if", "every layer (dense)"]
    assert rows[1][1] == 2 and rows[2][1] == L
    lane = {x["name"]: list(x["x"]) for x in figure(route)["data"] if x.get("yaxis") in (None, "y")}
    assert lane["executed"] == [0, 2]
    assert "layers **0, 2** executed by hand" in md
    md, table, _, _ = c.predict("threshold", [], 0.0, api_name="/whatif")
    assert table["data"][1][1] == L                                      # threshold 0: every layer runs

    csv_path, json_path, status = c.predict(api_name="/export")
    import pandas as pd
    df = pd.read_csv(csv_path)
    assert len(df) == 3 * L and set(df.kind) == {"turn", "what-if (layers)", "what-if (threshold)"}
    data = json.loads(Path(json_path).read_text())
    assert len(data["turns"]) == 1 and len(data["what_ifs"]) == 2 and "Exported 1 turn" in status
    assert new_client(url).predict(api_name="/export")[:2] == (None, None)  # nothing yet: a message, no files


def test_stateless_answer_endpoint(url, L):
    c = new_client(url)
    out = json.loads(c.predict(handle_file(str(IMAGE)), "How many blue objects are there?", "[]", "auto", None,
                               api_name="/answer"))
    assert isinstance(out["answer"], str) and len(out["trace"]["route"]) == L and out["num_layers"] == L
    forced = [True, False] * (L // 2)
    out = json.loads(c.predict(handle_file(str(IMAGE)), "And now?", json.dumps([["How many?", "Two."]]),
                               json.dumps(forced), 0.5, api_name="/answer"))
    assert out["trace"]["route"] == forced and out["trace"]["route_mode"] == "forced"
    out = json.loads(c.predict(handle_file(str(IMAGE)), "q", "[]", "dense", None, api_name="/answer"))
    assert out["trace"]["route"] == [True] * L
    for history, route, expected in (("not json", "auto", "history_json is not valid JSON"),
                                     ('[["just a question"]]', "auto", "turn 1 of history_json is not a"),
                                     ('{"q": "a"}', "auto", "should be a list of [question, answer] pairs"),
                                     ("[]", "[1, 0]", f"a JSON list of {L} booleans"),
                                     ("[]", "[1, 0", "got '[1, 0'"), ("[]", '["yes"]', "booleans")):
        out = json.loads(c.predict(handle_file(str(IMAGE)), "q", history, route, None, api_name="/answer"))
        assert expected in out["error"]


def test_a_missing_model_path_exits_with_a_clear_error(entry, capsys):
    assert entry.main(["--model", "/no/such/llava-folder"]) != 0
    assert "does not exist" in capsys.readouterr().err
    assert entry.main(["--model", "tiny", "--roe", "/no/such/roe-folder"]) != 0
    assert "/no/such/roe-folder" in capsys.readouterr().err


def test_the_embedded_model_falls_back_to_tiny_and_says_why(entry, monkeypatch):
    import roe_core.systems as systems
    real_load = systems.load_base

    def load(model="embedded", *a, **kw):
        if model == "embedded":
            raise ImportError("no embedded model in this checkout")
        return real_load(model, *a, **kw)
    monkeypatch.setattr(systems, "load_base", load)
    pipes, notice = entry.load_pipelines(entry.parse_args([]))
    assert set(pipes) == set(systems.SYSTEMS) and pipes["roe"].info["model"] == "tiny"
    assert "embedded model could not be loaded" in notice and "no embedded model in this checkout" in notice


def test_answer_endpoint_takes_a_system(url):
    scene_png = IMAGE
    client = new_client(url)
    for system in ("dense", "roe", "moe_llava", "evomoe"):
        out = json.loads(client.predict(handle_file(str(scene_png)), "What colour is the circle?", "[]", "auto", None,
                                        system, api_name="/answer"))
        assert "error" not in out, out
        assert out["system"] == system and isinstance(out["answer"], str) and out["seconds"] > 0
        if system in ("moe_llava", "evomoe"):     # per MoE layer and token: the experts (2 or 1) and their weights
            t = out["trace"]
            assert t["layers"] == [0, 2, 4] and len(t["experts"]) == 3 and len(t["experts"][0]) == len(t["kinds"])
            assert {len(e) for e in t["experts"][0]} == {2 if system == "moe_llava" else 1}
            assert {"image", "question"} <= set(t["kinds"])
        elif system == "roe":
            assert len(out["trace"]["route"]) == out["num_layers"]
    bad = json.loads(client.predict(handle_file(str(scene_png)), "What colour?", "[]", "auto", None, "gpt-9",
                                    api_name="/answer"))
    assert "unknown system 'gpt-9'" in bad["error"] and "moe_llava" in bad["error"]
    bad = json.loads(client.predict(handle_file(str(scene_png)), "What colour?", "[]", "dense", None, "moe_llava",
                                    api_name="/answer"))
    assert "RoE's options" in bad["error"]


def test_side_by_side_asks_every_system_and_keeps_the_conversation(url):
    scene_png = IMAGE
    client = new_client(url)
    first = ask(client, scene_png, "How many objects are there?")
    md, table, fig, load, paths, evo_load, evo_paths, rigid = client.predict(
        ["dense", "roe", "moe_llava", "evomoe"], "", api_name="/systems")
    assert "How many objects are there?" in md          # empty question: the last one asked
    assert [r[0] for r in table["data"]] == ["Dense", "RoE", "MoE-LLaVA", "EvoMoE"]
    active = {r[0]: r[4] for r in table["data"]}
    # top-2 / top-1 of 4 experts (+ routers: on the tiny model the DTR weighs more than an expert), RoE skips
    assert min(active["MoE-LLaVA"], active["EvoMoE"]) > active["Dense"] >= active["RoE"]
    assert all(r[2] > 0 for r in table["data"])                     # each latency measured
    for f in (load, evo_load):
        assert [b["name"] for b in figure(f)["data"]] == [f"expert {e}" for e in range(4)]
    assert figure(paths)["data"][0]["type"] == figure(evo_paths)["data"][0]["type"] == "heatmap"
    assert [t["name"] for t in figure(rigid)["data"]] == ["MoE-LLaVA", "EvoMoE"]
    # one MoE system ticked: the other's panels say how to see them
    out = client.predict(["roe", "evomoe"], "What colour is the circle?", api_name="/systems")
    assert [r[0] for r in out[1]["data"]] == ["RoE", "EvoMoE"]
    assert "Tick MoE-LLaVA" in json.dumps(figure(out[3]))
    # nothing chosen: a clear message, and the chat is untouched
    md, *_ = client.predict([], "What colour?", api_name="/systems")
    assert "pick at least one system" in md and "kept" in md
    again = ask(client, scene_png, "Is there a circle?")
    assert texts(again["chat"])[:2] == texts(first["chat"])[:2]


def test_binding_beyond_this_machine_warns_without_auth_and_auth_reaches_gradio(entry, capsys, monkeypatch, tmp_path):
    import gradio as gr

    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.append(kw))
    assert entry.main(["--model", "tiny"]) == 0
    assert launched[-1]["server_name"] == "127.0.0.1" and launched[-1]["auth"] is None
    assert "warning: listening" not in capsys.readouterr().err
    assert entry.main(["--model", "tiny", "--host", "0.0.0.0"]) == 0
    assert "reachable from other machines, with no login" in capsys.readouterr().err
    users = tmp_path / "users.txt"
    users.write_text("# who may log in\nalice:secret\nbob:pa:ss\n")
    assert entry.main(["--model", "tiny", "--host", "0.0.0.0", "--auth", f"@{users}"]) == 0
    assert "warning: listening" not in capsys.readouterr().err
    assert launched[-1]["auth"] == [("alice", "secret"), ("bob", "pa:ss")]
    assert entry.main(["--model", "tiny", "--auth", "nocolon"]) == 2
    assert "USER:PASSWORD" in capsys.readouterr().err
    assert entry.is_loopback("::1") and entry.is_loopback("localhost") and not entry.is_loopback("192.168.1.5")


# --- the explorer's analysis views: /atlas, /fidelity, /sweep ---------------------------------------------------

def test_the_atlas_endpoint_counts_add_up(url, L, tmp_path):
    c = new_client(url)
    md, atlas_fig, types_fig, counts_fig, table, csv_file, data = c.predict("scenes", 8, None, api_name="/atlas")
    assert "8 questions" in md
    assert f"**{registry.label('static')}** (the same {L} layers for every input)" in md and "answers as RoE" in md
    entries = data["entries"]
    assert len(entries) == 8 and sorted(data["order"]) == list(range(8))
    assert sum(r["count"] for r in data["route_counts"]) == 8 == len(table["data"])
    assert len(data["route_counts"]) == data["distinct_routes"]
    assert all(len(e["route"]) == L for e in entries)
    assert figure(atlas_fig)["data"] and figure(types_fig)["data"] and figure(counts_fig)["data"]
    assert Path(csv_file).read_text().count("\n") == 9
    # your own set: a LLaVA JSON uploaded with its image
    Image.open(IMAGE).save(tmp_path / "mine.png")
    (tmp_path / "set.json").write_text(json.dumps([{"image": "mine.png", "conversations": [
        {"from": "human", "value": "<image>\nHow many circles?"}, {"from": "gpt", "value": "2"}]}]))
    md, *_, data = c.predict("upload", 8, [handle_file(str(tmp_path / "set.json")), handle_file(str(tmp_path / "mine.png"))],
                             api_name="/atlas")
    assert "1 questions" in md and data["entries"][0]["question"] == "How many circles?"
    md, *_ = c.predict("upload", 8, None, api_name="/atlas")
    assert "upload a LLaVA JSON" in md


def test_fidelity_is_zero_for_layers_that_run(url, L):
    c = new_client(url)
    md, *_ = c.predict(api_name="/fidelity")
    assert "Nothing to measure" in md
    ask(c, IMAGE, "How many blue objects are there?")
    md, fig, table, data = c.predict(api_name="/fidelity")
    assert len(data["route"]) == L and "KL" in md
    for i, ran in enumerate(data["route"]):
        if ran:
            assert data["adapter_l1"][i] == 0.0 and data["adapter_cos"][i] == 1.0
        else:
            assert data["adapter_l1"][i] > 0.0
    assert isinstance(data["answers_agree"], bool) and data["kl_next_token"] >= 0
    assert figure(fig)["data"]


def test_the_sweep_is_monotone_in_layers_executed(url, L):
    c = new_client(url)
    md, fig, table, data = c.predict("0.2, 0.5, 0.8", 4, api_name="/sweep")
    points = data["points"]
    assert points[0]["threshold"] is None and points[0]["mean_layers_executed"] == L
    routed = [p for p in points[1:] if p["fixed_k"] is None]
    fixed = [p for p in points[1:] if p["fixed_k"] is not None]        # the static order: last layer first
    assert fixed and all(p["mean_layers_executed"] == L - p["fixed_k"] for p in fixed)
    assert "Fixed paths" in md and len(table["data"]) == len(points)
    assert [p["threshold"] for p in routed] == sorted(p["threshold"] for p in routed)
    layers = [p["mean_layers_executed"] for p in routed]
    assert all(a >= b for a, b in zip(layers, layers[1:]))
    assert sum(p["calibrated"] for p in routed) == 1 and figure(fig)["data"]
    md, *_ = c.predict("0.2, lots", 4, api_name="/sweep")
    assert "thresholds should be numbers" in md


def test_batch_composition_counts_and_times_three_ways(url, L):
    c = new_client(url)
    md, fig, table, data = c.predict([0, 1, 2], api_name="/batching")
    assert len(data["questions"]) == 3 and len(data["union"]) == L
    assert data["union"] == [any(r[i] for r in data["routes"]) for i in range(L)]
    runs = data["layer_runs"]
    assert runs["per_example"] <= runs["union"] <= runs["dense"] == 3 * L
    assert all(v > 0 for v in data["seconds"].values()) and figure(fig)["data"]
    md, *_ = c.predict([0], api_name="/batching")
    assert "at least two" in md


def test_undo_and_retry_the_last_turn(url):
    c = new_client(url)
    first = ask(c, IMAGE, "Is there a circle?")
    second = ask(c, IMAGE, "How many?")
    assert len(plain(second["chat"])) == 4
    out = dict(zip(VIEWS + ["question"], c.predict(api_name="/retry")))
    assert texts(out["chat"]) == texts(second["chat"]) and out["trace"]["turn"] == 2   # replaced, same greedy answer
    out = dict(zip(VIEWS + ["question"], c.predict(api_name="/undo")))
    assert texts(out["chat"]) == texts(first["chat"]) and out["question"] == "How many?"
    assert "Took back" in out["status"] and out["trace"]["turn"] == 1
    c.predict(api_name="/undo")
    out = dict(zip(VIEWS + ["question"], c.predict(api_name="/undo")))
    assert "Nothing to undo" in out["status"] and out["chat"] == []
    out = dict(zip(VIEWS + ["question"], c.predict(api_name="/retry")))
    assert "Nothing to retry" in out["status"]


def test_an_edited_image_is_answered_beside_the_original(url, L, tmp_path):
    c = new_client(url)
    edited = tmp_path / "cropped.png"
    Image.open(IMAGE).convert("RGB").crop((0, 0, 128, 128)).save(edited)
    value = {"background": handle_file(str(edited)), "layers": [], "composite": handle_file(str(edited))}
    md, *_ = c.predict(value, api_name="/edit")
    assert "ask a question about the image first" in md
    first = ask(c, IMAGE, "How many circles are there?")
    md, fig, table, data = c.predict(value, api_name="/edit")
    assert data["original"]["answer"] == texts(first["chat"])[1] and len(data["edited"]["route"]) == L
    assert data["changed_layers"] == [i for i in range(L) if data["original"]["route"][i] != data["edited"]["route"][i]]
    assert f"of {L} layer decisions" in md
    rows = table["data"]
    assert rows[0][0] == "original" and rows[0][2] == texts(first["chat"])[1] and rows[1][0] == "edited"
    lanes = figure(fig)["data"][0]["z"]
    assert len(lanes) == 2 and len(lanes[0]) == L
