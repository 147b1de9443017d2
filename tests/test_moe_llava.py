"""MoE-LLaVA (roe_core/moe_llava.py): upcycled experts compute what the base computes, top-2 gating as
the reference defines it (checked by hand), vectorised dispatch equals a per-token loop, left-padded
batches equal their examples alone, the KV cache equals recomputation, training balances the routers,
checkpoints round-trip and refuse a different base."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import LlamaConfig, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaMLP

from conftest import QUESTIONS, base_logits, logits, randomise
from roe_core.runtime.conversation import ConversationEncoder
from roe_core.systems.moe_llava import (
    CONFIG_NAME, TOKEN_KINDS, WEIGHTS_NAME, MoEFFN, MoELlavaConfig, MoELlavaModel, ParamCounts, moe_lm_loss,
    top2_gating,
)
from roe_core.runtime.tiny import tiny_llava, tiny_llava_config

pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 6
ANSWERS = ["Red.", "Three.", "No, it is right of it."]


@pytest.fixture
def tiny():
    """(base, encoder): a fresh tiny random LLaVA (6 layers, width 32)."""
    base, tok, proc = tiny_llava(seed=0)
    return base, ConversationEncoder.for_model(base, tok, proc)


def batch(enc, questions, images, answers=None):
    """Left-padded batch; with answers: the training layout (answers present, answer_mask set)."""
    answers = answers or [None] * len(questions)
    return enc.collate([enc.encode([(q, a)]) for q, a in zip(questions, answers)], images,
                       last_turn_only=answers[0] is None)


# --- parity with the base --------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_identical_experts_equal_the_base_for_any_router(images, attn):
    base, tok, proc = tiny_llava(seed=0, attn_implementation=attn)
    enc = ConversationEncoder.for_model(base, tok, proc)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = MoELlavaModel(base).eval()
    assert model.moe_layers == [0, 2, 4] and model.config.num_experts == 4
    assert all(type(layer.mlp) is LlamaMLP for layer in base.model.language_model.layers)   # base not edited
    for seed in (1, 2):
        randomise(model.moe.values(), seed)
        for k, q in enumerate(QUESTIONS):
            b = batch(enc, [q], images[k:k + 1])
            out = model(b.input_ids, b.token_ok, b.pixel_values)
            assert_close(out.logits, base_logits(base, b))
            top = torch.stack([g.experts for g in out.gates])                  # (M, N, 2)
            assert len(top[..., 0].unique()) == 4 and len(top[..., 1].unique()) == 4   # the routers do route
            assert all(g.kept.all() for g in out.gates)                        # eval capacity: no drops
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- top-2 gating, by hand ---------------------------------------------------------------------------------

# 4 real tokens and one pad (row 2), 4 experts; logits = log(probs), so softmax gives the probs back
PROBS = torch.tensor([[0.50, 0.30, 0.15, 0.05],     # t0: top-1 e0, top-2 e1
                      [0.40, 0.10, 0.35, 0.15],     # t1: top-1 e0, top-2 e2
                      [0.10, 0.10, 0.70, 0.10],     # pad: would take e2's only slot first
                      [0.10, 0.20, 0.60, 0.10],     # t2: top-1 e2, top-2 e1
                      [0.05, 0.15, 0.20, 0.60]])    # t3: top-1 e3, top-2 e2
REAL = torch.tensor([True, True, False, True, True])


def test_top2_gating_by_hand():
    # cf 0.5: C = ceil(4 real tokens / 4 experts * 0.5 * 2) = 1 slot per expert (2 if the pad counted)
    g = top2_gating(PROBS.log(), 0.5, training=False, token_mask=REAL)
    assert g.capacity == 1
    assert g.experts[REAL].tolist() == [[0, 1], [0, 2], [2, 1], [3, 2]]
    # top-1s fill first: e0 <- t0 (t1's top-1 dropped), e2 <- t2, e3 <- t3; then top-2s: e1 <- t0
    # (t2's dropped), e2 is full (t1's and t3's top-2 dropped) although t1 comes before t2
    assert g.kept.tolist() == [[True, True], [False, False], [False, False], [True, False], [True, False]]
    # renormalised over the kept assignments: t0 0.5/0.8, 0.3/0.8; t2 and t3 keep only their top-1 (w = 1)
    assert_close(g.weights, torch.tensor([[0.625, 0.375], [0, 0], [0, 0], [1, 0], [1, 0]]))
    # l_aux = E * sum_e mean_prob_e * frac_top1_e over the 4 real tokens
    mean_prob = torch.tensor([1.05, 0.75, 1.30, 0.90]) / 4
    frac_top1 = torch.tensor([2, 0, 1, 1]) / 4
    assert_close(g.l_aux, 4 * (mean_prob * frac_top1).sum())
    assert_close(g.l_aux, torch.tensor(1.075))
    assert_close(g.probs, PROBS)

    # eval capacity (cf 2): C = 4, nothing dropped, w_k = g_k / (g_1 + g_2)
    g = top2_gating(PROBS.log(), 2.0, training=False, token_mask=REAL)
    assert g.capacity == 4 and g.kept[REAL].all() and not g.kept[~REAL].any()
    assert_close(g.weights[REAL], torch.tensor([[0.5, 0.3], [0.4, 0.35], [0.6, 0.2], [0.6, 0.2]])
                 / torch.tensor([[0.8], [0.75], [0.8], [0.8]]))
    assert_close(top2_gating(PROBS.log(), 2.0, False, token_mask=REAL).l_aux, torch.tensor(1.075))

    # with the pad counted (no mask) it is one more token: C = ceil(5/4) = 2, and the pad takes e2 first
    g = top2_gating(PROBS.log(), 0.5, training=False)
    assert g.capacity == 2 and g.kept[2, 0] and not g.kept[4, 1]

    # balanced: every expert top-1 of one token, uniform mean probabilities -> l_aux = 1
    eye = torch.eye(4) * 5
    assert_close(top2_gating(eye, 2.0, False).l_aux, torch.tensor(1.0))


def test_gumbel_noise_only_in_training_and_only_for_expert_two():
    logits = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    ev = top2_gating(logits, 2.0, training=False)
    assert torch.equal(ev.experts[:, 1], logits.topk(2, -1).indices[:, 1])  # eval: the plain runner-up
    tr = [top2_gating(logits, 2.0, True, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(tr[0].experts, tr[1].experts)                         # seeded noise is reproducible
    for t in tr:
        assert torch.equal(t.experts[:, 0], ev.experts[:, 0])                # expert 1: argmax, no noise
        assert (t.experts[:, 1] != t.experts[:, 0]).all()
    assert not torch.equal(tr[0].experts[:, 1], ev.experts[:, 1])            # noise changes some expert 2s
    assert not torch.equal(tr[0].experts[:, 1], tr[2].experts[:, 1])


# --- dispatch ------------------------------------------------------------------------------------------------

def test_moeffn_dispatch_equals_a_per_token_loop():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=4, hidden_act="silu")
    ffn = MoEFFN(LlamaMLP(cfg), num_experts=4, capacity_factor_eval=0.75).eval()   # tight: some drops
    randomise([ffn], seed=3, router_std=1.0, expert_std=0.2)
    x = torch.randn(3, 7, 16)
    token_ok = torch.ones(3, 7, dtype=torch.bool)
    token_ok[0, :2] = token_ok[2, :4] = False                                # left padding
    with torch.no_grad():
        y, g = ffn(x, token_ok)
        ref = torch.zeros(21, 16)
        for n, xn in enumerate(x.reshape(21, 16)):
            for k in range(2):
                if g.kept[n, k]:
                    ref[n] += g.weights[n, k] * ffn.experts[int(g.experts[n, k])](xn[None])[0]
    assert 0 < int(g.kept[token_ok.reshape(-1)].sum()) < 2 * int(token_ok.sum())   # some, not all, dropped
    assert_close(y.reshape(21, 16), ref)
    assert (y[~token_ok] == 0).all()                                           # padding gets nothing
    assert len({tuple(e.gate_proj.weight.flatten()[:3].tolist()) for e in ffn.experts}) == 4   # distinct


# --- batches, cache, generation ----------------------------------------------------------------------------

def test_left_padded_batch_equals_each_example_alone(tiny, images):
    base, enc = tiny
    model = MoELlavaModel(base).eval()
    randomise(model.moe.values(), expert_std=0.05)
    b = batch(enc, QUESTIONS, images[:3])
    lengths = b.token_ok.sum(-1).tolist()
    assert len(set(lengths)) == 3                                              # really padded
    together = logits(model, b)
    gen = model.generate(b, max_new_tokens=N_NEW)
    assert not torch.allclose(together[-1:], base_logits(base, batch(enc, QUESTIONS[2:], images[2:3])))
    for k in range(3):
        bk = batch(enc, [QUESTIONS[k]], images[k:k + 1])
        n = lengths[k]
        assert_close(together[k, -n:], logits(model, bk)[0])
        alone = model.generate(bk, max_new_tokens=N_NEW)
        assert gen.tokens[k] == alone.tokens[0]
        tr, tr1 = gen.traces[k], alone.traces[0]
        assert torch.equal(tr.experts, tr1.experts) and torch.equal(tr.token_ids, tr1.token_ids)
        assert_close(tr.weights, tr1.weights)


def test_cached_generation_equals_recomputing_without_cache(tiny, images):
    base, enc = tiny
    model = MoELlavaModel(base).eval()
    randomise(model.moe.values(), expert_std=0.05)
    b = batch(enc, QUESTIONS[:2], images[:2])
    steps = []
    gen = model.generate(b, max_new_tokens=N_NEW, callback=lambda s, tok: steps.append(tok.tolist()))
    assert all(len(t) == N_NEW for t in gen.tokens)
    assert steps == torch.tensor(gen.tokens).T.tolist()
    ids, ok = b.input_ids, b.token_ok
    with torch.no_grad():
        _, state = model.prefill(model.layout(ids, ok, b.pixel_values), N_NEW)
        for s in range(N_NEW):
            full = model(ids, ok, b.pixel_values).logits[:, -1]                 # the whole sequence, no cache
            assert full.argmax(-1).tolist() == [t[s] for t in gen.tokens]
            token = torch.tensor([t[s] for t in gen.tokens])
            if s + 1 < N_NEW:
                assert_close(model.decode_one_token(token, state), model(
                    torch.cat([ids, token[:, None]], 1), torch.cat([ok, ok[:, -1:]], 1), b.pixel_values).logits[:, -1])
            ids, ok = torch.cat([ids, token[:, None]], 1), torch.cat([ok, ok[:, -1:]], 1)
    # the trace: prompt tokens then the N_NEW - 1 tokens fed back, with their kinds
    for k, tr in enumerate(gen.traces):
        n_prompt = int(b.token_ok[k].sum())
        assert tr.experts.shape == (3, n_prompt + N_NEW - 1, 2) == tr.weights.shape
        assert tr.token_ids[n_prompt:].tolist() == gen.tokens[k][:-1]
        kinds = [TOKEN_KINDS[i] for i in tr.kinds.tolist()]
        assert kinds.count("image") == enc.num_image_tokens
        assert kinds.count("question") == len(QUESTIONS[k]) and kinds[n_prompt:] == ["answer"] * (N_NEW - 1)
        assert tr.top1_load(4).sum(-1).tolist() == [n_prompt + N_NEW - 1] * 3
        assert tr.top1_load(4, "image").sum().item() == 3 * enc.num_image_tokens
        json.dumps(tr.to_dict())


def test_teacher_forced_trace_marks_answers(tiny, images):
    base, enc = tiny
    model = MoELlavaModel(base)
    b = batch(enc, QUESTIONS[:2], images[:2], ANSWERS[:2])
    traces = model.trace(b)
    assert model.training                                                       # mode restored
    for k, tr in enumerate(traces):
        kinds = [TOKEN_KINDS[i] for i in tr.kinds.tolist()]
        assert kinds.count("answer") == int(b.answer_mask[k].sum()) == len(ANSWERS[k]) + 1   # + end token


# --- training ----------------------------------------------------------------------------------------------------

def test_a_few_steps_lower_the_loss_and_balance_the_routers(tiny, images):
    base, enc = tiny
    torch.manual_seed(0)
    model = MoELlavaModel(base)
    with torch.no_grad():
        for ffn in model.moe.values():
            ffn.router.weight.mul_(10)                                         # peaky, unbalanced routers
    b = batch(enc, QUESTIONS[:2], images[:2], ANSWERS[:2])
    for p in model.parameters():
        p.requires_grad_(False)
    params = model.ffn_parameters()                                           # stage III: FFNs + routers
    for p in params:
        p.requires_grad_(True)
    assert not any(p.requires_grad for p in base.model.vision_tower.parameters())
    assert not any(p.requires_grad for layer in model.layers for p in layer.self_attn.parameters())

    def evaluate():
        model.eval()
        with torch.no_grad():
            out = moe_lm_loss(model, b)
        model.train()
        return out

    start = evaluate()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    for _ in range(12):
        out = moe_lm_loss(model, b)
        assert out["loss"].item() == pytest.approx(out["ce"].item() + 0.01 * out["l_aux"].item(), rel=1e-5)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    end = evaluate()
    M = len(model.moe_layers)                                                 # balanced sum = M
    assert end["loss"] < start["loss"] - 0.3
    assert start["l_aux"] > M + 0.25
    assert abs(end["l_aux"] - M) < 0.5 * abs(start["l_aux"] - M)


# --- checkpoints -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, 2])
def test_save_and_load_round_trip(tiny, images, tmp_path, rank):
    base, enc = tiny
    model = MoELlavaModel(base, expert_delta_rank=rank, extra={"steps": 3}).eval()
    randomise(model.moe.values(), expert_std=0.05)                             # with rank 2: the deltas move
    b = batch(enc, QUESTIONS, images[:3])
    want = logits(model, b)
    model.save_moe(tmp_path / "moe")
    assert sorted(p.name for p in (tmp_path / "moe").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    cfg = json.loads((tmp_path / "moe" / CONFIG_NAME).read_text())
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["expert_delta_rank"]) == (6, 32, rank)
    assert cfg["moe_layers"] == [0, 2, 4] and cfg["extra"] == {"steps": 3}
    keys = set(load_file(str(tmp_path / "moe" / WEIGHTS_NAME)))
    assert len([k for k in keys if k.endswith("router.weight")]) == 3
    if rank:   # only routers and deltas: the upcycled weights are the base's own FFN
        assert all(k.endswith("router.weight") or ".delta." in k for k in keys)
        assert len(keys) == 3 + 3 * 4 * 3 * 2

    fresh = tiny_llava(seed=0)[0]                                             # the same base, loaded again
    torch.manual_seed(123)                                                    # fresh routers would differ
    loaded = MoELlavaModel.from_moe_folder(fresh, tmp_path / "moe", expected_base=model.config.base_model).eval()
    assert loaded.config == model.config
    assert all(e.merged for f in loaded.moe.values() for e in f.experts) == bool(rank)   # materialised
    assert_close(logits(loaded, b), want, **({} if rank else {"rtol": 0, "atol": 0}))
    assert loaded.generate(b, max_new_tokens=N_NEW).tokens == model.generate(b, max_new_tokens=N_NEW).tokens
    assert all(f.router.weight.dtype == torch.float32 for f in loaded.moe.values())


def test_loading_onto_a_different_base_raises(tiny, tmp_path):
    base, _ = tiny
    model = MoELlavaModel(base)
    model.config.base_model = "tiny-llava-6"
    model.save_moe(tmp_path / "moe")
    with pytest.raises(ValueError, match="made for 6 layers of width 32; the base model has 4 layers"):
        MoELlavaModel.from_moe_folder(tiny_llava(num_layers=4)[0], tmp_path / "moe")
    narrow = LlavaForConditionalGeneration(tiny_llava_config(num_layers=6, hidden=16))
    with pytest.raises(ValueError, match="6 layers of width 16"):
        MoELlavaModel.from_moe_folder(narrow, tmp_path / "moe")
    with pytest.raises(ValueError, match="made for base model 'tiny-llava-6', not 'other'"):
        MoELlavaModel.from_moe_folder(tiny_llava()[0], tmp_path / "moe", expected_base="other")
    MoELlavaModel.from_moe_folder(tiny_llava()[0], tmp_path / "moe", expected_base="tiny-llava-6")
    # the same shape but other MoE layers: the weights do not match the config
    cfg = MoELlavaConfig.load(tmp_path / "moe")
    cfg.moe_layers = [1, 3, 5]
    cfg.save(tmp_path / "moe")
    with pytest.raises(ValueError, match="does not match: missing"):
        MoELlavaModel.from_moe_folder(tiny_llava()[0], tmp_path / "moe")
    with pytest.raises(FileNotFoundError, match="not a MoE-LLaVA checkpoint"):
        MoELlavaModel.from_moe_folder(base, tmp_path)


# --- configuration and counts ------------------------------------------------------------------------------------

def test_config_defaults_and_parameter_counts(tiny):
    base, _ = tiny
    cfg = MoELlavaConfig(num_layers=30, hidden_size=576)
    assert cfg.moe_layers == list(range(0, 30, 2)) and len(cfg.moe_layers) == 15   # MoE-LLaVA on SmolLM2
    assert (cfg.num_experts, cfg.top_k, cfg.capacity_factor_train, cfg.capacity_factor_eval, cfg.aux_loss_coef) == \
        (4, 2, 1.5, 2.0, 0.01)
    with pytest.raises(ValueError, match="top-2"):
        MoELlavaModel(base, top_k=1)
    with pytest.raises(ValueError, match="moe_layers"):
        MoELlavaModel(base, moe_layers=[0, 6])

    model = MoELlavaModel(base, moe_layers=[1, 4])
    dense, moe = ParamCounts.of_dense(base), model.parameter_counts()
    assert dense.total == sum(p.numel() for p in base.parameters())          # nothing tied in the tiny model
    ffn = 3 * 32 * 64                                                         # gate, up, down of one SwiGLU FFN
    assert moe.vision == dense.vision > 0 and moe.projector == dense.projector > 0
    assert moe.total - dense.total == 2 * (3 * ffn + 4 * 32)                  # + 3 experts and a router per MoE layer
    assert moe.active - dense.active == 2 * (1 * ffn + 4 * 32)                # top-2: one expert more per token
    assert moe.total - moe.active == 2 * 2 * ffn
