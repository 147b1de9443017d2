"""Sync-free MoE dispatch (roe_core/systems/dispatch.py): grouped_dispatch equals the per-expert loop for
top-2 with capacity drops and padding, top-1, experts left without tokens, biases, bf16; the stacked
weights are the experts' own memory and follow `.to()`; MoE-LLaVA's and EvoMoE's FFNs, routers and whole
models give the same answers sync-free; gating without a token mask equals gating with an all-True one."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from conftest import QUESTIONS, randomise
from roe_core.runtime.conversation import ConversationEncoder
from roe_core.runtime.tiny import tiny_llava
from roe_core.systems import dispatch as dispatch_module
from roe_core.systems.dispatch import current_stack, stack_experts, stackable
from roe_core.systems.evomoe import DTRouter, EvoMoEConfig, EvoMoEFFN, EvoMoEModel, top1_gating
from roe_core.systems.moe_llava import (
    Expert, MoEFFN, MoELlavaModel, dispatch, grouped_dispatch, set_sync_free, top2_gating,
)

pytestmark = pytest.mark.usefixtures("one_thread")
D, HIDDEN = 16, 24


@pytest.fixture
def grouped_calls(monkeypatch):
    """A list that grows by one at every grouped_dispatch the FFNs run."""
    calls, real = [], dispatch_module.grouped_dispatch
    monkeypatch.setattr(dispatch_module, "grouped_dispatch", lambda *a: calls.append(1) or real(*a))
    return calls


class SwiGLU(nn.Module):
    def __init__(self, bias=False, d=D, hidden=HIDDEN):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=bias)
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@torch.no_grad()
def distinct_experts(num_experts, bias=False, seed=0, dtype=torch.float32, delta_rank=0):
    """A ModuleList of experts copied from one SwiGLU, then each moved apart at random."""
    torch.manual_seed(seed)
    experts = nn.ModuleList(Expert(SwiGLU(bias), delta_rank) for _ in range(num_experts))
    for e in experts:
        for p in e.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return experts.to(dtype)


def logits_with_an_idle_expert(N, E, g):
    logits = torch.randn(N, E, generator=g) * 2
    logits[:, E - 1] = -30.0                       # the last expert never gets a token
    return logits


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_equals_dispatch_top2_with_drops(bias):
    E = 5
    experts = distinct_experts(E, bias)
    g = torch.Generator().manual_seed(1)
    dropped = 0
    for N in (1, 2, 3, 5, 8, 13, 24, 40):
        for cf, masked in ((0.3, False), (0.5, True), (2.0, False)):
            mask = (torch.rand(N, generator=g) > 0.25) if masked else None
            gating = top2_gating(logits_with_an_idle_expert(N, E, g), cf, training=False, token_mask=mask)
            assert not (gating.experts == E - 1).any()
            real = torch.ones(N, dtype=torch.bool) if mask is None else mask
            dropped += int((~gating.kept[real]).sum())
            x = torch.randn(2, N, D, generator=g)[1]    # a view: (N, d) of a bigger tensor
            with torch.no_grad():
                ref, got = dispatch(experts, x, gating), grouped_dispatch(experts, x, gating)
            assert got.shape == x.shape
            assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert dropped > 0                                  # the capacity did drop assignments


def test_grouped_equals_dispatch_top1_and_batched_shapes():
    E = 4
    experts = distinct_experts(E, seed=3)
    g = torch.Generator().manual_seed(2)
    for N in range(1, 41, 3):
        mask = torch.rand(N, generator=g) > 0.2
        gating = top1_gating(logits_with_an_idle_expert(N, E, g), mask)
        x = torch.randn(N, D, generator=g)
        with torch.no_grad():
            assert_close(grouped_dispatch(experts, x, gating), dispatch(experts, x, gating), atol=1e-5, rtol=1e-5)
    # (B, S, d) inputs, gating over the B*S tokens
    x = torch.randn(3, 7, D, generator=g)
    gating = top1_gating(torch.randn(21, E, generator=g))
    with torch.no_grad():
        assert_close(grouped_dispatch(experts, x, gating), dispatch(experts, x, gating), atol=1e-5, rtol=1e-5)


def test_grouped_bf16_is_close():
    E = 4
    experts = distinct_experts(E, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(17, D, generator=g).bfloat16()
    gating = top2_gating(torch.randn(17, E, generator=g), 0.5, training=False)
    with torch.no_grad():
        got, ref = grouped_dispatch(experts, x, gating), dispatch(experts, x, gating)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_stacked_weights_are_the_experts_memory_and_follow_to():
    ffn = MoEFFN(SwiGLU(bias=True), num_experts=3).eval()
    params = [p for e in ffn.experts for p in e.parameters()]
    st = ffn.stacked()
    assert ffn.stacked() is st                                          # built once
    assert st.weight["gate_proj"].shape == (3, HIDDEN, D) and st.weight["down_proj"].shape == (3, D, HIDDEN)
    assert st.bias["up_proj"].shape == (3, HIDDEN)
    for e, expert in enumerate(ffn.experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(expert, name)
            assert lin.weight.data_ptr() == st.weight[name][e].data_ptr()
            assert lin.bias.data_ptr() == st.bias[name][e].data_ptr()
    assert [p for e in ffn.experts for p in e.parameters()] == params   # the same Parameter objects
    assert all(p.requires_grad for p in params)
    with torch.no_grad():                                               # in-place updates reach the stack
        ffn.experts[1].down_proj.weight.mul_(2)
    assert torch.equal(st.weight["down_proj"][1], ffn.experts[1].down_proj.weight)
    ffn.to(torch.float64)
    assert current_stack(ffn.experts) is None and ffn.experts._expert_stack is None   # stale stack freed
    st64 = ffn.stacked()
    assert st64 is not st and st64.weight["up_proj"].dtype == torch.float64
    assert ffn.experts[2].up_proj.weight.data_ptr() == st64.weight["up_proj"][2].data_ptr()
    x = torch.randn(5, D, dtype=torch.float64)
    ffn.sync_free = True
    assert not ffn.use_grouped(x)                                       # grouped_mm takes no float64: dispatch
    with torch.no_grad():
        y, gating = ffn(x)
        assert_close(y, dispatch(ffn.experts, x, gating))
    ffn.float()
    x = x.float()
    assert ffn.use_grouped(x)
    with torch.no_grad():
        y, gating = ffn(x)
        assert_close(y, dispatch(ffn.experts, x, gating), atol=1e-5, rtol=1e-5)
    assert current_stack(ffn.experts) is not None


def test_unmerged_deltas_are_not_stacked():
    experts = distinct_experts(3, delta_rank=2)
    with torch.no_grad():
        for e in experts:
            e.delta["up_proj"].b.normal_()
    assert not stackable(experts)
    with pytest.raises(ValueError):
        stack_experts(experts)
    ffn = MoEFFN(SwiGLU(), num_experts=3, delta_rank=2).eval()
    ffn.sync_free = True
    assert not ffn.use_grouped(torch.randn(2, D))
    for e in ffn.experts:
        e.merge()
    assert ffn.use_grouped(torch.randn(2, D))


@pytest.mark.parametrize("kind", ["moe", "evo"])
def test_ffn_forward_sync_free_equals_default(kind, grouped_calls):
    torch.manual_seed(5)
    if kind == "moe":
        ffn = MoEFFN(SwiGLU(), num_experts=4, capacity_factor_eval=0.6)
    else:
        ffn = EvoMoEFFN(SwiGLU(), EvoMoEConfig(num_experts=4))
    randomise([ffn], seed=2, router_std=0.5, expert_std=0.3)
    ffn.eval()
    assert ffn.sync_free is None and not ffn.use_grouped(torch.randn(2, D))   # CPU default: dispatch
    x = torch.randn(2, 9, D)
    ok = torch.ones(2, 9, dtype=torch.bool)
    ok[0, :3] = False                                                          # left padding
    image = torch.zeros(2, 9, dtype=torch.bool)
    image[:, 4:7] = True
    with torch.no_grad():
        ref, g_ref = ffn(x, ok, image)
        assert not grouped_calls
        set_sync_free(ffn, True)
        assert ffn.use_grouped(x)
        got, g_got = ffn(x, ok, image)
    assert len(grouped_calls) == 1
    assert torch.equal(g_got.experts, g_ref.experts) and torch.equal(g_got.kept, g_ref.kept)
    assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if kind == "moe":
        assert not g_ref.kept[ok.reshape(-1)].all()                           # drops happened
    ffn.train()
    assert not ffn.use_grouped(x)                                              # training: dispatch


def test_dtr_sync_free_equals_default():
    torch.manual_seed(6)
    router = DTRouter(D, 4)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.5)
    z = torch.randn(23, D)
    for is_image in (torch.rand(23) > 0.5, torch.zeros(23, dtype=torch.bool), torch.ones(23, dtype=torch.bool)):
        router.sync_free = None
        ref = router(z, is_image)
        router.sync_free = True
        assert_close(router(z, is_image), ref, atol=1e-5, rtol=1e-5)
        assert_close(router.forward_sync_free(z, is_image), ref, atol=1e-5, rtol=1e-5)


def test_gating_without_a_mask_equals_an_all_true_mask():
    g = torch.Generator().manual_seed(7)
    for N in (1, 6, 31):
        logits = torch.randn(N, 4, generator=g)
        for cf in (0.4, 2.0):
            a = top2_gating(logits, cf, training=False)
            b = top2_gating(logits, cf, training=False, token_mask=torch.ones(N, dtype=torch.bool))
            assert a.capacity == b.capacity
            for f in ("experts", "weights", "kept", "l_aux", "probs"):
                assert torch.equal(getattr(a, f), getattr(b, f)), f
        a, b = top1_gating(logits), top1_gating(logits, torch.ones(N, dtype=torch.bool))
        for f in ("experts", "weights", "kept", "l_aux", "probs"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("cls", [MoELlavaModel, EvoMoEModel])
def test_whole_model_sync_free_equals_default(cls, images, grouped_calls):
    base, tok, proc = tiny_llava(seed=0)
    enc = ConversationEncoder.for_model(base, tok, proc)
    model = cls(base).eval()
    randomise(model.moe.values(), seed=3, expert_std=0.05)
    b = enc.collate([enc.encode([(q, None)]) for q in QUESTIONS], images[:3], last_turn_only=True)
    with torch.no_grad():
        ref = model(b.input_ids, b.token_ok, b.pixel_values)
        set_sync_free(model, True)
        assert all(ffn.sync_free for ffn in model.moe.values())
        got = model(b.input_ids, b.token_ok, b.pixel_values)
    assert len(grouped_calls) == len(model.moe_layers) == 3
    assert_close(got.logits, ref.logits, atol=1e-4, rtol=1e-4)
    for a, c in zip(got.gates, ref.gates):
        assert torch.equal(a.experts, c.experts)
    set_sync_free(model, None)
    assert all(ffn.sync_free is None for ffn in model.moe.values())


def test_masked_dispatch_equals_dispatch_with_drops():
    """The sync-free path where no grouped kernel runs (CUDA fp32, older GPUs): every expert on every token,
    weighted; the same sums."""
    from roe_core.systems.dispatch import masked_dispatch
    E = 4
    experts = distinct_experts(E, seed=5)
    g = torch.Generator().manual_seed(4)
    for N in (1, 4, 9, 30):
        gating = top2_gating(logits_with_an_idle_expert(N, E, g), 0.5, training=False)
        x = torch.randn(N, D, generator=g)
        with torch.no_grad():
            assert_close(masked_dispatch(experts, x, gating), dispatch(experts, x, gating), atol=1e-5, rtol=1e-5)
