"""Parity with transformers: with every layer running, RoE (routing tokens present) computes exactly
what the unmodified LlavaForConditionalGeneration computes, for logits and greedy generations, alone,
in left-padded batches and in multi-turn conversations."""
import pytest
import torch
from torch.testing import assert_close

from conftest import QUESTIONS
from roe_core.systems.roe import all_logits, decode_one_token, generate, prefill

pytestmark = pytest.mark.usefixtures("one_thread")
ATTN = ["eager", "sdpa"]
N_NEW = 16

HISTORY = [("What is in the picture?", "Two circles and a square."), ("Which one is largest?", "The red circle.")]


@torch.no_grad()
def base_logits(base, b):
    return base(input_ids=b.input_ids, attention_mask=b.token_ok.long(), pixel_values=b.pixel_values).logits


@pytest.mark.parametrize("attn", ATTN)
def test_dense_logits_equal_transformers(make_tiny, images, attn):
    t = make_tiny(attn)
    assert t.base.config.text_config.num_hidden_layers >= 6
    assert t.base.config.text_config._attn_implementation == attn
    b = t.batch([QUESTIONS[2]], images[:1])
    x = t.layout(b)
    assert x.num_routing == 2 and t.model.routing_tokens.abs().sum() > 0   # routing tokens are in the sequence

    ref = base_logits(t.base, b)                                            # (1, S, V)
    assert_close(all_logits(t.model, b, "dense"), ref)
    with torch.no_grad():
        last, state = prefill(t.model, x, "dense")
    assert_close(last, ref[:, -1])
    assert state.run.all()


@pytest.mark.parametrize("attn", ATTN)
def test_dense_decode_logits_equal_transformers_recomputed(make_tiny, images, attn):
    """Each cached decode step gives the logits the base model gives on the whole sequence so far."""
    t = make_tiny(attn)
    b = t.batch([QUESTIONS[0]], images[:1])
    with torch.no_grad():
        logits, state = prefill(t.model, t.layout(b), "dense")
        ids = b.input_ids
        for _ in range(5):
            token = logits.argmax(-1)
            ids = torch.cat([ids, token[:, None]], 1)
            logits = decode_one_token(t.model, token, state)
            ref = t.base(input_ids=ids, pixel_values=b.pixel_values).logits[:, -1]
            assert_close(logits, ref)


@pytest.mark.parametrize("attn", ATTN)
def test_dense_greedy_generation_equals_transformers(make_tiny, images, hf_greedy, attn):
    t = make_tiny(attn)
    b = t.batch([QUESTIONS[0]], images[:1])
    gen = generate(t.model, b, "dense", max_new_tokens=N_NEW)
    assert len(gen.tokens[0]) == N_NEW
    assert gen.tokens == hf_greedy(t.base, b, N_NEW)


@pytest.mark.parametrize("attn", ATTN)
def test_left_padded_batch_equals_each_example_alone(make_tiny, images, hf_greedy, attn):
    t = make_tiny(attn)
    b = t.batch(QUESTIONS, images[:3])
    lengths = b.token_ok.sum(-1).tolist()
    assert len(set(lengths)) == 3                        # really padded
    gen = generate(t.model, b, "dense", max_new_tokens=N_NEW)
    batch_logits = all_logits(t.model, b, "dense")
    assert gen.tokens == hf_greedy(t.base, b, N_NEW)     # the base model on the same padded batch
    for k, (q, im) in enumerate(zip(QUESTIONS, images)):
        bk = t.batch([q], [im])
        alone = generate(t.model, bk, "dense", max_new_tokens=N_NEW).tokens[0]
        assert gen.tokens[k] == alone
        assert alone == hf_greedy(t.base, bk, N_NEW)[0]
        n = lengths[k]
        assert_close(batch_logits[k, -n:], all_logits(t.model, bk, "dense")[0])
        assert_close(batch_logits[k, -n:], base_logits(t.base, bk)[0])


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("last_turn_only", [True, False], ids=["one_text_rt", "rt_per_turn"])
def test_multi_turn_conversation_equals_transformers(make_tiny, images, hf_greedy, attn, last_turn_only):
    t = make_tiny(attn)
    b = t.batch(["How many squares?"], images[:1], histories=[HISTORY], last_turn_only=last_turn_only)
    assert t.layout(b).num_routing == (2 if last_turn_only else 4)   # image rt + one text rt per routed turn
    assert_close(all_logits(t.model, b, "dense"), base_logits(t.base, b))
    if last_turn_only:   # the inference layout
        assert generate(t.model, b, "dense", max_new_tokens=N_NEW).tokens == hf_greedy(t.base, b, N_NEW)


def test_batch_with_different_numbers_of_turns_equals_transformers(make_tiny, images):
    """Training layout: one text routing token per turn, examples with 1, 2 and 3 turns together."""
    t = make_tiny()
    histories = [(), HISTORY[:1], HISTORY]
    b = t.batch(QUESTIONS, images[:3], histories=histories, last_turn_only=False)
    assert b.question_keys.shape[1] == 3
    ours = all_logits(t.model, b, "dense")
    for k in range(3):
        bk = t.batch([QUESTIONS[k]], [images[k]], histories=[histories[k]], last_turn_only=False)
        n = bk.input_ids.shape[1]
        assert_close(ours[k, -n:], base_logits(t.base, bk)[0])


def test_stop_ids_end_each_answer_on_its_own(tiny, images):
    b = tiny.batch([QUESTIONS[0], QUESTIONS[2]], [images[0], images[2]])
    free = generate(tiny.model, b, "dense", max_new_tokens=N_NEW).tokens
    stop = free[1][3]
    assert stop not in free[1][:3] and stop not in free[0]
    gen = generate(tiny.model, b, "dense", max_new_tokens=N_NEW, stop_ids={stop})
    assert gen.tokens == [free[0], free[1][:3]]           # stop token excluded, the other answer goes on
    assert [tr.new_tokens for tr in gen.traces] == [N_NEW, 3]
    both = generate(tiny.model, b, "dense", max_new_tokens=N_NEW, stop_ids={stop, free[0][5]})
    assert both.tokens == [free[0][:free[0].index(free[0][5])], free[1][:3]]


def test_callback_streams_every_token(tiny, images):
    b = tiny.batch([QUESTIONS[0]], images[:1])
    seen = []
    gen = generate(tiny.model, b, "dense", max_new_tokens=6,
                   callback=lambda step, tok: seen.append((step, int(tok[0]))))
    assert seen == list(enumerate(gen.tokens[0]))
    assert gen.timing.new_tokens == 6 and gen.timing.total_s > 0
