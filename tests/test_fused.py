"""The decode engine with its layer body compiled (roe_core/runtime/fused.py, `DecodeEngine(fuse=...)`):
off by default; when on, every system's tokens and traces equal the unfused engine's (the same
arithmetic: on the CPU `aot_eager` traces and replays the very graphs Inductor would compile; one test
runs Inductor's C++ kernels); compiled parts are kept per owner (a second answer compiles nothing);
the KV write it compiles is the arena's own decode write; compile modes with their own CUDA graphs are
refused. On CUDA (`gpu`): the engine's captured graphs of the compiled kernels equal the uncaptured
unfused engine."""
import shutil

import pytest
import torch

from roe_core.runtime.engine import ArenaCache, DecodeEngine
from roe_core.runtime.fused import DecodeKV, FuseOptions, fuse_program, options_of
from roe_core.systems import SYSTEMS, load_base, registry
from test_engine import same
from test_systems import differentiate, items_of

pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 6
TRACE_ONLY = FuseOptions(backend="aot_eager", mode=None)


@pytest.fixture(scope="module")
def loaded():
    return load_base("tiny", device="cpu")


def answers_with(pipe, items, engine):
    pipe.engine = engine
    try:
        return pipe.answer_batch(items, max_new_tokens=N_NEW)
    finally:
        pipe.use_engine("off")


def test_fuse_is_off_by_default_and_changes_nothing(loaded):
    from roe_core.systems import pipeline_class
    assert DecodeEngine("eager").fuse is False
    pipe = pipeline_class("roe").from_base(loaded)
    pipe.use_engine("eager")
    assert pipe.engine.fuse is False
    program = object()
    assert fuse_program(program, False) is program and options_of(None) is None
    assert options_of(True) == FuseOptions()


def test_compile_modes_with_their_own_cuda_graphs_are_refused():
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="CUDA graphs"):
            FuseOptions(mode=mode)
    with pytest.raises(ValueError, match="unknown fuse parts"):
        FuseOptions(parts=("block", "everything"))
    with pytest.raises(TypeError):
        options_of("yes")
    assert FuseOptions(mode="max-autotune-no-cudagraphs").mode == "max-autotune-no-cudagraphs"


def test_the_compiled_kv_write_is_the_arenas_decode_write():
    torch.manual_seed(0)
    keys = [torch.randn(4, 2, 8, 3) for _ in range(2)]
    values = [torch.randn(4, 2, 8, 3) for _ in range(2)]
    slot = torch.tensor([5])
    arena = ArenaCache([k.clone() for k in keys], [v.clone() for v in values], slot)
    arena.lengths = [5, 5]                                   # after a prompt of 5 positions
    fused = DecodeKV(ArenaCache([k.clone() for k in keys], [v.clone() for v in values], slot))
    step_k, step_v = torch.randn(3, 2, 1, 3), torch.randn(3, 2, 1, 3)
    for cache in (arena, fused):
        k, v = cache.update(step_k, step_v, 1)
        assert k.shape == (3, 2, 8, 3) and torch.equal(k[:, :, 5:6], step_k) and torch.equal(v[:, :, 5:6], step_v)
    for a, b in zip(arena.keys + arena.values, fused.keys + fused.values):
        assert torch.equal(a, b)
    assert fused.batch_size(0) == 4


@pytest.mark.parametrize("system", SYSTEMS)
def test_fused_engine_answers_as_the_unfused_engine(loaded, images, diversify_routers, system):
    pipe = differentiate(loaded, system, images, diversify_routers)
    items = items_of(images, [(), [("Is it big?", "Yes.")], ()])
    for batch in (items[:1], items):                         # batch 1, and examples on different routes
        plain = answers_with(pipe, batch, DecodeEngine("eager"))
        fused = answers_with(pipe, batch, DecodeEngine("eager", fuse=TRACE_ONLY))
        same(fused, plain, system)


def test_compiled_parts_are_kept_per_owner(loaded, images, diversify_routers):
    """A second generation of the same owner and shapes reuses the compiled parts: nothing is traced again."""
    from torch._dynamo.utils import counters
    pipe = differentiate(loaded, "roe", images, diversify_routers)
    items = items_of(images)
    engine = DecodeEngine("eager", fuse=TRACE_ONLY)
    first = answers_with(pipe, items, engine)
    traced = counters["stats"]["unique_graphs"]
    assert traced > 0
    again = answers_with(pipe, items, engine)
    other_engine = answers_with(pipe, items, DecodeEngine("eager", fuse=TRACE_ONLY))
    assert counters["stats"]["unique_graphs"] == traced
    assert [a.text for a in again] == [a.text for a in first] == [a.text for a in other_engine]
    from roe_core.systems.roe import layer_program
    assert fuse_program(layer_program(pipe.model), TRACE_ONLY) is fuse_program(layer_program(pipe.model), TRACE_ONLY)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="Inductor's CPU kernels need a C++ compiler")
def test_inductor_kernels_answer_as_the_unfused_engine(loaded, images, diversify_routers):
    """Inductor's own generated kernels (C++ on the CPU), on the system with stand-ins and mixed routes."""
    pipe = differentiate(loaded, "roe", images, diversify_routers)
    items = items_of(images)
    plain = answers_with(pipe, items, DecodeEngine("eager"))
    fused = answers_with(pipe, items, DecodeEngine("eager", fuse=FuseOptions(mode="default")))
    same(fused, plain, "roe")
    assert len({tuple(a.trace.route) for a in plain}) > 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("system", ["roe", "moe_llava"])      # stand-ins and mixed routes; MoE layers (the bench: all)
def test_cuda_graphs_of_compiled_kernels_equal_the_unfused_engine(images, diversify_routers, system):
    """On CUDA in fp32: the engine captures Inductor's Triton kernels in its graphs (compile's own CUDA
    graphs off); the tokens and traces equal the uncaptured, unfused engine; graphs stay within the bound."""
    pipe = differentiate(load_base("tiny", device="cpu"), system, images, diversify_routers)
    pipe.model.to("cuda", torch.float32)
    pipe.device = torch.device("cuda")
    from torch._dynamo.utils import counters
    items = items_of(images, [(), [("Is it big?", "Yes.")], ()])
    engine = DecodeEngine("graphs", fuse=FuseOptions(mode="default"))
    breaks = sum(counters["graph_break"].values())
    for batch in (items[:1], items):
        plain = answers_with(pipe, batch, DecodeEngine("eager"))
        fused = answers_with(pipe, batch, engine)
        replayed = answers_with(pipe, batch, engine)
        same(fused, plain, system)
        same(replayed, plain, system)
    assert engine.fallback is None                               # the graphs' guard found nothing
    assert sum(counters["graph_break"].values()) == breaks       # each layer one compiled graph
    L = pipe.num_layers
    assert 0 < engine.graph_count <= DecodeEngine.graph_bound(L, 1) + DecodeEngine.graph_bound(L, len(items))


def test_geometry_bench_measures_the_fused_engine_beside_the_plain_one(tmp_path):
    """`--fuse both`: each engine variant beside its fused twin (decoding `eager+fuse` on the CPU), the
    large-batch mode (RoE alone, engine only), per batch a memory plan, the summary's fused ratios, the
    crossover and every target (None where not measured: nothing is made up)."""
    from roe_core.bench import geometry
    res = geometry.main(["--preset", "tiny", "--device", "cpu", "--batch-sizes", "1,4", "--large-batch", "4",
                         "--new-tokens", "3", "--rounds", "1", "--large-rounds", "1", "--skip", "1",
                         "--systems", "dense,roe", "--fuse", "both", "--fuse-backend", "aot_eager",
                         "--out", str(tmp_path)])
    rows = res["rows"]
    assert {(r["system"], r["engine"]) for r in rows if r["batch"] == 1} == {
        ("dense", "eager"), ("dense", "eager+fuse"), ("dense", "off"), ("roe", "eager"), ("roe", "eager+fuse"),
        ("roe", "off"), ("transformers", "hf")}
    big = {(r["variant"].split(":")[0], r["engine"]) for r in rows if r["batch"] == 4}
    assert {r["system"] for r in rows if r["batch"] == 4} == {"roe"}
    assert big == {("every layer", "eager"), ("every layer", "eager+fuse"), ("fixed", "eager"), ("mixed", "eager"),
                   ("mixed", "eager+fuse"), ("union rule on the mixed routes", "eager")}
    s = res["summary"]
    assert s["bs1"]["fused"]["every_layer_engine_ms"] > 0 and s["bs4"]["fused"]["mixed_vs_every_layer"] > 0
    assert set(s["crossover"]) == {"engine", "fused"} and 4 in s["crossover"]["engine"]["mixed_vs_every_layer_by_batch"]
    from roe_core.bench.geometry_plan import TARGETS
    assert set(s["targets"]) == set(TARGETS)
    assert s["targets"]["roe_fixed_vs_hf_static"]["measured"] is None        # no static-cache generate on the CPU
    assert s["targets"]["mixed_vs_every_layer"]["measured"] is None          # batch 128 was not run
    assert [p["batch"] for p in res["memory_plans"]] == [1, 4] and all(p["arena_GB"] > 0 for p in res["memory_plans"])


def test_memory_plan_measures_in_groups_what_does_not_fit_at_once():
    from roe_core.bench.geometry import build_config
    from roe_core.bench.geometry_plan import group_fit, memory_plan
    cfg = build_config("llava-1.5-7b")
    groups = {"roe/graphs": "roe", "roe/graphs+fuse": "roe", "roe/off": "roe"}
    plan = memory_plan(cfg, 128, 641, 32, 64, 14.1e9, {}, groups, 2)
    # 32 layers x 2 x 128 rows x 32 heads x 704 keys x 128 x 2 bytes
    assert plan["key_capacity"] == 704 and abs(plan["arena_GB"] - 47.24) < 0.01
    assert group_fit(plan, None) == (None, [])                            # no limit: all at once
    assert group_fit(plan, 200e9) == (None, [])
    packs, dropped = group_fit(plan, 80e9)                                # an H100's worth
    assert dropped == [] and packs == [["roe/graphs"], ["roe/graphs+fuse"], ["roe/off"]]
    packs, dropped = group_fit(plan, 40e9)                                # nothing fits: all left out
    assert packs == [] and sorted(dropped) == sorted(groups)


@pytest.mark.parametrize("system", registry.moe_systems())
def test_fused_moe_layers_with_the_grouped_dispatch_are_one_graph_each(loaded, images, diversify_routers, system):
    """The dispatch CUDA runs (grouped matmuls over stacked experts, no host sync), in bf16 as on the GPU:
    the fused step answers as the unfused one, and Dynamo traces each MoE layer whole (no graph break:
    the expert stack's pointer check is skipped under compile)."""
    from torch._dynamo.utils import counters
    from roe_core.systems.dispatch import set_sync_free
    pipe = differentiate(loaded, system, images, diversify_routers)
    set_sync_free(pipe.model, True)
    pipe.model.to(torch.bfloat16)
    items = items_of(images, [(), [("Is it big?", "Yes.")], ()])
    plain = answers_with(pipe, items, DecodeEngine("eager"))
    breaks = sum(counters["graph_break"].values())
    fused = answers_with(pipe, items, DecodeEngine("eager", fuse=TRACE_ONLY))
    same(fused, plain, system)
    assert sum(counters["graph_break"].values()) == breaks


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="Inductor's CPU kernels need a C++ compiler")
def test_the_compiled_kv_write_touches_the_slot_only():
    """Inductor's code for a decode step's KV write on the first b of 4 rows: the buffer is written in
    place, no copy of the rows' capacity (2 x 3 heads x 256 keys x 8 = 12288 elements) is made."""
    from torch._inductor.utils import run_and_get_code
    buf = [torch.zeros(4, 3, 256, 8)]
    slot = torch.tensor([7])
    key = torch.randn(2, 3, 1, 8)

    def write(keys, slot, key):
        k, _ = DecodeKV(ArenaCache(keys, [torch.zeros_like(keys[0])], slot)).update(key, key, 0)
        return k[:, :, 7] * 2                              # reads the slot only
    torch._dynamo.reset()
    with torch.inference_mode():
        _, code = run_and_get_code(torch.compile(write, dynamic=False), buf, slot, key)
    assert torch.equal(buf[0][:2, :, 7], key[:, :, 0]) and buf[0][2:].eq(0).all() and buf[0][:, :, :7].eq(0).all()
    assert not any(n in src for src in code for n in ("12288L", "24576L"))


def test_a_fused_owner_is_freed_with_its_last_reference(loaded, images, diversify_routers):
    """The compiled parts live on their owner: once it has decoded through the fused engine, dropping the
    pipeline and the engine frees the system model (a 7B MoE model's expert copies are gigabytes)."""
    import gc
    import weakref
    pipe = differentiate(loaded, "roe", images, diversify_routers)
    engine = DecodeEngine("eager", fuse=TRACE_ONLY)
    answers_with(pipe, items_of(images), engine)
    gone = weakref.ref(pipe.model)
    del pipe, engine
    gc.collect()
    assert gone() is None
