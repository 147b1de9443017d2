"""EvoMoE (roe_core/systems/evomoe.py, roe_core/train/evomoe.py): expert evolution is the EMA of
expert 0's trajectory (both storage modes, real training steps), the router stage trains the DTRs
alone, the DTR keeps image and text tokens apart and scores each token on its own, top-1 dispatch
and l_aux match hand computations, fresh parts equal the dense model, left-padded batches equal
their examples alone, checkpoints round-trip, and the quick bench covers EvoMoE."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.testing import assert_close
from transformers import LlamaConfig, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaMLP

from conftest import QUESTIONS, base_logits, logits, randomise
from roe_core import scenes
from roe_core.runtime.conversation import ConversationEncoder
from roe_core.runtime.tiny import tiny_llava, tiny_llava_config
from roe_core.systems import load_base
from roe_core.systems.evomoe import (
    CONFIG_NAME, WEIGHTS_NAME, DTRouter, EvoMoEConfig, EvoMoEFFN, EvoMoEModel, EvoMoEPipeline, top1_gating,
)
from roe_core.systems.moe_llava import MoELlavaModel
from roe_core.train import LlavaJsonDataset
from roe_core.train.loop import make_collate
from roe_core.train.evomoe import EvoObjective, EvoTrainConfig, train_evomoe

pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 4
FIXED_BETAS = [[0.9, 0.9], [0.8, 0.8], [0.7, 0.7]]


@pytest.fixture
def tiny():
    """(base, encoder): a fresh tiny random LLaVA (6 layers, width 32)."""
    base, tok, proc = tiny_llava(seed=0)
    return base, ConversationEncoder.for_model(base, tok, proc)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    path = scenes.export_llava_json("train", 4, out, image_size=32)
    return LlavaJsonDataset(path, out / "images")


def batch(enc, questions, images):
    return enc.collate([enc.encode([(q, None)]) for q in questions], images, last_turn_only=True)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_ffn(num_experts=4, rank=0, seed=0, bias=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=4, hidden_act="silu", mlp_bias=bias)
    return EvoMoEFFN(LlamaMLP(cfg), EvoMoEConfig(num_experts=num_experts, expert_delta_rank=rank))


# --- 1. expert evolution: the EMA of expert 0's trajectory, over real training steps -------------------------

def expert0_names(model):
    """Names of what trains in the evolve stage (expert 0's deltas, or its full weights)."""
    ids = {id(p) for p in model.expert0_parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("rank", [2, 0])
def test_evolve_stage_experts_are_the_ema_of_expert0s_trajectory(tiny, toy_data, tmp_path, rank):
    base, enc = tiny
    torch.manual_seed(0)
    model = EvoMoEModel(base, expert_delta_rank=rank, beta_ranges=FIXED_BETAS)
    names0 = expert0_names(model)
    E, M = model.config.num_experts, len(model.moe_layers)
    assert len(names0) == M * (6 if rank else 3)
    assert all(".experts.0." in n and ((".delta." in n) == bool(rank)) for n in names0)
    before = snapshot(model)
    for n in names0:   # the evolved experts start where expert 0 starts: theta_n(0) = theta_0(0)
        for k in range(1, E):
            assert torch.equal(before[n.replace(".experts.0.", f".experts.{k}.")], before[n]), (n, k)

    trajectory = []   # expert 0 after every optimizer step, before the evolution step that follows it
    params = dict(model.named_parameters())
    hook = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: trajectory.append({n: params[n].detach().clone() for n in names0}))
    steps = 4
    cfg = EvoTrainConfig(stage="evolve", steps=steps, batch_size=2, lr=1e-2, log_every=1, save_every=1000)
    try:
        log = train_evomoe(model, enc, toy_data, cfg, tmp_path / "evo", progress=False)
    finally:
        hook.remove()
    assert len(trajectory) == steps and len(log) == steps
    assert not any(f.evolving for f in model.moe.values())                   # evolving mode switched off after
    for row in log:
        assert row["beta_2"] == pytest.approx(0.9) and row["beta_3"] == pytest.approx(0.8)
        assert row["beta_4"] == pytest.approx(0.7)
        assert row["l_aux"] == 0 and torch.isfinite(torch.tensor(row["loss"]))   # evolving: no routing
    after = snapshot(model)

    # expert 0 moved by gradient; experts n follow theta_n(t) = beta_n theta_n(t-1) + (1 - beta_n) theta_0(t)
    evolved = set()
    for n in names0:
        assert not torch.equal(after[n], before[n]), n
        assert torch.equal(after[n], trajectory[-1][n])                       # evolution never touches expert 0
        for k, (beta, _) in enumerate(FIXED_BETAS, start=1):
            name = n.replace(".experts.0.", f".experts.{k}.")
            evolved.add(name)
            ema = before[n].clone()
            for theta0 in trajectory:
                ema = beta * ema + (1 - beta) * theta0[n]
            assert_close(after[name], ema)
            assert not torch.allclose(after[name], after[n], atol=1e-6)        # lagging behind expert 0
    # nothing else changed: routers, the experts' frozen copies (rank > 0), the whole base
    for k in after:
        if k not in evolved and k not in names0:
            assert torch.equal(after[k], before[k]), k
    ckpt = load_file(str(tmp_path / "evo" / WEIGHTS_NAME))
    assert set(ckpt) == set(model.moe_state_dict())


def test_evolve_draws_each_beta_from_its_range():
    """Full-weight experts (with biases here: whatever trains on expert 0 is evolved)."""
    import random
    ffn = tiny_ffn(num_experts=5, bias=True)                                   # 4 evolved: the ranges cycle
    with torch.no_grad():
        for e in ffn.experts:
            for p in e.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    evolving = [n for n, _ in ffn.experts[0].named_parameters()]
    assert len(evolving) == 6                                                  # gate/up/down weight and bias
    before = [{n: p.clone() for n, p in e.named_parameters()} for e in ffn.experts]
    ranges = [[0.9, 0.99], [0.8, 0.89], [0.7, 0.79]]
    betas = ffn.evolve(ranges, random.Random(3))
    assert len(betas) == 4
    for k, b in enumerate(betas):
        lo, hi = ranges[k % 3]
        assert lo <= b <= hi
    assert betas[0] != betas[3]                                                # drawn, not fixed
    for k, b in enumerate(betas, start=1):
        for n, p in ffn.experts[k].named_parameters():
            assert_close(p, b * before[k][n] + (1 - b) * before[0][n], msg=f"expert {k} {n}")
    assert all(torch.equal(p, before[0][n]) for n, p in ffn.experts[0].named_parameters())


# --- 2. the router stage ------------------------------------------------------------------------------------

def test_router_stage_trains_the_routers_alone(tiny, toy_data, tmp_path):
    base, enc = tiny
    torch.manual_seed(0)
    model = EvoMoEModel(base)
    randomise(model.moe.values(), seed=2, router_std=0.3, expert_std=0.02)      # experts differ: routing matters
    before = snapshot(model)
    cfg = EvoTrainConfig(stage="router", steps=3, batch_size=2, lr=1e-2, log_every=1, save_every=1000)
    log = train_evomoe(model, enc, toy_data, cfg, tmp_path / "router", progress=False)
    after = snapshot(model)
    assert len(log) == 3
    for row in log:
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss", "ce", "l_aux"))
        assert row["l_aux"] >= 0.99 * len(model.moe_layers)                   # top-1 l_aux >= 1 per layer
        assert row["loss"] == pytest.approx(row["ce"] + 0.001 * row["l_aux"], rel=1e-5)
        assert not any(k.startswith("beta_") for k in row)
    router_keys = [k for k in after if ".router." in k]
    assert len(router_keys) == 3 * 12                                          # 2 hypernets x 4 + phi 4, per layer
    for k in after:
        if ".router." in k:
            assert not torch.equal(after[k], before[k]), k                     # every DTR tensor trained
        else:
            assert torch.equal(after[k], before[k]), k                         # experts and base frozen, bitwise
    assert model.config.extra["training"]["router"]["steps"] == 3


def test_router_stage_loss_under_bf16_autocast(tiny, toy_data):
    """What fit runs with cfg.bf16 (the embedded recipe on a bf16 CPU): the objective's loss under
    autocast. (accelerate fixes mixed precision once per process, so this is the loop's step by hand.)"""
    base, enc = tiny
    torch.manual_seed(0)
    model = EvoMoEModel(base)
    objective = EvoObjective(model, EvoTrainConfig(stage="router", steps=1))
    objective.set_trainable(model, 0)
    b = make_collate(enc)([toy_data[0], toy_data[1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = objective.loss(model, b, 0)
    stats["loss"].backward()
    assert torch.isfinite(stats["loss"]) and stats["l_aux"] >= 0.99 * len(model.moe_layers)
    params = model.router_parameters()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert not any(p.requires_grad for f in model.moe.values() for p in f.experts.parameters())


def test_unknown_stage_raises(tiny):
    base, _ = tiny
    with pytest.raises(ValueError, match="stage must be one of"):
        EvoObjective(EvoMoEModel(base), EvoTrainConfig(stage="experts"))


# --- 3. the Dynamic Token-aware Router ------------------------------------------------------------------------

def make_dtr(seed=0, d=12, E=4):
    torch.manual_seed(seed)
    r = DTRouter(d, E, hidden=8, b=3, k=5)
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return r


@torch.no_grad()
def test_dtr_shapes_and_hand_computation():
    r = make_dtr()
    z = torch.randn(10, 12)
    is_image = torch.tensor([True, False] * 5)
    scores = r(z, is_image)
    assert scores.shape == (10, 4) and scores.dtype == torch.float32
    for n in range(10):          # per token: generated Theta_down (2b x d), Theta_up (k x b); SwiGLU; phi
        h = r.hyper["image" if is_image[n] else "text"]
        t = h.fc2(F.silu(h.fc1(z[n])))
        down, up = t[:2 * 3 * 12].view(6, 12), t[2 * 3 * 12:].view(5, 3)
        gate, value = (down @ z[n]).chunk(2)
        emb = up @ (F.silu(gate) * value)
        assert_close(scores[n], r.phi(emb))
    assert r(z[:0], is_image[:0]).shape == (0, 4)


@torch.no_grad()
@pytest.mark.parametrize("perturbed", ["text", "image"])
def test_dtr_modalities_use_their_own_hypernetwork(perturbed):
    r = make_dtr()
    z = torch.randn(10, 12)
    is_image = torch.tensor([True, True, False, True, False, False, True, False, False, True])
    before = r(z, is_image)
    for p in r.hyper[perturbed].parameters():
        p.zero_() if p.dim() == 1 else p.mul_(-2.0)
    after = r(z, is_image)
    touched = is_image if perturbed == "image" else ~is_image
    assert torch.equal(after[~touched], before[~touched])                      # the other modality: bitwise the same
    assert not torch.allclose(after[touched], before[touched])                # every touched token changed
    assert all(not torch.allclose(a, b) for a, b in zip(after[touched], before[touched]))
    # only image tokens: the text hypernetwork never runs (and vice versa)
    calls = []
    hooks = [r.hyper[m].register_forward_hook(lambda mod, i, o, m=m: calls.append((m, i[0].shape[0])))
             for m in ("image", "text")]
    r(z, torch.ones(10, dtype=torch.bool))
    r(z, is_image)
    for h in hooks:
        h.remove()
    assert calls == [("image", 10), ("image", 5), ("text", 5)]                 # once per modality, its tokens only


@torch.no_grad()
def test_dtr_scores_a_token_on_its_own():
    r = make_dtr()
    z = torch.randn(9, 12)
    is_image = torch.tensor([True, False, False, True, True, False, True, False, True])
    full = r(z, is_image)
    for n in range(9):
        assert_close(r(z[n:n + 1], is_image[n:n + 1])[0], full[n])
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    assert_close(r(z[perm], is_image[perm]), full[perm])
    other = z.clone()
    other[1:] = torch.randn(8, 12) * 5                                         # other tokens changed
    assert_close(r(other, is_image)[0], full[0])


def test_dtr_routes_in_fp32_under_bf16_autocast():
    """Training with bf16 (the loop's cfg.bf16, the embedded recipe on a bf16 CPU) runs under autocast."""
    r = make_dtr()
    z = torch.randn(10, 12)
    is_image = torch.tensor([True, False] * 5)
    with torch.no_grad():
        want = r(z, is_image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = r(z, is_image)
    assert got.dtype == torch.float32 and torch.equal(got.detach(), want)
    ffn = tiny_ffn()
    randomise([ffn], seed=3)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, g = ffn(x, torch.ones(2, 5, dtype=torch.bool), torch.tensor([[True, True, False, False, False]] * 2))
        (y.float().square().sum() + g.l_aux).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ffn.router.parameters())


def test_model_routes_image_tokens_by_the_image_flag(tiny, images):
    base, enc = tiny
    model = EvoMoEModel(base).eval()
    randomise(model.moe.values(), seed=7)
    seen = []
    hook = model.moe["0"].router.register_forward_hook(lambda m, args, out: seen.append((args[1], out)))
    b = batch(enc, QUESTIONS[:2], images[:2])
    logits(model, b)
    is_image = (b.input_ids == base.config.image_token_id).reshape(-1)
    assert torch.equal(seen[0][0], is_image) and int(is_image.sum()) == 2 * enc.num_image_tokens > 0
    # layer 0's inputs do not depend on any MoE: a new image hypernetwork moves exactly the image tokens' scores
    with torch.no_grad():
        for p in model.moe["0"].router.hyper["image"].parameters():
            p.mul_(-2.0)
    logits(model, b)
    hook.remove()
    before, after = seen[0][1], seen[1][1]
    assert torch.equal(after[~is_image], before[~is_image])
    assert all(not torch.allclose(x, y) for x, y in zip(after[is_image], before[is_image]))


# --- 4. top-1 gating and dispatch ------------------------------------------------------------------------------

# 4 real tokens and one pad (row 2), 4 experts; scores = log(probs), so softmax gives the probs back
PROBS = torch.tensor([[0.50, 0.30, 0.15, 0.05],     # t0: e0
                      [0.40, 0.10, 0.35, 0.15],     # t1: e0
                      [0.10, 0.10, 0.70, 0.10],     # pad
                      [0.10, 0.20, 0.60, 0.10],     # t2: e2
                      [0.05, 0.15, 0.20, 0.60]])    # t3: e3
REAL = torch.tensor([True, True, False, True, True])


def test_top1_gating_by_hand():
    scores = PROBS.log().requires_grad_(True)
    g = top1_gating(scores, REAL)
    assert g.experts.shape == (5, 1) and g.experts[:, 0].tolist() == [0, 0, 2, 2, 3]
    assert g.kept[:, 0].tolist() == REAL.tolist()                             # no capacity: every real token kept
    assert g.weights.detach()[:, 0].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]     # weight 1 exactly (0 for the pad)
    assert_close(g.probs.detach(), PROBS)
    mean_prob = torch.tensor([1.05, 0.75, 1.30, 0.90]) / 4                    # over the 4 real tokens
    frac_top1 = torch.tensor([2, 0, 1, 1]) / 4
    assert_close(g.l_aux.detach(), 4 * (mean_prob * frac_top1).sum())
    assert_close(g.l_aux.detach(), torch.tensor(1.075))
    # counting the pad: 5 tokens, its top-1 (e2) counted too
    mp5, fr5 = PROBS.sum(0) / 5, torch.tensor([2, 0, 2, 1]) / 5
    assert_close(top1_gating(PROBS.log()).l_aux, 4 * (mp5 * fr5).sum())
    assert_close(top1_gating(torch.eye(4) * 5).l_aux, torch.tensor(1.0))     # balanced -> 1

    # straight-through: value 1, gradient d p_top / d scores = p_top (onehot_top - p)
    c = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5])
    (g.weights[:, 0] * c).sum().backward()
    top = PROBS.argmax(-1)
    p_top = PROBS.gather(1, top[:, None])
    want = c[:, None] * REAL[:, None] * p_top * (F.one_hot(top, 4) - PROBS)
    assert_close(scores.grad, want)
    assert (scores.grad[REAL].abs().sum(-1) > 0).all() and (scores.grad[~REAL] == 0).all()


def test_top1_dispatch_equals_a_per_token_loop():
    ffn = tiny_ffn().eval()
    randomise([ffn], seed=3, router_std=0.5, expert_std=0.2)
    x = torch.randn(3, 7, 16)
    token_ok = torch.ones(3, 7, dtype=torch.bool)
    token_ok[0, :2] = token_ok[2, :4] = False                                  # left padding
    token_image = torch.zeros(3, 7, dtype=torch.bool)
    token_image[:, 4:6] = True
    with torch.no_grad():
        y, g = ffn(x, token_ok, token_image)
        scores = ffn.router(x.reshape(21, 16), token_image.reshape(21))
        ref = torch.zeros(21, 16)
        for n, xn in enumerate(x.reshape(21, 16)):
            if token_ok.reshape(21)[n]:
                ref[n] = ffn.experts[int(scores[n].argmax())](xn[None])[0]
    assert torch.equal(g.experts[:, 0], scores.argmax(-1))
    assert len(g.experts[token_ok.reshape(21), 0].unique()) >= 3               # the router does route
    assert_close(y.reshape(21, 16), ref)
    assert (y[~token_ok] == 0).all()                                           # padding gets nothing
    # the router learns through the straight-through weight (the output's value ignores it)
    ffn.train()
    y, g = ffn(x, token_ok, token_image)
    (y.square().sum() + g.l_aux).backward()
    for name, p in ffn.router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_evolving_ffn_runs_expert0_for_every_token():
    ffn = tiny_ffn()
    randomise([ffn], seed=4, expert_std=0.2)
    ffn.evolving = True
    x = torch.randn(2, 5, 16)
    token_ok = torch.ones(2, 5, dtype=torch.bool)
    token_ok[0, 0] = False
    with torch.no_grad():
        y, g = ffn(x, token_ok)
        assert_close(y.reshape(10, 16), ffn.experts[0](x.reshape(10, 16)))
    assert (g.experts == 0).all() and float(g.l_aux) == 0.0
    assert g.weights[:, 0].tolist() == token_ok.reshape(10).float().tolist()


# --- 5. parity with the dense model ----------------------------------------------------------------------------

def test_fresh_experts_equal_the_dense_model_for_any_router(tiny, images):
    base, enc = tiny
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = EvoMoEModel(base).eval()
    assert model.moe_layers == [0, 2, 4] and model.config.num_experts == 4 and model.config.top_k == 1
    assert all(type(layer.mlp) is LlamaMLP for layer in base.model.language_model.layers)   # base not edited
    b = batch(enc, QUESTIONS, images[:3])
    want = base_logits(base, b)
    for seed in (1, 2):
        randomise(model.moe.values(), seed)
        with torch.no_grad():
            out = model(b.input_ids, b.token_ok, b.pixel_values)
        assert_close(out.logits, want)
        top = torch.stack([g.experts[:, 0] for g in out.gates])                # (M, B*S)
        assert len(top[:, b.token_ok.reshape(-1)].unique()) >= 3               # the routers do route
    # evolving mode: the output is expert 0's, whatever the other experts hold
    model.set_evolving(True)
    with torch.no_grad():
        for ffn in model.moe.values():
            for e in ffn.experts[1:]:
                e.gate_proj.weight.add_(torch.randn_like(e.gate_proj.weight))
    assert_close(logits(model, b), want)
    model.set_evolving(False)
    assert not torch.allclose(logits(model, b), want)                          # the others do run when routed
    model.set_evolving(True)
    with torch.no_grad():
        for ffn in model.moe.values():
            ffn.experts[0].up_proj.weight.mul_(2)
    assert not torch.allclose(logits(model, b), want)                          # expert 0 is what runs
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- 6. batching and generation ------------------------------------------------------------------------------

def test_left_padded_batch_equals_each_example_alone(images):
    loaded = load_base("tiny", device="cpu", dtype="float32")
    pipe = EvoMoEPipeline.from_base(loaded)
    model, enc = pipe.model, pipe.encoder
    assert "untrained" in pipe.info["parts"]
    randomise(model.moe.values(), seed=5, router_std=0.5, expert_std=0.05)
    b = batch(enc, QUESTIONS, images[:3])
    lengths = b.token_ok.sum(-1).tolist()
    assert len(set(lengths)) == 3                                              # really padded
    together = logits(model, b)
    gen = model.generate(b, max_new_tokens=N_NEW)
    assert not torch.allclose(together[-1:], base_logits(loaded.base, batch(enc, QUESTIONS[2:], images[2:3])))
    for k in range(3):
        bk = batch(enc, [QUESTIONS[k]], images[k:k + 1])
        n = lengths[k]
        assert_close(together[k, -n:], logits(model, bk)[0])
        alone = model.generate(bk, max_new_tokens=N_NEW)
        assert gen.tokens[k] == alone.tokens[0] and len(gen.tokens[k]) == N_NEW
        tr, tr1 = gen.traces[k], alone.traces[0]
        assert tr.experts.shape == (3, n + N_NEW - 1, 1)
        assert torch.equal(tr.experts, tr1.experts) and torch.equal(tr.token_ids, tr1.token_ids)
        assert_close(tr.weights, tr1.weights)
    assert len(torch.cat([t.experts.flatten() for t in gen.traces]).unique()) >= 3
    # the pipeline's batched answers equal its one-by-one answers
    items = [(images[k], QUESTIONS[k], ()) for k in range(3)]
    answers = pipe.answer_batch(items, max_new_tokens=N_NEW)
    assert [a.text for a in answers] == [pipe.answer(*it, max_new_tokens=N_NEW).text for it in items]


# --- 7. checkpoints -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, 2])
def test_save_and_load_round_trip(tiny, images, tmp_path, rank):
    base, enc = tiny
    model = EvoMoEModel(base, expert_delta_rank=rank, beta_ranges=FIXED_BETAS, extra={"steps": 3}).eval()
    randomise(model.moe.values(), seed=6, expert_std=0.05)
    b = batch(enc, QUESTIONS, images[:3])
    want = logits(model, b)
    model.save_moe(tmp_path / "evo")
    assert sorted(p.name for p in (tmp_path / "evo").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert (CONFIG_NAME, WEIGHTS_NAME) == ("evomoe_config.json", "evomoe.safetensors")
    cfg = json.loads((tmp_path / "evo" / CONFIG_NAME).read_text())
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["expert_delta_rank"], cfg["top_k"]) == (6, 32, rank, 1)
    assert cfg["beta_ranges"] == FIXED_BETAS and cfg["extra"] == {"steps": 3}
    assert (cfg["hyper_hidden"], cfg["bottleneck"], cfg["embed_dim"], cfg["aux_loss_coef"]) == (16, 4, 16, 0.001)
    keys = set(load_file(str(tmp_path / "evo" / WEIGHTS_NAME)))
    assert len([k for k in keys if ".router." in k]) == 3 * 12
    if rank:   # only routers and deltas: no full expert weight is stored
        assert all(".router." in k or ".delta." in k for k in keys)
        assert not any(k.endswith("_proj.weight") for k in keys)
        assert len(keys) == 3 * 12 + 3 * 4 * 3 * 2
    else:
        assert len([k for k in keys if k.endswith("_proj.weight")]) == 3 * 4 * 3

    fresh = tiny_llava(seed=0)[0]
    torch.manual_seed(123)                                                     # fresh routers would differ
    loaded = EvoMoEModel.from_moe_folder(fresh, tmp_path / "evo").eval()
    assert isinstance(loaded, EvoMoEModel) and loaded.config == model.config
    assert all(e.merged for f in loaded.moe.values() for e in f.experts) == bool(rank)
    assert_close(logits(loaded, b), want, **({} if rank else {"rtol": 0, "atol": 0}))
    assert loaded.generate(b, max_new_tokens=N_NEW).tokens == model.generate(b, max_new_tokens=N_NEW).tokens
    # the pipeline loads the folder too
    pipe = EvoMoEPipeline.from_base(load_base("tiny", device="cpu", dtype="float32"), str(tmp_path / "evo"))
    assert pipe.info["parts"] == str(tmp_path / "evo")
    assert all(p.dtype == torch.float32 for f in pipe.model.moe.values() for p in f.router.parameters())
    assert_close(logits(pipe.model, b), want, **({} if rank else {"rtol": 0, "atol": 0}))


def test_loading_a_wrong_folder_or_base_raises(tiny, tmp_path):
    base, _ = tiny
    EvoMoEModel(base).save_moe(tmp_path / "evo")
    with pytest.raises(ValueError, match="6 layers of width 32; the base model has 4 layers"):
        EvoMoEModel.from_moe_folder(tiny_llava(num_layers=4)[0], tmp_path / "evo")
    narrow = LlavaForConditionalGeneration(tiny_llava_config(num_layers=6, hidden=16))
    with pytest.raises(ValueError, match="6 layers of width 16"):
        EvoMoEModel.from_moe_folder(narrow, tmp_path / "evo")
    with pytest.raises(FileNotFoundError, match="not a EvoMoE checkpoint"):
        EvoMoEModel.from_moe_folder(base, tmp_path)
    MoELlavaModel(tiny_llava()[0]).save_moe(tmp_path / "moe")                  # a MoE-LLaVA folder is not one
    with pytest.raises(FileNotFoundError, match="evomoe_config.json.*EvoMoE"):
        EvoMoEModel.from_moe_folder(base, tmp_path / "moe")
    (tmp_path / "evo" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        EvoMoEModel.from_moe_folder(base, tmp_path / "evo")


def test_config_checks(tiny):
    base, _ = tiny
    assert EvoMoEConfig().beta_ranges == [[0.9, 0.99], [0.8, 0.89], [0.7, 0.79]]
    with pytest.raises(ValueError, match="top-1"):
        EvoMoEModel(base, top_k=2)
    with pytest.raises(ValueError, match="at least 2 experts"):
        EvoMoEModel(base, num_experts=1)


# --- 8. the benchmark ----------------------------------------------------------------------------------------

def test_quick_bench_covers_evomoe(tmp_path):
    from roe_core import bench
    r = bench.run(model="tiny", quick=True, out=tmp_path, n=8, timing_n=2, max_new_tokens=3, shifted_n=4,
                  systems=["dense", "evomoe"], uniformity_n=4)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(r))
    evo = saved["systems"]["evomoe"]
    for key in ("accuracy", "by_type", "shifted_accuracy", "examples_per_s_bs1", "examples_per_s_bs16", "params",
                "expert_load", "rigidity_js_per_layer", "l_aux_per_layer", "l_aux_sum",
                "expert_similarity_per_layer", "uniformity"):
        assert key in evo, key
    assert evo["label"] == "EvoMoE" and evo["moe_layers"] == [0, 2, 4] and evo["num_experts"] == 4
    assert len(evo["l_aux_per_layer"]) == len(evo["rigidity_js_per_layer"]) == 3
    assert evo["l_aux_sum"] >= 0.99 * 3                                       # top-1 l_aux >= 1 per layer
    assert all(s == pytest.approx(1.0) for s in evo["expert_similarity_per_layer"])   # fresh: exact copies
    for kind in ("image", "text"):
        assert all(abs(sum(row) - 1) < 1e-6 for row in evo["expert_load"][kind])
    assert evo["uniformity"]["n"] == 4
    # fresh parts: exact copies of the dense FFNs, so the dense model's answers (shuffled routers too)
    assert evo["accuracy"] == saved["systems"]["dense"]["accuracy"]
    assert evo["uniformity"]["accuracy_shuffled_routers"] == evo["uniformity"]["accuracy"]
    dense = saved["systems"]["dense"]["params"]
    assert evo["params"]["active"] > dense["active"] and evo["params"]["total"] > evo["params"]["active"]
