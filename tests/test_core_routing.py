"""Routing under inference: the route is decided once at prefill and held; skipped layers never run
and hold no cache; mixed-route batches equal their examples alone; routing tokens are invisible to
ordinary tokens and see only what they route on; forced/auto routes and traces behave as documented."""
import math

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from conftest import QUESTIONS
from roe_core import RoEPipeline
from roe_core.systems.roe import all_logits, decode_one_token, generate, prefill

pytestmark = pytest.mark.usefixtures("one_thread")
ATTN = ["eager", "sdpa"]
L = 6
# three examples, three different routes: layer 0 mixed (FACTS: transformers reads cache length from
# layer 0), layer 1 run by all, layer 2 skipped by all, the rest mixed
MIXED = torch.tensor([[0, 1, 0, 1, 1, 0],
                      [1, 1, 0, 0, 1, 1],
                      [1, 1, 0, 1, 0, 1]], dtype=torch.bool)


class LayerCalls:
    """Forward hooks on the base decoder layers: (batch, seq) of every call, per layer."""

    def __init__(self, model):
        self.calls = {i: [] for i in range(model.num_layers)}
        self.handles = [layer.register_forward_hook(lambda m, args, out, i=i: self.calls[i].append(tuple(out.shape[:2])))
                        for i, layer in enumerate(model.layers)]

    def clear(self):
        for v in self.calls.values():
            v.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def greedy(model, x, route, n):
    """(prefill logits, [decode logits...], tokens (B, n), state) of n greedy steps."""
    with torch.no_grad():
        logits, state = prefill(model, x, route)
        steps, toks = [logits], []
        for k in range(n):
            toks.append(steps[-1].argmax(-1))
            if k + 1 < n:
                steps.append(decode_one_token(model, toks[-1], state))
    return steps, torch.stack(toks, 1), state


# --- the route is held --------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["auto", "mixed"])
def test_route_chosen_at_prefill_is_held_while_decoding(tiny, images, diversify_routers, route):
    b = tiny.batch(QUESTIONS, images[:3])
    diversify_routers(tiny, b)
    route = MIXED if route == "mixed" else "auto"
    with torch.no_grad():
        logits, state = prefill(tiny.model, tiny.layout(b), route)
    run = state.run.clone()
    assert run.any() and not run.all()                        # a real mix of run and skip
    assert not (run == run[:1]).all()                         # examples differ
    calls = LayerCalls(tiny.model)
    router_calls = []
    hooks = [r.register_forward_hook(lambda *a: router_calls.append(1)) for r in tiny.model.routers]
    steps = 4
    token = logits.argmax(-1)
    with torch.no_grad():
        for _ in range(steps):
            token = decode_one_token(tiny.model, token, state).argmax(-1)
    calls.remove()
    for h in hooks:
        h.remove()
    assert torch.equal(state.run, run)
    assert router_calls == []                                 # decoding never asks the routers again
    for i in range(L):
        n_run = int(run[:, i].sum())
        expected = [(n_run, 1)] * steps if n_run else []      # once per step, only the examples routed through it
        assert calls.calls[i] == expected, f"layer {i}"


def test_skipped_layers_hold_no_cache(tiny, images):
    b = tiny.batch(QUESTIONS, images[:3])
    x = tiny.layout(b)
    R, S = x.num_routing, b.input_ids.shape[1]
    steps = 3
    _, _, state = greedy(tiny.model, x, MIXED, steps + 1)    # steps decode calls after prefill
    cache = state.cache
    for i in range(L):
        n_run = int(MIXED[:, i].sum())
        if n_run == 0:
            assert cache.keys[i] is None and cache.values[i] is None
        else:
            assert cache.keys[i].shape[0] == n_run == cache.values[i].shape[0] == cache.batch_size(i)
            assert cache.seq_length(i) == R + S + steps
    assert cache.keys[2] is None                              # layer 2 is skipped by every example


# --- mixed batches ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ATTN)
def test_mixed_route_batch_equals_examples_one_by_one(make_tiny, images, attn):
    t = make_tiny(attn)
    n = 8
    b = t.batch(QUESTIONS, images[:3])
    steps, toks, _ = greedy(t.model, t.layout(b), MIXED, n)
    batch_all = all_logits(t.model, b, MIXED)
    gen = generate(t.model, b, MIXED, max_new_tokens=n)
    assert gen.tokens == toks.tolist()
    assert [tr.route for tr in gen.traces] == MIXED.tolist()
    for k in range(3):
        bk = t.batch([QUESTIONS[k]], [images[k]])
        steps_k, toks_k, state_k = greedy(t.model, t.layout(bk), MIXED[k].tolist(), n)
        assert toks[k].tolist() == toks_k[0].tolist()
        assert_close(torch.stack([s[k] for s in steps]), torch.stack([s[0] for s in steps_k]))
        s = bk.input_ids.shape[1]
        assert_close(batch_all[k, -s:], all_logits(t.model, bk, MIXED[k].tolist())[0])
        assert state_k.run[0].tolist() == MIXED[k].tolist()
    # and the routes matter: the dense answers differ
    assert not torch.allclose(batch_all, all_logits(t.model, b, "dense"))


def test_auto_routes_in_a_batch_equal_each_example_alone(tiny, images, diversify_routers):
    b = tiny.batch(QUESTIONS, images[:3])
    diversify_routers(tiny, b)
    gen = generate(tiny.model, b, "auto", max_new_tokens=8)
    routes = [tr.route for tr in gen.traces]
    assert len({tuple(r) for r in routes}) > 1                # the examples took different routes
    for k in range(3):
        alone = generate(tiny.model, tiny.batch([QUESTIONS[k]], [images[k]]), "auto", max_new_tokens=8)
        assert alone.traces[0].route == routes[k]
        assert alone.traces[0].p_run == pytest.approx(gen.traces[k].p_run, abs=1e-5)
        assert alone.tokens[0] == gen.tokens[k]


# --- forced routes -------------------------------------------------------------------------------------------

def test_all_true_route_equals_dense(tiny, images, diversify_routers):
    b = tiny.batch(QUESTIONS, images[:3])
    diversify_routers(tiny, b)                                # so that "auto" would skip layers
    dense = generate(tiny.model, b, "dense", max_new_tokens=8)
    forced = generate(tiny.model, b, [True] * L, max_new_tokens=8)
    auto = generate(tiny.model, b, "auto", max_new_tokens=8)
    assert forced.tokens == dense.tokens
    assert all(tr.route == [True] * L for tr in forced.traces + dense.traces)
    assert not all(tr.route == [True] * L for tr in auto.traces)
    assert [tr.route_mode for tr in (dense.traces[0], forced.traces[0], auto.traces[0])] == ["dense", "forced", "auto"]
    assert_close(all_logits(tiny.model, b, [True] * L), all_logits(tiny.model, b, "dense"))
    assert_close(all_logits(tiny.model, b, torch.ones(3, L, dtype=torch.bool)), all_logits(tiny.model, b, "dense"))


@torch.no_grad()
def hand_logits(model, ids, pixel_values, run):
    """Reference: the base model's own embeddings (image merged), then its decoder layers called one by
    one with a plain causal mask and no routing tokens, the adapter standing in where run[i] is False."""
    base, lm = model.base, model.lm
    seen = {}
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("x", kw["inputs_embeds"]), with_kwargs=True)
    base(input_ids=ids, pixel_values=pixel_values)
    h.remove()
    x = seen["x"]
    S = x.shape[1]
    pos_emb = lm.rotary_emb(x, position_ids=torch.arange(S)[None])
    mask = torch.full((S, S), torch.finfo(x.dtype).min).triu(1)[None, None]
    for i, layer in enumerate(lm.layers):
        x = layer(x, attention_mask=mask, position_embeddings=pos_emb) if run[i] else model.adapters[i](x)
    return base.lm_head(lm.norm(x))


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("skip", [[0], [2, 3], [5], list(range(L))], ids=lambda s: "skip" + "".join(map(str, s)))
def test_forced_skip_equals_hand_run_layers_with_adapter(make_tiny, images, attn, skip):
    t = make_tiny(attn)
    run = [i not in skip for i in range(L)]
    b = t.batch([QUESTIONS[0]], images[:1])
    ids, pix = b.input_ids, b.pixel_values
    # the reference is sound: with every layer it is the base model
    assert_close(hand_logits(t.model, ids, pix, [True] * L), t.base(input_ids=ids, pixel_values=pix).logits)

    calls = LayerCalls(t.model)
    ours = all_logits(t.model, b, run)
    assert_close(ours, hand_logits(t.model, ids, pix, run))
    assert not torch.allclose(ours, all_logits(t.model, b, "dense"), atol=1e-3)   # skipping changes the output

    calls.clear()
    n = 8
    gen = generate(t.model, b, run, max_new_tokens=n)
    for i in skip:
        assert calls.calls[i] == []                           # never called, prefill or decode
    for i in set(range(L)) - set(skip):
        assert len(calls.calls[i]) == n                       # prefill + n-1 decode steps
    calls.remove()
    # greedy decoding with the cache equals recomputing the hand reference on the whole sequence
    for tok in gen.tokens[0]:
        assert hand_logits(t.model, ids, pix, run)[0, -1].argmax().item() == tok
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)


# --- routing tokens -------------------------------------------------------------------------------------------

def test_routing_tokens_are_invisible_to_ordinary_tokens(tiny, images):
    b = tiny.batch(QUESTIONS, images[:3])
    x = tiny.layout(b)
    dense, mixed = all_logits(tiny.model, b, "dense"), all_logits(tiny.model, b, MIXED)
    tokens = generate(tiny.model, b, "dense", max_new_tokens=8).tokens
    with torch.no_grad():
        _, before = prefill(tiny.model, x, "dense")
        tiny.model.routing_tokens.add_(torch.randn_like(tiny.model.routing_tokens))
        _, after = prefill(tiny.model, tiny.layout(b), "dense")
    assert_close(all_logits(tiny.model, b, "dense"), dense, rtol=0, atol=0)
    assert_close(all_logits(tiny.model, b, MIXED), mixed, rtol=0, atol=0)
    assert generate(tiny.model, b, "dense", max_new_tokens=8).tokens == tokens
    assert (after.p_run - before.p_run).abs().max() > 1e-3     # ... but the routers see them


def test_layout_mask_routing_tokens_see_only_what_they_route_on(tiny, images):
    hist = [("What is in the picture?", "Two circles."), ("Which is larger?", "The red one.")]
    for last_turn_only in (True, False):
        b = tiny.batch(QUESTIONS[:2], images[:2], histories=[hist, ()], last_turn_only=last_turn_only)
        x = tiny.layout(b)
        R, S = x.num_routing, b.input_ids.shape[1]
        allowed = x.mask[:, 0] == 0                           # (B, R+S, R+S)
        convs = [tiny.enc.encode(hist + [(QUESTIONS[0], None)]), tiny.enc.encode([(QUESTIONS[1], None)])]
        for k, c in enumerate(convs):
            o = R + S - len(c.input_ids)                      # column of the example's first token
            img = {0} | set(range(o, o + c.image_end))
            assert set(allowed[k, 0].nonzero().flatten().tolist()) == img
            toks = tiny.enc.tokenizer.convert_ids_to_tokens(c.input_ids[:c.image_end])
            assert toks.count("<image>") == tiny.enc.num_image_tokens and "".join(toks).startswith("<s>USER: ")
            spans = c.question_spans[-1:] if last_turn_only else c.question_spans
            questions = [q for q, _ in hist] + [QUESTIONS[0]] if k == 0 else [QUESTIONS[1]]
            for t, (s, e) in enumerate(spans):
                assert set(allowed[k, 1 + t].nonzero().flatten().tolist()) == {1 + t} | set(range(o + s, o + e))
                text = "".join(tiny.enc.tokenizer.convert_ids_to_tokens(c.input_ids[s:e]))
                assert text == (questions[-1] if last_turn_only else questions[t])
            assert not allowed[k, R:, :R].any()              # no ordinary token reads a routing token
            assert not allowed[k, o:, R:o].any()             # nor a pad (pad rows see only themselves)


def test_router_reads_only_image_and_question(tiny, images):
    """Behaviour of the mask: layer 1's router (which reads the routing tokens after one layer of
    attention) depends on the image and the last question only: not on earlier turns (same length)."""
    q = "Which is larger?"

    def p_run(history, question=q, image=images[0]):
        b = tiny.batch([question], [image], histories=[history])
        with torch.no_grad():
            return prefill(tiny.model, tiny.layout(b), "dense")[1].p_run[0]

    h1 = [("What is in the picture?", "Two circles.")]
    h2 = [("Where is the red shape?", "At the top..")]       # same lengths: same positions
    a, b = p_run(h1), p_run(h2)
    assert_close(a[:2], b[:2])
    assert (a[2:] - b[2:]).abs().max() > 1e-6               # deeper routers do see the context (through the question)
    assert (p_run(h1, question="Which is smaller").sub(a)[1]).abs() > 1e-6
    assert (p_run(h1, image=images[1]).sub(a)[1]).abs() > 1e-6


# --- router and adapter, by hand --------------------------------------------------------------------------

def test_router_reads_routing_tokens_after_the_input_norm(tiny, images):
    """Layer 0's router sees the bare routing tokens (nothing has mixed into them yet): its p_run is
    softmax(W [norm(img_rt); norm(txt_rt)])[run], the same for every input."""
    b = tiny.batch(QUESTIONS, images[:3])
    with torch.no_grad():
        _, state = prefill(tiny.model, tiny.layout(b), "dense")
        norm = tiny.model.layers[0].input_layernorm
        rt = tiny.model.routing_tokens
        logits = tiny.model.routers[0].proj.weight @ torch.cat([norm(rt[0]), norm(rt[1])])   # [run, skip]
    assert_close(state.p_run[:, 0], logits.softmax(-1)[0].expand(3))
    assert not torch.allclose(state.p_run[:, 1], state.p_run[:1, 1].expand(3))   # deeper ones depend on the input


def test_skip_adapter_is_x_plus_up_relu_down_norm(tiny):
    a = tiny.model.adapters[3]
    with torch.no_grad():
        a.norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(2, 5, 32) * 3
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.norm.eps) * a.norm.weight
        want = x + torch.relu(normed @ a.down.weight.T) @ a.up.weight.T
        assert_close(a(x), want)
    assert a.down.weight.shape == (8, 32) and a.up.weight.shape == (32, 8)      # r = d / 4
    assert a.down.bias is None and a.up.bias is None


# --- auto routes, thresholds, bad routes -----------------------------------------------------------------

def test_auto_route_runs_a_layer_iff_p_run_exceeds_threshold(tiny, images, diversify_routers):
    b = tiny.batch(QUESTIONS, images[:3])
    diversify_routers(tiny, b)
    for thr in (None, 0.3, 0.7):
        gen = generate(tiny.model, b, "auto", max_new_tokens=2, threshold=thr)
        for tr in gen.traces:
            assert tr.threshold == (0.5 if thr is None else thr)
            assert tr.route == [p > tr.threshold for p in tr.p_run]
            assert all(0.0 <= p <= 1.0 for p in tr.p_run)


def test_threshold_zero_runs_everything_and_one_runs_nothing(tiny, images, diversify_routers):
    b = tiny.batch(QUESTIONS, images[:3])
    diversify_routers(tiny, b)
    everything = generate(tiny.model, b, "auto", max_new_tokens=6, threshold=0.0)
    nothing = generate(tiny.model, b, "auto", max_new_tokens=6, threshold=1.0)
    assert all(tr.route == [True] * L for tr in everything.traces)
    assert everything.tokens == generate(tiny.model, b, "dense", max_new_tokens=6).tokens
    assert all(tr.route == [False] * L and tr.layers_executed == 0 for tr in nothing.traces)
    assert nothing.tokens == generate(tiny.model, b, [False] * L, max_new_tokens=6).tokens


@pytest.mark.parametrize("route, message", [
    ("fast", "'auto', 'dense'"),
    ("", "'auto', 'dense'"),
    ([True] * (L - 1), f"{L} booleans"),
    ([True] * (L + 1), f"{L} booleans"),
    (torch.ones(2, L, dtype=torch.bool), f"{L} booleans"),       # batch of 3
    (torch.ones(3, L, 1, dtype=torch.bool), f"{L} booleans"),
])
def test_bad_route_raises_value_error(tiny, images, route, message):
    b = tiny.batch(QUESTIONS, images[:3])
    with pytest.raises(ValueError, match=message):
        generate(tiny.model, b, route, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        all_logits(tiny.model, b, route)


# --- traces -----------------------------------------------------------------------------------------------------

def test_trace_l1_is_the_documented_distance(tiny, images):
    b = tiny.batch([QUESTIONS[2]], images[:1])
    R = tiny.layout(b).num_routing
    seen = []
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
             for layer in tiny.model.layers]
    gen = generate(tiny.model, b, "dense", max_new_tokens=1, trace_l1=True)
    for h in hooks:
        h.remove()
    assert len(seen) == L
    expected = [(o[0, R:] - i[0, R:]).abs().mean().item() for i, o in seen]   # mean over tokens of mean_j |out - in|
    assert gen.traces[0].l1 == pytest.approx(expected, rel=1e-5)


def test_trace_fields(tiny, images, diversify_routers):
    b = tiny.batch(QUESTIONS, images[:3])
    diversify_routers(tiny, b)
    gen = generate(tiny.model, b, "auto", max_new_tokens=5, trace_l1=True)
    for tr, toks in zip(gen.traces, gen.tokens):
        assert len(tr.route) == len(tr.p_run) == len(tr.l1) == L
        assert all(math.isfinite(v) and v >= 0 for v in tr.l1)
        assert tr.layers_executed == sum(tr.route)
        assert tr.adapters_used == [i for i, r in enumerate(tr.route) if not r]
        assert tr.skip_ratio == pytest.approx(1 - sum(tr.route) / L)
        assert tr.new_tokens == len(toks)
        d = tr.to_dict()
        assert d["route"] == tr.route and d["layers_executed"] == tr.layers_executed
        assert d["timing"]["total_s"] == pytest.approx(tr.timing.prefill_s + tr.timing.decode_s)
    assert generate(tiny.model, b, "auto", max_new_tokens=2).traces[0].l1 is None   # not traced unless asked
    for k in range(3):                                   # pads and routing tokens do not count
        alone = generate(tiny.model, tiny.batch([QUESTIONS[k]], [images[k]]), "auto", max_new_tokens=1, trace_l1=True)
        assert alone.traces[0].l1 == pytest.approx(gen.traces[k].l1, rel=1e-4)


def test_pipeline_dense_trace_l1_equals_l1_dense():
    pipe = RoEPipeline.load("tiny", device="cpu", fresh=True)
    img = Image.new("RGB", (20, 12), (200, 40, 40))
    dense = pipe.answer(img, "What colour is it?", route="dense", max_new_tokens=4)
    assert dense.trace.l1_dense is not None and len(dense.trace.l1_dense) == pipe.model.num_layers
    assert dense.trace.l1 == pytest.approx(dense.trace.l1_dense, rel=1e-6)
    skip = [i != 2 for i in range(pipe.model.num_layers)]
    routed = pipe.answer(img, "What colour is it?", route=skip, max_new_tokens=4)
    assert routed.trace.route == skip and routed.trace.layers_executed == pipe.model.num_layers - 1
    assert routed.trace.l1_dense == pytest.approx(dense.trace.l1_dense, rel=1e-6)
    assert routed.trace.l1[:2] == pytest.approx(dense.trace.l1[:2], rel=1e-6)   # identical up to the skipped layer
    assert routed.trace.l1[2] != pytest.approx(dense.trace.l1[2], rel=1e-3)
    with pytest.raises(ValueError, match="booleans"):
        pipe.answer(img, "What colour is it?", route=[True] * 3)
