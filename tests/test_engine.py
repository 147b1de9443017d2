"""The static-shape decode engine (roe_core/runtime/engine.py) gives, for every system, the tokens (and
traces) of the eager loop: at batch 1, for batches whose examples take different routes, with stops
inside the batch and with streaming; its graph count stays within its bound over many routes. The CUDA
graph mode itself is covered by tests/test_core_gpu.py (a `gpu` test)."""
import pytest
import torch

from conftest import QUESTIONS
from roe_core.runtime.engine import ArenaCache, DecodeEngine, bucket
from roe_core.systems import SYSTEMS, load_base, registry
from test_systems import differentiate, items_of

pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 10
MOE_SYSTEMS = registry.moe_systems()


@pytest.fixture(scope="module")
def loaded():
    return load_base("tiny", device="cpu")


def answers(pipe, items, mode, **options):
    pipe.use_engine(mode)
    try:
        return pipe.answer_batch(items, max_new_tokens=N_NEW, **options)
    finally:
        pipe.use_engine("off")


def same(a, b, system):
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.trace.new_tokens for x in a] == [x.trace.new_tokens for x in b]
    assert [x.trace.layers_executed for x in a] == [x.trace.layers_executed for x in b]
    if system == "roe":
        assert [x.trace.route for x in a] == [x.trace.route for x in b]
    if system in MOE_SYSTEMS:
        for x, y in zip(a, b):
            assert torch.equal(x.trace.token_ids, y.trace.token_ids)
            assert torch.equal(x.trace.experts, y.trace.experts)
            torch.testing.assert_close(x.trace.weights, y.trace.weights)


@pytest.mark.parametrize("system", SYSTEMS)
def test_engine_tokens_equal_the_eager_loop_at_batch_1_and_in_mixed_batches(loaded, images, diversify_routers,
                                                                            system):
    pipe = differentiate(loaded, system, images, diversify_routers)
    items = items_of(images, [(), [("Is it big?", "Yes.")], ()])
    for batch in (items[:1], items):
        off = answers(pipe, batch, "off")
        eng = answers(pipe, batch, "eager")
        same(eng, off, system)
    if system == "roe":
        assert len({tuple(a.trace.route) for a in answers(pipe, items, "eager")}) > 1   # mixed routes


def test_engine_stops_each_example_where_the_eager_loop_does(loaded, images, diversify_routers):
    """Stop ids that some examples emit early: the batch goes on for the others, each answer ends at its
    own stop, and the batch stops when all have."""
    pipe = differentiate(loaded, "roe", images, diversify_routers)
    items = items_of(images)
    off = answers(pipe, items, "off")
    ids = pipe.encoder.tokenizer([a.text for a in off], add_special_tokens=False).input_ids
    stop = {row[2] for row in ids if len(row) > 3}                  # a token some answers emit mid-way
    old = pipe.encoder.stop_ids
    pipe.encoder.stop_ids = set(old or ()) | stop
    try:
        off2, eng2 = answers(pipe, items, "off"), answers(pipe, items, "eager")
    finally:
        pipe.encoder.stop_ids = old
    same(eng2, off2, "roe")
    assert any(a.trace.new_tokens < N_NEW for a in off2)


def test_engine_streams_like_the_eager_loop(loaded, images, diversify_routers):
    pipe = differentiate(loaded, "roe", images, diversify_routers)
    item = items_of(images)[0]
    streams = {}
    for mode in ("off", "eager"):
        seen = []
        pipe.use_engine(mode)
        ans = pipe.answer(*item, max_new_tokens=N_NEW, on_token=seen.append)
        pipe.use_engine("off")
        streams[mode] = (seen, ans.text)
    assert streams["eager"] == streams["off"] and streams["off"][0][-1] == streams["off"][1]


def random_routes_agree(pipe, items, engine, reference: str, rounds: int, seed: int = 3) -> None:
    """rounds random forced routes (a route per example): `engine` answers as the pipeline does in the
    `reference` engine mode, and every answer took its route. Leaves the pipeline on the eager loop."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        route = torch.rand(len(items), pipe.num_layers, generator=g) > 0.5
        pipe.use_engine(reference)
        ref = pipe.answer_batch(items, max_new_tokens=4, route=route)
        pipe.engine = engine
        got = pipe.answer_batch(items, max_new_tokens=4, route=route)
        pipe.use_engine("off")
        assert [a.text for a in got] == [a.text for a in ref]
        assert [a.trace.route for a in got] == route.tolist()


def test_forced_routes_and_the_graph_bound(loaded, images):
    """Many different routes through one arena: answers equal the eager loop's, and the number of
    (layer, row bucket) programs the engine keeps stays within graph_bound. In eager mode the count
    is of the keys a graph run would capture (runs are keyed the same way)."""
    pipe = differentiate(loaded, "roe", images, lambda *a: None)
    L = pipe.num_layers
    items = items_of(images) + [(images[3], "What is in it?", ())]
    B = len(items)
    engine = DecodeEngine("eager")
    keys = set()
    orig = engine.run

    def spy(a, key, fn, layer=None, **kw):
        keys.add(key)
        orig(a, key, fn, layer, **kw)
    engine.run = spy
    random_routes_agree(pipe, items, engine, "off", 6)
    assert len(keys) <= DecodeEngine.graph_bound(L, B)
    assert len(engine.arenas) == 1                              # one shape: one arena, reused


def test_buckets_and_the_cache_write_slot():
    assert [bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket(7, 4) == 4
    k = [torch.zeros(4, 1, 8, 2)]
    cache = ArenaCache(k, [torch.zeros(4, 1, 8, 2)], torch.tensor([5]))
    kp = torch.ones(2, 1, 3, 2)
    out_k, _ = cache.update(kp, kp, 0)                         # prefill: slots 0..2 of the first 2 rows
    assert out_k.shape == (2, 1, 3, 2) and k[0][:2, :, :3].eq(1).all() and k[0][2:].eq(0).all()
    step = torch.full((3, 1, 1, 2), 7.0)
    out_k, _ = cache.update(step, step, 0)                     # decode: slot 5 of the first 3 rows
    assert out_k.shape == (3, 1, 8, 2) and k[0][:3, :, 5].eq(7).all() and k[0][:, :, 4].eq(0).all()


def test_graph_mode_needs_cuda(loaded, images):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    pipe = differentiate(loaded, "dense", images, lambda *a: None)
    pipe.engine = DecodeEngine("graphs")
    with pytest.raises(ValueError, match="CUDA"):
        pipe.answer(*items_of(images)[0], max_new_tokens=2)
    pipe.use_engine("off")
    with pytest.raises(ValueError, match="engine mode"):
        pipe.use_engine("fast")


def test_auto_engine_is_off_on_the_cpu(loaded):
    from roe_core.systems import pipeline_class
    pipe = pipeline_class("dense").from_base(loaded)
    assert pipe.engine is None and pipe.info["engine"] == "off"


def test_geometry_bench_quick_writes_every_key(tmp_path):
    """`python -m roe_core.bench.geometry --quick` (tiny preset, CPU): every system, every variant, the
    keys the GPU run fills (CUDA-only ones None), and the markdown table."""
    import json
    from roe_core.bench import geometry
    res = geometry.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results_geometry.json").read_text())
    assert saved["preset"] == "tiny" and saved["engine_mode"] == "eager"
    for key in ("bandwidth_TBps", "graph_count", "graph_bound", "rows", "summary", "prompt_tokens", "new_tokens"):
        assert key in saved
    rows = saved["rows"]
    assert {r["batch"] for r in rows} == {1, 4}
    assert {r["system"] for r in rows} >= {"dense", "roe", "transformers", *registry.moe_systems()}
    variants = {r["variant"].split(":")[0] for r in rows if r["system"] == "roe" and r["batch"] == 4}
    assert variants == {"every layer", "fixed", "mixed", "union rule on the mixed routes"}
    for r in rows:
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["new_tokens"] == res["new_tokens"]
        assert set(r) >= {"floor_ms", "floor_fraction", "peak_memory_GiB", "step_weight_GB", "layers_run"}
    assert set(saved["summary"]["bs4"]) >= {"roe_fixed_vs_hf_static", "mixed_vs_every_layer", "engine_vs_eager_loop_dense"}
    assert "| batch | system |" in (tmp_path / "results_geometry.md").read_text()


def test_concurrent_generations_through_one_engine_do_not_mix(loaded, images, diversify_routers):
    """A server's threads may share a pipeline: the engine's arenas are shared, so generations take turns."""
    import threading
    pipe = differentiate(loaded, "roe", images, diversify_routers)
    items = items_of(images)
    want = [a.text for a in answers(pipe, items, "off")]
    pipe.use_engine("eager")
    got, errors = {}, []

    def ask(k):
        try:
            got[k] = [a.text for a in pipe.answer_batch(items, max_new_tokens=N_NEW)]
        except Exception as e:              # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pipe.use_engine("off")
    assert not errors and all(v == want for v in got.values()) and len(got) == 4


# --- under a server: arenas reused by shape bucket, one per generation in flight, the graphs' guard ---

def test_batches_of_1_2_3_repeated_build_an_arena_only_for_the_first_of_each_bucket(loaded, images,
                                                                                   diversify_routers):
    """Rows are bucketed to powers of two (3 decodes in the arena of 4, one pad row) and keys to a grid:
    a server's batches of 1, 2, 3, three times over, build 3 arenas, not 9; answers equal the eager loop's."""
    pipe = differentiate(loaded, "roe", images, diversify_routers)
    items = items_of(images, [(), [("Is it big?", "Yes.")], ()])
    ref = {n: [a.text for a in answers(pipe, items[:n], "off")] for n in (1, 2, 3)}
    pipe.use_engine("eager")
    try:
        for _ in range(3):
            for n in (1, 2, 3):
                assert [a.text for a in pipe.answer_batch(items[:n], max_new_tokens=N_NEW)] == ref[n]
        stats = pipe.engine_stats()
        assert stats["arenas_built"] == 3 and stats["arenas_reused"] == 6
        assert sorted(a.B for a in pipe.engine.arenas.values()) == [1, 2, 4]
    finally:
        pipe.use_engine("off")


def test_last_arena_does_not_keep_an_evicted_arena_alive(loaded, images, monkeypatch):
    """An arena dropped to make room is freed before the next one is built (on a GPU: its KV buffers and
    graphs are given back first), last_arena notwithstanding."""
    import gc
    import weakref

    import roe_core.runtime.engine as E

    pipe = differentiate(loaded, "roe", images, lambda *a: None)
    items = items_of(images)
    engine = pipe.engine = DecodeEngine("eager", max_arenas=1)
    try:
        pipe.answer_batch(items[:1], max_new_tokens=2)
        first = weakref.ref(engine.last_arena)
        alive_at_build = []
        real = E.Arena.__init__

        def build(self, *a, **kw):
            gc.collect()
            alive_at_build.append(first() is not None)
            real(self, *a, **kw)
        monkeypatch.setattr(E.Arena, "__init__", build)
        pipe.answer_batch(items[:2], max_new_tokens=2)          # another bucket: the first arena is dropped
        gc.collect()
        assert alive_at_build == [False] and first() is None
        assert engine.last_arena is not None and engine.last_arena.B == 2 and len(engine.arenas) == 1
    finally:
        pipe.use_engine("off")


def test_a_generation_started_at_another_ones_checkpoint_decodes_in_its_own_arena(loaded, images, diversify_routers,
                                                                                 within):
    """What a server does when a background generation hands the model to a plain batch at a token: the
    plain batch runs to its end on the same engine, then the first goes on. No lock is held across that
    (it deadlocked), the two never share an arena, and both answers equal the eager loop's."""
    pipe = differentiate(loaded, "roe", images, diversify_routers)
    items = items_of(images)
    ref_a = [a.text for a in answers(pipe, items[:1], "off")]
    ref_b = [a.text for a in answers(pipe, [items[2]], "off")]
    pipe.use_engine("eager")
    inner = []

    def checkpoint(step, tokens):
        if step == 2 and not inner:
            inner.append([a.text for a in pipe.answer_batch([items[2]], max_new_tokens=N_NEW)])

    try:
        outer = within(30, lambda: [a.text for a in pipe.answer_batch(items[:1], max_new_tokens=N_NEW,
                                                                      on_step=checkpoint)])
        assert outer == ref_a and inner == [ref_b]
        assert pipe.engine_stats()["arenas_built"] == 2                # same shape bucket, two arenas in flight
        assert not any(a.busy for a in pipe.engine.arenas.values())    # both given back
    finally:
        pipe.use_engine("off")


def test_the_graphs_guard_falls_back_to_eager_on_a_mismatch_and_says_so_once(loaded, images, diversify_routers,
                                                                             caplog):
    """The guard's code path on the CPU: check_replays runs it in eager mode, replay_hook stands for a
    replay whose tokens differ. The answers stay the eager loop's; the engine says so once (log, info)."""
    import logging

    pipe = differentiate(loaded, "roe", images, diversify_routers)
    items = items_of(images)
    ref = [a.text for a in answers(pipe, items, "off")]
    pipe.use_engine("eager")
    try:
        engine = pipe.engine
        engine.check_replays = True
        assert [a.text for a in pipe.answer_batch(items, max_new_tokens=N_NEW)] == ref     # replays agree
        assert engine.stats["steps_checked"] == 1 and engine.fallback is None and "engine_fallback" not in pipe.info
        engine.replay_hook = lambda tokens: tokens + 1                                    # a replay gone wrong
        engine.release_idle()                                                             # new arenas: checked again
        with caplog.at_level(logging.WARNING, logger="roe_core.engine"):
            for _ in range(2):
                assert [a.text for a in pipe.answer_batch(items, max_new_tokens=N_NEW)] == ref
                engine.release_idle()
        assert engine.mode == "eager" and engine.fallback and "falls back to the eager engine" in engine.fallback
        assert pipe.info["engine"] == "eager" and pipe.info["engine_fallback"] == engine.fallback
        assert len([r for r in caplog.records if "falls back" in r.getMessage()]) == 1          # said once
    finally:
        pipe.use_engine("off")


def test_an_arena_that_runs_out_of_memory_drops_the_idle_ones_and_retries(loaded, images, monkeypatch):
    import roe_core.runtime.engine as E

    pipe = differentiate(loaded, "roe", images, lambda *a: None)
    items = items_of(images)
    ref = [a.text for a in answers(pipe, items[:2], "off")]
    pipe.use_engine("eager")
    try:
        pipe.answer_batch(items[:1], max_new_tokens=2)                   # an idle arena to drop
        real, fails = E.Arena.__init__, [1]

        def tight(self, *a, **kw):
            if fails and len(pipe.engine.arenas) > 0:
                fails.pop()
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            real(self, *a, **kw)
        monkeypatch.setattr(E.Arena, "__init__", tight)
        assert [a.text for a in pipe.answer_batch(items[:2], max_new_tokens=N_NEW)] == ref
        assert not fails and [a.B for a in pipe.engine.arenas.values()] == [2]
    finally:
        pipe.use_engine("off")
