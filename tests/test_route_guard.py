"""The route guard (systems.route_guard) on the tiny model: off, it changes nothing; with tau 0 every
layer runs (the dense answers); in between a batch routes as its examples do alone; it saves and loads
with the RoE parts."""
import pytest
import torch

from conftest import QUESTIONS
from roe_core.systems.roe import RoEModel, layout_batch
from roe_core.systems.route_guard import RouteGuard

pytestmark = pytest.mark.usefixtures("one_thread")


def items(images):
    return [(images[k % 4], QUESTIONS[k % 3], ()) for k in range(6)]


@pytest.fixture
def pipe(tiny_roe):
    tiny_roe.model.guard = None
    yield tiny_roe
    tiny_roe.model.guard = None


@pytest.fixture
def guard(pipe, images):
    model = pipe.model
    return RouteGuard.fit(model, [layout_batch(model, pipe.batch(items(images)[:3])),
                                  layout_batch(model, pipe.batch(items(images)[3:]))])


def answers(pipe, its, **kw):
    return [(a.text, a.trace.route) for a in pipe.answer_batch(its, max_new_tokens=4, **kw)]


def test_the_fit_sees_every_routers_input(pipe, guard):
    L, d = pipe.num_layers, pipe.model.config.hidden_size
    assert guard.mean.shape == guard.var.shape == (L, 2 * d)
    assert guard.train_dist.shape == (6, L) and (guard.train_dist >= 0).all()
    # over the fit's own inputs each varying feature's squared z-score averages exactly 1 (features that
    # never vary, e.g. the image routing token before any layer, contribute 0)
    assert 0.0 < guard.train_dist.mean().item() <= 1.0 + 1e-4
    assert pipe.model.guard is None and pipe.model.guard_recorder is None       # fitting left no trace


def test_off_it_changes_nothing_and_at_zero_every_layer_runs(pipe, guard, images):
    its = items(images)
    plain = answers(pipe, its, threshold=0.9)
    assert any(not all(r) for _, r in plain)                                   # the routers skip something
    guard.tau = None
    pipe.model.guard = guard
    assert answers(pipe, its, threshold=0.9) == plain
    guard.tau = 0.0
    dense = answers(pipe, its, route="dense")
    assert [(t, r) for t, r in answers(pipe, its, threshold=0.9)] == dense


def test_a_batch_routes_as_its_examples_alone(pipe, guard, images):
    guard.tau = guard.quantile_tau(0.5)
    pipe.model.guard = guard
    its = items(images)
    together = answers(pipe, its, threshold=0.7)
    alone = [answers(pipe, [it], threshold=0.7)[0] for it in its]
    assert [r for _, r in together] == [r for _, r in alone]
    plain = (pipe.model.guard, None)
    pipe.model.guard = None
    unguarded = answers(pipe, its, threshold=0.7)
    pipe.model.guard = plain[0]
    # the guard only adds layers
    assert all(all(g or not u for g, u in zip(rg, ru)) for (_, rg), (_, ru) in zip(together, unguarded))


def test_it_saves_and_loads_with_the_parts(pipe, guard, images, tmp_path):
    guard.tau = guard.quantile_tau(0.9)
    pipe.model.guard = guard
    pipe.model.save_roe(tmp_path)
    back = RoEModel.from_roe_folder(pipe.model.base, tmp_path)
    assert back.guard is not None and back.guard.tau == pytest.approx(guard.tau)
    torch.testing.assert_close(back.guard.mean, guard.mean)
    pipe.model.guard = None
    pipe.model.save_roe(tmp_path / "none")
    assert RoEModel.from_roe_folder(pipe.model.base, tmp_path / "none").guard is None
    with pytest.raises(ValueError, match="q must be"):
        guard.quantile_tau(1.0)


def test_the_trace_names_the_layers_the_guard_ran(pipe, guard, images):
    its = items(images)
    plain = pipe.answer_batch(its, max_new_tokens=2, threshold=0.9)
    assert all(a.trace.guarded == [] for a in plain)
    guard.tau = 0.0
    pipe.model.guard = guard
    guarded = pipe.answer_batch(its, max_new_tokens=2, threshold=0.9)
    for a, b in zip(guarded, plain):
        assert a.trace.guarded == [i for i, r in enumerate(b.trace.route) if not r]    # every skip overruled
        assert a.trace.to_dict()["guarded"] == a.trace.guarded
    assert pipe.answer_batch(its[:1], max_new_tokens=2, route="dense")[0].trace.guarded == []
