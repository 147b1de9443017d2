"""The one interface every routing system answers through (roe_core/systems): dense, RoE, MoE-LLaVA
(and any other system in SYSTEMS) over one shared tiny base answer the same call with the same kinds
of results; the dense system is the unmodified transformers model; a batch equals its examples alone;
fresh MoE parts equal the dense model (upcycling is exact); bad input gives clear errors; streaming
ends on the answer."""
import json

import pytest
import torch
from torch.testing import assert_close

from conftest import QUESTIONS, Tiny
from roe_core.runtime.conversation import InputError
from roe_core.runtime.generation import Timing
from roe_core.runtime.loading import ModelLoadError
from roe_core.systems import (SYSTEMS, Answer, ParamCounts, Trace, load_base, load_system, load_systems,
                               pipeline_class, registry, shipped_systems)
from roe_core.systems.dense import DensePipeline

pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 8
TRACE_TYPES = {"dense": "DenseTrace", "roe": "RouteTrace", "moe_llava": "ExpertTrace", "evomoe": "ExpertTrace"}
MOE_SYSTEMS = registry.moe_systems()   # systems of upcycled FFN experts


@pytest.fixture(scope="module")
def loaded():
    """One tiny random base (fp32, CPU) shared by every pipeline of this module; no test edits it."""
    return load_base("tiny", device="cpu")


@pytest.fixture(scope="module")
def pipes(loaded):
    """Every system over the shared base, each with fresh (untrained) parts."""
    return load_systems(SYSTEMS, loaded=loaded, fresh=True)


def items_of(images, histories=None):
    histories = histories or [()] * len(QUESTIONS)
    return [(images[k], q, h) for k, (q, h) in enumerate(zip(QUESTIONS, histories))]


def fresh(loaded, system):
    """A pipeline of its own over the shared base (its parts may be edited without touching `pipes`)."""
    return load_systems([system], loaded=loaded, fresh=True)[system]


# --- one call, the same kinds of results ----------------------------------------------------------------------

def test_every_system_answers_through_the_same_call(images):
    pipes = load_systems(SYSTEMS, model="tiny", fresh=True)
    assert list(pipes) == list(SYSTEMS) and {"dense", "roe", "moe_llava"} <= set(SYSTEMS)
    assert len({id(p.model.base) for p in pipes.values()}) == 1                 # one base, wrapped by each
    counts = {}
    for name, pipe in pipes.items():
        assert type(pipe) is pipeline_class(name) and pipe.system == name == pipe.info["system"]
        ans = pipe.answer(images[0], QUESTIONS[0], max_new_tokens=N_NEW)          # the same call for all
        assert isinstance(ans, Answer)
        assert isinstance(ans.text, str) and ans.text
        assert ans.system == name and ans.question == QUESTIONS[0]
        assert isinstance(ans.timing, Timing) and ans.timing.total_s > 0
        assert 1 <= ans.timing.new_tokens <= N_NEW
        assert type(ans.trace).__name__ == TRACE_TYPES.get(name, type(ans.trace).__name__)
        assert isinstance(ans.trace, Trace)                                        # the one protocol
        assert ans.trace.num_layers == pipe.num_layers == 6
        assert 1 <= ans.trace.layers_executed <= ans.trace.num_layers
        assert ans.trace.active_params == pipe.parameter_counts(ans.trace.layers_executed).active > 0
        assert isinstance(ans.trace.summary(), str) and f"of {ans.trace.num_layers}" in ans.trace.summary() \
            or f"all {ans.trace.num_layers}" in ans.trace.summary()
        assert set(ans.trace.views) <= {"route", "experts"} and ans.trace.views == pipe.spec.trace_views
        d = ans.trace.to_dict()
        json.dumps(d)                                                              # the trace is JSON-ready
        assert d["layers_executed"] == ans.trace.layers_executed and d["num_layers"] == ans.trace.num_layers
        assert ans.trace.new_tokens == d["new_tokens"] == ans.timing.new_tokens
        assert "timing" in d
        c = counts[name] = pipe.parameter_counts()
        assert isinstance(c, ParamCounts)
        assert c.total >= c.active > 0
        assert c.vision > 0 and c.projector > 0
        assert c.to_dict()["total"] == c.total
    dense, roe, moe = counts["dense"], counts["roe"], counts["moe_llava"]
    assert dense.total == dense.active == sum(p.numel() for p in pipes["dense"].model.base.parameters())
    assert roe.total > dense.total                                               # + routers, routing tokens, adapters
    for name in MOE_SYSTEMS:   # E experts per MoE layer, top-k of them (and the router) active per token
        c = counts[name]
        assert c.total > dense.total and c.active > dense.active and c.total > c.active
    # MoE-LLaVA: 4 experts per MoE layer (0, 2, 4), top-2
    ffn, router = 3 * 32 * 64, 4 * 32                                            # one SwiGLU FFN, one router
    assert moe.total - dense.total == 3 * (3 * ffn + router)
    assert moe.active - dense.active == 3 * (1 * ffn + router)


# --- the registry is the only list of systems ----------------------------------------------------------------

class ProbePipeline(DensePipeline):
    """A fifth system that is nothing but a registry entry and this class: proof that one entry suffices."""
    system = "probe"


def test_a_registry_entry_is_all_a_new_system_needs(loaded, images):
    spec = registry.SystemSpec("probe", "Probe", f"{__name__}:ProbePipeline", summary="a test system")
    registry.register(spec)
    try:
        assert "probe" in SYSTEMS and registry.get("probe") is spec and "probe" in registry.names()
        assert "probe" in shipped_systems("tiny") and "probe" in shipped_systems("embedded")   # no parts needed
        pipe = load_systems(["dense", "probe"], loaded=loaded)["probe"]
        assert pipe.label == "Probe" and pipe.spec is spec
        assert pipe.answer(images[0], QUESTIONS[0], max_new_tokens=N_NEW).text == \
            load_systems(["dense"], loaded=loaded)["dense"].answer(images[0], QUESTIONS[0], max_new_tokens=N_NEW).text
        with pytest.raises(ValueError, match="already registered"):
            registry.register(registry.SystemSpec("probe", "Other", f"{__name__}:ProbePipeline"))
    finally:
        registry.SYSTEMS.pop("probe", None)
    for name, s in SYSTEMS.items():               # every entry resolves to its own class and config
        assert s.pipeline_class().system == name
        assert (s.config_class() is None) == (s.parts_folder is None) == (s.trainer is None)
        assert s.moe == ("experts" in s.trace_views)


# --- the dense system is the unmodified model ------------------------------------------------------------------

def test_dense_system_computes_what_the_unmodified_model_does(pipes, images):
    dense, roe = pipes["dense"], pipes["roe"]
    base = dense.model.base
    items = items_of(images)
    b = dense.batch(items)
    assert len(set(b.token_ok.sum(-1).tolist())) == 3                            # really left padded
    with torch.no_grad():
        logits, _ = dense.model.prefill(b)
        # the model's own forward on the same batch: no position ids, no cache, every position's logits
        ref = base(input_ids=b.input_ids, attention_mask=b.token_ok.long(), pixel_values=b.pixel_values).logits
    assert_close(logits, ref[:, -1])

    tokens, traces, timing = dense.generate(b, N_NEW)
    assert [t.new_tokens for t in traces] == [len(t) for t in tokens]
    assert timing.new_tokens == max(len(t) for t in tokens)
    # reference greedy decoding without a cache: the whole sequence through the model's forward each step
    ids, ok, greedy = b.input_ids, b.token_ok, []
    with torch.no_grad():
        for _ in range(N_NEW):
            nxt = base(input_ids=ids, attention_mask=ok.long(), pixel_values=b.pixel_values).logits[:, -1].argmax(-1)
            greedy.append(nxt)
            ids, ok = torch.cat([ids, nxt[:, None]], 1), torch.cat([ok, ok[:, -1:]], 1)
    greedy = torch.stack(greedy, 1).tolist()
    stops = dense.encoder.stop_ids
    for k, t in enumerate(tokens):
        assert t == greedy[k][:len(t)]
        assert len(t) == N_NEW or greedy[k][len(t)] in stops                      # stopped at a stop token only
    assert sum(len(t) for t in tokens) > 2 * N_NEW                               # not a trivially short answer

    # RoE's dense route over the same base computes the same function
    roe_tokens, roe_traces, _ = roe.generate(b, N_NEW, route="dense")
    assert roe_tokens == tokens
    assert all(all(tr.route) for tr in roe_traces)
    assert [a.text for a in roe.answer_batch(items, route="dense", max_new_tokens=N_NEW)] == \
        [a.text for a in dense.answer_batch(items, max_new_tokens=N_NEW)]


# --- batches ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def differentiate(loaded, system, images, diversify_routers):
    """A fresh pipeline whose answers depend on what the system decides per example: RoE routers that
    send the examples different ways, MoE experts that differ from one another and random routers."""
    pipe = fresh(loaded, system)
    if system == "roe":
        diversify_routers(Tiny(pipe.model, pipe.encoder), pipe.batch(items_of(images)))
    elif system in MOE_SYSTEMS:
        g = torch.Generator().manual_seed(1)
        for ffn in pipe.model.moe.values():
            for p in ffn.router.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            for e in ffn.experts:
                for p in e.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    elif system == "static":     # fresh: no layer skipped (the dense model); skip two, adapters random
        from roe_core.systems.static import StaticModel
        g = torch.Generator().manual_seed(1)
        pipe.model = StaticModel(loaded.base, skipped=[1, 4])
        for p in pipe.model.adapter_parameters():
            p.data.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pipe


@pytest.mark.parametrize("system", SYSTEMS)
def test_a_batch_equals_its_examples_one_by_one(loaded, pipes, images, diversify_routers, system):
    pipe = differentiate(loaded, system, images, diversify_routers)
    items = items_of(images, [(), [("Is it big?", "Yes.")], ()])                 # one with an earlier turn
    together = pipe.answer_batch(items, max_new_tokens=N_NEW)
    alone = [pipe.answer(*it, max_new_tokens=N_NEW) for it in items]
    assert [a.text for a in together] == [a.text for a in alone]
    assert [a.question for a in together] == QUESTIONS
    assert [a.trace.new_tokens for a in together] == [a.trace.new_tokens for a in alone]
    if system == "roe":
        routes = [a.trace.route for a in together]
        assert len({tuple(r) for r in routes}) > 1                                # the examples took different routes
        assert routes == [a.trace.route for a in alone]
    if system in MOE_SYSTEMS:
        for t, a in zip(together, alone):
            assert torch.equal(t.trace.experts, a.trace.experts) and torch.equal(t.trace.token_ids, a.trace.token_ids)
    if system != "dense":   # the system's own decisions matter here: its answers are not the dense model's
        assert [a.text for a in together] != [a.text for a in pipes["dense"].answer_batch(items, max_new_tokens=N_NEW)]


@pytest.mark.parametrize("system", MOE_SYSTEMS)
def test_fresh_moe_parts_answer_like_the_dense_model(pipes, images, system):
    """Upcycling is exact: every expert is a copy of its layer's FFN and a token's expert weights sum
    to 1 (MoE-LLaVA's top-2), so whatever the fresh routers choose, the MoE computes the dense function."""
    dense, moe = pipes["dense"], pipes[system]
    assert "untrained" in moe.info["parts"]
    items = items_of(images)
    b = dense.batch(items)
    with torch.no_grad():
        want, _ = dense.model.prefill(b)
        got = moe.model(b.input_ids, b.token_ok, b.pixel_values).logits[:, -1]
    assert_close(got, want)
    assert moe.generate(b, N_NEW)[0] == dense.generate(b, N_NEW)[0]
    answers = moe.answer_batch(items, max_new_tokens=N_NEW)
    assert [a.text for a in answers] == [a.text for a in dense.answer_batch(items, max_new_tokens=N_NEW)]
    top1 = torch.cat([a.trace.experts[..., 0].flatten() for a in answers])
    assert len(top1.unique()) > 1                                                  # the routers do spread tokens


# --- bad input --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("system", SYSTEMS)
def test_bad_input_gives_a_clear_error(pipes, images, system, tmp_path):
    pipe = pipes[system]
    for question in ("", "   \n", None):
        with pytest.raises(InputError, match="empty"):
            pipe.answer(images[0], question)
    with pytest.raises(InputError, match="empty"):                                 # anywhere in a batch
        pipe.answer_batch([(images[0], "How many?", ()), (images[1], "", ())])
    with pytest.raises(InputError, match="no image"):
        pipe.answer(None, "How many?")
    with pytest.raises(InputError, match="not found"):
        pipe.answer(str(tmp_path / "missing.png"), "How many?")
    assert pipe.answer_batch([]) == []


def test_unknown_system_names_the_choices(loaded):
    for call in (lambda: load_system("gpt4", model="tiny"), lambda: pipeline_class("gpt4"),
                 lambda: load_systems(["dense", "gpt4"], loaded=loaded)):
        with pytest.raises(ValueError, match="unknown system 'gpt4'") as e:
            call()
        assert all(s in str(e.value) for s in SYSTEMS)


@pytest.mark.parametrize("system", [s for s in SYSTEMS if s != "dense"])
def test_a_missing_parts_folder_is_a_load_error(loaded, system):
    with pytest.raises(ModelLoadError, match="/does/not/exist"):
        load_system(system, model="tiny", parts="/does/not/exist")
    with pytest.raises(ModelLoadError, match="/does/not/exist"):
        load_systems([system], parts={system: "/does/not/exist"}, loaded=loaded)


# --- streaming -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("system", SYSTEMS)
def test_streaming_grows_to_the_answer(pipes, images, system):
    pipe = pipes[system]
    for k, q in enumerate(QUESTIONS):
        chunks = []
        ans = pipe.answer(images[k], q, max_new_tokens=N_NEW, on_token=chunks.append)
        assert len(chunks) == ans.trace.new_tokens >= 1                          # one call per generated token
        assert all(isinstance(c, str) for c in chunks)
        assert all(later.startswith(earlier) for earlier, later in zip(chunks, chunks[1:]))   # growing prefixes
        # the last one is the answer (Answer.text strips surrounding whitespace, the stream does not)
        assert chunks[-1].strip() == ans.text
        assert pipe.answer(images[k], q, max_new_tokens=N_NEW).text == ans.text   # streaming changes nothing


@pytest.mark.parametrize("system", SYSTEMS)
def test_a_batch_streams_example_0_only_up_to_its_own_stop(loaded, images, diversify_routers, system):
    """In a batch whose example 0 stops first, the others go on: example 0's stream must end where its
    answer ends, never run past its stop token."""
    pipe = differentiate(loaded, system, images, diversify_routers)
    items = items_of(images)
    tokens, _, _ = pipe.generate(pipe.batch(items), N_NEW)
    # a token of example 0 (not earlier in it) that another example does not emit as early: made a stop token
    stop = next(t for j, t in enumerate(tokens[0]) if j and t not in tokens[0][:j]
                and any(t not in other[:j + 2] and len(other) > j + 1 for other in tokens[1:]))
    pipe.encoder.stop_ids = set(pipe.encoder.stop_ids) | {stop}
    chunks = []
    answers = pipe.answer_batch(items, max_new_tokens=N_NEW, on_token=chunks.append)
    assert max(a.trace.new_tokens for a in answers) > answers[0].trace.new_tokens    # the batch went on
    assert len(chunks) == answers[0].trace.new_tokens >= 1
    assert chunks[-1].strip() == answers[0].text
