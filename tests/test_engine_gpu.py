"""The decode engine's CUDA-graph mode on a GPU: for every system its tokens and traces equal the same
engine run uncaptured (the same kernels, so exactly) and, in fp32, the eager loop's; mixed routes at
batch 4 stay within the graph bound; captured steps cannot sync with the host (capture would fail)."""
import pytest
import torch

from roe_core.runtime.engine import DecodeEngine
from roe_core.systems import SYSTEMS, load_base, registry
from test_engine import answers as run, random_routes_agree, same as traces_equal
from test_systems import differentiate, items_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
N_NEW = 10
MOE_SYSTEMS = registry.moe_systems()


@pytest.fixture
def loaded():
    """A base of its own per test: moving a pipeline to CUDA moves its base."""
    return load_base("tiny", device="cpu")


def on_cuda(pipe, dtype):
    pipe.model.to("cuda", dtype)
    pipe.device = torch.device("cuda")
    return pipe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("system", SYSTEMS)
def test_graphs_equal_the_uncaptured_engine(loaded, images, diversify_routers, system, dtype):
    pipe = on_cuda(differentiate(loaded, system, images, diversify_routers), dtype)
    items = items_of(images, [(), [("Is it big?", "Yes.")], ()])
    for batch in (items[:1], items):
        eager = run(pipe, batch, "eager")
        graphs = run(pipe, batch, "graphs")
        again = run(pipe, batch, "graphs")            # replayed graphs, a reused arena
        traces_equal(graphs, eager, system)
        traces_equal(again, eager, system)
        if dtype == torch.float32:
            traces_equal(graphs, run(pipe, batch, "off"), system)


def test_mixed_routes_replay_within_the_graph_bound(loaded, images):
    pipe = on_cuda(differentiate(loaded, "roe", images, lambda *a: None), torch.float32)
    items = items_of(images) + [(images[3], "What is in it?", ())]
    B, L = len(items), pipe.num_layers
    engine = DecodeEngine("graphs")
    random_routes_agree(pipe, items, engine, "eager", 8)
    assert 0 < engine.graph_count <= DecodeEngine.graph_bound(L, B)


def test_moe_dispatch_on_cuda_is_grouped_in_bf16_and_equals_the_loop():
    """The grouped-GEMM dispatch (bf16, SM90+) or the masked one, against the per-expert loop, on CUDA."""
    from roe_core.systems.dispatch import dispatch, grouped_kernel, grouped_dispatch, masked_dispatch
    from roe_core.systems.moe_llava import Expert, top2_gating
    from test_dispatch import SwiGLU
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(Expert(SwiGLU(d=64, hidden=128)) for _ in range(4)).to("cuda", torch.bfloat16)
    for N in (1, 16, 200):
        x = torch.randn(N, 64, device="cuda", dtype=torch.bfloat16)
        gating = top2_gating(torch.randn(N, 4, device="cuda"), 2.0, training=False)
        with torch.no_grad():
            ref = dispatch(experts, x, gating).float()
            fast = grouped_dispatch if grouped_kernel(x) else masked_dispatch
            torch.testing.assert_close(fast(experts, x, gating).float(), ref, atol=3e-2, rtol=3e-2)
