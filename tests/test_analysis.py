"""roe_core.analysis on the tiny model: the atlas's counts add up and its routes are the ones each
question gets alone; the sweep's points are monotone in layers executed; adapter fidelity is zero for
layers that run, is the adapter's real error for those skipped, and its routed run is the routed path."""
import json

import pytest
import torch

from conftest import QUESTIONS
from roe_core.analysis import adapter_fidelity, build_atlas, hamming_order, sweep_fixed, sweep_thresholds
from roe_core.runtime.conversation import InputError
from roe_core.scenes.questions import Question, load_llava_questions
from roe_core.systems.roe import all_logits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pipe(tiny_roe):
    return tiny_roe


def question_set(images, n=9):
    types = ["count", "colour", "spatial"]
    return [Question(images[k % 4], QUESTIONS[k % 3], [], "two" if k % 2 else None, types[k % 3]) for k in range(n)]


def test_hamming_order_groups_identical_routes_and_walks_to_the_nearest():
    routes = [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]
    order = hamming_order(routes)
    assert sorted(order) == list(range(len(routes)))
    assert order[:3] == [0, 3, 5]                          # the most common route first, together
    assert order[3] == 2                                   # then the nearest (1 layer away)
    assert hamming_order([]) == []


@pytest.fixture
def qs(images):
    return question_set(images)


def test_the_atlas_counts_add_up_and_its_routes_are_each_questions_own(routed, qs):
    seen = []
    atlas = build_atlas(routed, qs, batch_size=4, max_new_tokens=4, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(4, 9), (8, 9), (9, 9)]
    assert len(atlas.entries) == 9 and sorted(atlas.order) == list(range(9))
    counts = atlas.route_counts()
    assert sum(n for _, n in counts) == 9 and len(counts) == atlas.distinct_routes > 1
    L = atlas.num_layers
    for qtype, rates in atlas.skip_rate_by_type().items():
        mine = [e for e in atlas.entries if e.qtype == qtype]
        assert rates == [sum(not e.route[i] for e in mine) / len(mine) for i in range(L)]
    for e, q in zip(atlas.entries, qs):                    # batched routes = each question's own
        alone = routed.answer(q.image, q.question, max_new_tokens=4, trace_l1=False, dense_l1=False)
        assert e.route == alone.trace.route and e.answer == alone.text
        assert e.correct is (None if q.gold is None else (e.answer.strip().lower() == "two"))
    d = json.loads(json.dumps(atlas.to_dict()))
    assert d["distinct_routes"] == atlas.distinct_routes and len(atlas.rows()) == 9
    with pytest.raises(ValueError, match="empty"):
        build_atlas(routed, [])


def test_the_sweep_is_monotone_in_layers_executed(routed, qs):
    done = []
    points = sweep_thresholds(routed, qs, [0.7, 0.3, 0.5, routed.threshold], batch_size=4, max_new_tokens=4,
                              progress=lambda d, t: done.append(d))
    assert done == list(range(1, len(points) + 1))
    dense, *rest = points
    L = routed.model.num_layers
    assert dense.threshold is None and dense.mean_layers_executed == L and dense.speedup == 1.0
    assert dense.agreement_with_dense == 1.0 and dense.accuracy is None        # some questions have no reference
    thresholds = [p.threshold for p in rest]
    assert thresholds == sorted(thresholds)
    layers = [p.mean_layers_executed for p in rest]
    assert all(a >= b for a, b in zip(layers, layers[1:]))                     # a higher threshold runs fewer
    assert sum(p.calibrated for p in rest) == 1
    assert all(p.seconds > 0 and p.examples_per_s > 0 for p in points)
    with pytest.raises(ValueError, match="between 0 and 1"):
        sweep_thresholds(routed, qs, [1.5])


def test_the_fixed_sweep_skips_the_first_k_of_its_order_for_every_question(routed, qs):
    L = routed.model.num_layers
    order = list(reversed(range(L)))
    points = sweep_fixed(routed, qs, order, [2, 0, 1], batch_size=4, max_new_tokens=4)
    dense, *rest = points
    assert dense.fixed_k is None and dense.mean_layers_executed == L and dense.agreement_with_dense == 1.0
    assert [p.fixed_k for p in rest] == [0, 1, 2]
    assert [p.mean_layers_executed for p in rest] == [L, L - 1, L - 2]
    assert rest[0].agreement_with_dense == 1.0                                  # k = 0 is the dense path
    # k = 2 is the forced route skipping the last two layers, for each question alike
    forced = routed.answer_batch([(q.image, q.question, q.history) for q in qs], max_new_tokens=4,
                                 route=[i < L - 2 for i in range(L)])
    texts_alone = [a.text for a in forced]
    assert all(a.trace.route == [i < L - 2 for i in range(L)] for a in forced)
    again = sweep_fixed(routed, qs, order, [2], batch_size=4, max_new_tokens=4)[1]
    dense_texts = [a.text for a in routed.answer_batch([(q.image, q.question, q.history) for q in qs],
                                                       max_new_tokens=4, route="dense")]
    assert again.agreement_with_dense == sum(a == b for a, b in zip(texts_alone, dense_texts)) / len(qs)
    with pytest.raises(ValueError, match="each of the"):
        sweep_fixed(routed, qs, [0] * L, [1])
    with pytest.raises(ValueError, match="each k"):
        sweep_fixed(routed, qs, order, [L])


def test_adapter_fidelity(routed, images):
    L = routed.model.num_layers
    dense = adapter_fidelity(routed, images[0], QUESTIONS[0], route="dense")
    assert dense.route == [True] * L and dense.adapter_l1 == [0.0] * L and dense.adapter_cos == [1.0] * L
    assert max(dense.twin_l1) == 0.0 and dense.kl_next_token < 1e-6 and dense.top1_agree
    route = [True, False, True, False, False, True]
    f = adapter_fidelity(routed, images[0], QUESTIONS[0], route=route)
    assert f.route == route
    for i, run in enumerate(route):
        if run:
            assert f.adapter_l1[i] == 0.0                                      # the layer itself ran
        else:
            assert f.adapter_l1[i] > 0.0 and f.adapter_cos[i] < 1.0
    assert f.twin_l1[0] == 0.0 and f.twin_l1[1] > 0.0                          # the twins part at the first skip
    assert f.kl_next_token > 0.0
    # the routed run is the route's own path: its next token is the one all_logits gives
    b = routed.batch([(images[0], QUESTIONS[0], ())])
    logits = all_logits(routed.model, b, route)[0, -1]
    assert f.top1_agree == bool(logits.argmax() == all_logits(routed.model, b, "dense")[0, -1].argmax())
    auto = adapter_fidelity(routed, images[0], QUESTIONS[0])
    assert auto.route == routed.answer(images[0], QUESTIONS[0], max_new_tokens=2).trace.route


def test_llava_question_files(tmp_path, images):
    images[0].save(tmp_path / "a.png")
    data = [{"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "Two."},
        {"from": "human", "value": "And now?"}]}]
    (tmp_path / "set.json").write_text(json.dumps(data))
    qs = load_llava_questions(tmp_path)                      # the folder holding it
    assert [q.question for q in qs] == ["What colour?", "How many?", "And now?"]
    assert [q.gold for q in qs] == ["Red.", "Two.", None]
    assert qs[2].history == [("What colour?", "Red."), ("How many?", "Two.")]
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "missing.png", "conversations": []}]))
    with pytest.raises(InputError, match="one LLaVA JSON"):
        load_llava_questions(tmp_path)
    with pytest.raises(InputError, match="not found"):
        load_llava_questions(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not JSON"):
        load_llava_questions(tmp_path / "bad.json")


def test_batch_composition_compares_per_example_routing_with_the_union_rule(routed, images):
    from roe_core.analysis import compare_batching

    items = [(images[k], q, ()) for k, q in enumerate(QUESTIONS)]
    c = compare_batching(routed, items, repeats=1, max_new_tokens=4)
    assert len({tuple(r) for r in c.routes}) > 1                              # mixed routes
    assert c.union == [any(r[i] for r in c.routes) for i in range(len(c.union))]
    alone = [routed.answer(*it, max_new_tokens=4) for it in items]
    assert c.answers["per_example"] == [a.text for a in alone]
    assert c.answers["union"] == [routed.answer(*it, route=c.union, max_new_tokens=4).text for it in items]
    assert c.layer_runs["per_example"] < c.layer_runs["union"] <= c.layer_runs["dense"]
    assert all(len(v) == 1 and v[0] > 0 for v in c.times.values())
    assert c.speedup_vs_dense > 0 and c.speedup_vs_union > 0
    with pytest.raises(ValueError, match="at least two"):
        compare_batching(routed, items[:1])
