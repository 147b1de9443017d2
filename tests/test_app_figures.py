"""The app's figures carry the data of the traces they draw (read back through fig.to_dict()), and the
conversation's export has one row per turn x layer."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from app import figures as F
from app.session import CSV_COLUMNS, Conversation, Turn, WhatIf, spans
from roe_core import Answer, RouteTrace, SpeedComparison
from roe_core.runtime.generation import Timing

L = 8


def make_trace(route, seed: float = 0.0) -> RouteTrace:
    n = len(route)
    return RouteTrace(
        route=list(route), p_run=[round(0.1 + 0.8 * ((i * 7 + seed * 10) % n) / n, 3) for i in range(n)],
        route_mode="auto", threshold=0.5,
        l1=[0.1 * (i + 1) + seed for i in range(n)], l1_dense=[0.12 * (i + 1) for i in range(n)],
        timing=Timing(0.01, 0.09, 10), new_tokens=10)


ROUTE = [True, False, True, True, False, True, False, True]


@pytest.fixture
def trace() -> RouteTrace:
    return make_trace(ROUTE)


@pytest.fixture
def comparison(trace) -> SpeedComparison:
    dense = make_trace([True] * L)
    return SpeedComparison(Answer("two", trace, "q"), Answer("three", dense, "q"), roe_s=0.2, dense_s=0.3,
                           repeats=3, roe_times=[0.2, 0.21, 0.19], dense_times=[0.3, 0.31, 0.29])


def by_name(fig) -> dict:
    return {t.get("name"): t for t in fig.to_dict()["data"]}


def test_layer_l1_has_both_paths_and_marks_the_route(trace):
    t = by_name(F.plot_layer_l1(trace))
    assert list(t["every layer run (dense)"]["y"]) == trace.l1_dense
    assert list(t["path taken"]["y"]) == trace.l1
    run, skip = t["executed"], t["skipped (adapter)"]
    assert list(run["x"]) == [i for i, r in enumerate(ROUTE) if r]
    assert list(skip["x"]) == [i for i, r in enumerate(ROUTE) if not r]
    assert list(skip["y"]) == [trace.l1[i] for i in skip["x"]]
    assert run["marker"]["color"] != skip["marker"]["color"]
    assert run["marker"]["symbol"] != skip["marker"]["symbol"]
    assert list(run["customdata"]) == [trace.p_run[i] for i in run["x"]]
    assert "p_run" in run["hovertemplate"] and "p_run" in skip["hovertemplate"]


def test_layer_l1_without_l1_traces_still_draws():
    t = make_trace(ROUTE)
    t.l1 = t.l1_dense = None
    assert F.plot_layer_l1(t).to_dict()["data"] == []


def test_route_lane_splits_executed_and_skipped_with_p_run_on_hover(trace):
    fig = F.plot_route(trace)
    lane = [t for t in fig.to_dict()["data"] if t.get("yaxis") in (None, "y")]
    bars = [t for t in fig.to_dict()["data"] if t.get("yaxis") == "y2"]
    xs = sorted(x for t in lane for x in t["x"])
    assert xs == list(range(L))                                  # one square per layer
    run = next(t for t in lane if t["name"] == "executed")
    skip = next(t for t in lane if t["name"] == "skipped (adapter)")
    assert list(run["x"]) == [i for i, r in enumerate(ROUTE) if r]
    assert list(skip["x"]) == trace.adapters_used
    for t in lane + bars:
        assert "p_run" in t["hovertemplate"]
        assert list(t["customdata"]) == [trace.p_run[i] for i in t["x"]]
    assert sorted((x, y) for t in bars for x, y in zip(t["x"], t["y"])) == list(enumerate(trace.p_run))
    assert fig.layout.title.text.startswith(f"Expert path · {trace.layers_executed} of {L} layers executed")
    assert F.plot_route(trace, label="What-if path").layout.title.text.startswith("What-if path ·")
    assert any(s["type"] == "line" and s["y0"] == trace.threshold for s in fig.to_dict()["layout"]["shapes"])


def test_adapter_usage_heatmap_is_turns_by_layers_with_skip_rate(trace):
    traces = [trace, make_trace([True] * L), make_trace([False] * L)]
    fig = F.plot_adapter_usage(traces)
    t = by_name(fig)
    z = t["skip map"]["z"]
    assert len(z) == 3 and all(len(row) == L for row in z)
    assert [list(row) for row in z] == [[0 if r else 1 for r in x.route] for x in traces]
    rate = list(t["skip rate"]["y"])
    assert rate == pytest.approx([sum(1 - x.route[i] for x in traces) / 3 for i in range(L)])
    assert "this turn: 0, 1, 2, 3, 4, 5, 6, 7" in fig.layout.title.text   # the last turn ran no layer
    assert "this turn: none" in F.plot_adapter_usage(traces[:2]).layout.title.text


def test_speed_figure_values(comparison):
    fig = F.plot_speed(comparison)
    t = by_name(fig)
    assert list(t["latency (s)"]["y"]) == [0.2, 0.3]
    assert list(t["tokens/s"]["y"]) == pytest.approx([10 / 0.2, 10 / 0.3])
    assert list(t["latency (s)"]["customdata"]) == [comparison.roe.trace.layers_executed, L]
    assert fig.layout.title.text == "Speed · RoE route vs every layer: 1.50×"
    assert list(by_name(F.plot_speed(comparison, label="what-if"))["latency (s)"]["x"]) == ["what-if", "dense"]


def test_empty_figure_says_what_comes():
    fig = F.empty_figure("Ask a question")
    assert fig.to_dict()["layout"]["annotations"][0]["text"] == "Ask a question"


def test_export_has_a_row_per_turn_and_layer(tmp_path, trace, comparison):
    conv = Conversation(image_key="abc", image_name="x.png")
    conv = conv.with_turn(Turn("q1", "a1", trace)).with_speed(comparison)
    conv = conv.with_turn(Turn("q2", "a2", make_trace([True] * L)))
    conv = conv.with_whatif(WhatIf(1, "layers", comparison))
    csv_path, json_path = conv.export(tmp_path)
    df = pd.read_csv(csv_path)
    assert list(df.columns) == CSV_COLUMNS
    assert len(df) == 3 * L
    turn1 = df[(df.kind == "turn") & (df.turn == 1)]
    assert list(turn1.layer) == list(range(L)) and list(turn1.executed) == ROUTE
    assert turn1.speedup.iloc[0] == pytest.approx(1.5)
    assert df[df.kind == "turn"].turn.nunique() == 2 and (df.kind == "what-if (layers)").sum() == L
    data = json.loads(json_path.read_text())
    assert [t["question"] for t in data["turns"]] == ["q1", "q2"]
    assert data["turns"][0]["trace"]["route"] == ROUTE and data["turns"][0]["speed"]["speedup"] == pytest.approx(1.5)
    assert data["turns"][1]["speed"] is None and len(data["what_ifs"]) == 1


def test_conversation_is_a_value(trace):
    conv = Conversation()
    conv2 = conv.with_turn(Turn("q", "a", trace))
    assert conv.turns == [] and len(conv2.turns) == 1
    assert conv2.history() == [("q", "a")] and conv2.history(-1) == []
    messages = conv2.chat_messages(pending=("q2", ""))
    note = messages.pop(2)                              # the answer's route, a collapsed block
    assert messages == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "…"}]
    ran = [i for i, r in enumerate(trace.route) if r]
    assert note["role"] == "assistant" and note["metadata"]["title"].startswith(f"Route · {len(ran)} of {len(trace.route)}")
    assert f"**Skipped, adapter stood in:** {spans(trace.adapters_used)}" in note["content"]
    assert spans([0, 1, 2, 5, 7, 8]) == "0–2, 5, 7–8" and spans([]) == "none"
    undone = conv2.without_last_turn()
    assert undone.turns == [] and conv2.turns and undone.chat_messages() == []
    assert conv2.cleared().turns == []


def test_the_header_never_shows_a_server_path():
    from app.texts import header_markdown, public_name, without_paths

    info = {"model": "/home/someone/models/llava-1.5-7b", "parts": "/srv/runs/roe-llava", "parts_path": "/srv/runs/x",
            "num_layers": 32, "device": "cuda:0", "dtype": "bfloat16", "trained_on": "LLaVA-665k"}
    text = header_markdown(info)
    assert "/home" not in text and "/srv" not in text
    assert "llava-1.5-7b/" in text and "roe-llava/" in text and "32 decoder layers" in text
    assert without_paths("OSError: no file '/work/main/assets/embedded/roe/x.bin' (see https://a.b/c)") == \
        "OSError: no file 'x.bin' (see https://a.b/c)"
    assert public_name("shipped (roe/)") == "shipped (roe/)" and public_name("llava-hf/llava-1.5-7b-hf") == \
        "llava-hf/llava-1.5-7b-hf"


def test_turn_views_name_every_output_of_a_turn(trace):
    from app.views import TURN_VIEWS, turn_views

    empty = turn_views(Conversation(), L)
    assert set(empty) == set(TURN_VIEWS) - {"threshold"}          # no turn: the what-if threshold is left alone
    views = turn_views(Conversation().with_turn(Turn("q", "a", trace)), L)
    assert set(views) == set(TURN_VIEWS)
    assert views["layers"] == [i for i, r in enumerate(ROUTE) if r] and views["threshold"] == trace.threshold
    assert views["trace"]["turn"] == 1 and views["speed_md"].startswith("_Speed")
