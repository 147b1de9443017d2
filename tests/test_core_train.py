"""Training: the three-stage schedule, the loss, end-to-end steps, resume."""
import json
import math

import pytest
import torch

from roe_core import scenes
from roe_core.runtime.conversation import ConversationEncoder
from roe_core.systems.roe import RoEModel
from roe_core.runtime.tiny import tiny_llava
from roe_core.train import LlavaJsonDataset, RouteSchedule, TrainConfig, roe_loss, set_trainable, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    path = scenes.export_llava_json("train", 8, out, image_size=32)
    return path, out / "images"


def fresh(seed=0):
    base, tok, proc = tiny_llava(seed=seed)
    torch.manual_seed(seed)
    return RoEModel(base), ConversationEncoder.for_model(base, tok, proc)


def test_schedule_follows_the_method():
    cfg = TrainConfig(steps=1000, rho=0.3)
    s = RouteSchedule(cfg)
    assert [s.stage(k) for k in (0, 299, 300, 499, 500, 999)] == [0, 0, 1, 1, 2, 2]
    assert s.temperature(300) == pytest.approx(10.0)
    assert s.temperature(305) == pytest.approx(9.5)           # every 0.5% of training: T *= 0.95
    assert 0.005 < s.temperature(999) < 0.02                    # ~0.01 at the end
    assert s.bias(310) == pytest.approx(s.b0 * 0.85 ** 2)       # b *= 0.85 in stage 1
    assert s.bias(600) == 0.0                                   # b = 0 in stage 2
    # stage 0: random hard routes with P(skip) = (1 - b)^2 / 2 = rho
    w = s.weights(torch.zeros(200_000, 1, 2), step=0)
    assert set(w.unique().tolist()) <= {0.0, 1.0}
    assert w.mean().item() == pytest.approx(0.3, abs=0.01)


def test_stage2_takes_the_inference_route_with_straight_through_gradients():
    s = RouteSchedule(TrainConfig(steps=1000, rho=0.3))
    logits = torch.tensor([[[0.3, 0.0], [0.0, 0.3], [2.0, 2.0]]], requires_grad=True)   # (1, 3, 2) [run, skip]
    w = s.weights(logits, step=700)
    # value: exactly the inference decision (skip iff p_run <= 0.5, i.e. not logit_run > logit_skip)
    assert w.tolist() == [[0.0, 1.0, 1.0]]
    # gradient: that of the annealed softmax, not zero as through a plain threshold
    w.sum().backward()
    T = s.temperature(700)
    p = ((logits.detach() / T).softmax(-1))[..., 1]
    torch.testing.assert_close(logits.grad[..., 1], p * (1 - p) / T)
    # soft mixing when asked (the release's way); stage 1 is always soft
    soft = RouteSchedule(TrainConfig(steps=1000, rho=0.3, hard_routes=False)).weights(logits.detach(), step=700)
    assert 0.0 < soft[0, 0].item() < 0.5 < soft[0, 1].item() < 1.0 and soft[0, 2].item() == pytest.approx(0.5)
    assert 0.0 < s.weights(torch.tensor([[[0.01, 0.0]]]), step=400).item() < 1.0


def test_what_each_stage_trains():
    model, _ = fresh()
    backbone = list(model.lm.parameters())

    def trainable():
        return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    set_trainable(model, 0, backbone)
    assert trainable() == {"adapters"}
    set_trainable(model, 1, backbone)
    assert trainable() == {"adapters", "routers", "routing_tokens"}
    set_trainable(model, 2, backbone)
    assert trainable() == {"adapters", "routers", "routing_tokens", "base"}
    set_trainable(model, 2, backbone, routers_only=True)
    assert trainable() == {"routers", "routing_tokens"}


def test_dataset_reads_llava_json(toy_data):
    path, images = toy_data
    ds = LlavaJsonDataset(path, images)
    image, turns = ds[0]
    assert image.mode == "RGB" and len(turns) >= 1
    assert all("<image>" not in q for q, _ in turns)
    records = json.loads(path.read_text())
    assert turns[0][1] == records[0]["conversations"][1]["value"]


def test_training_lowers_the_loss_and_resumes(toy_data, tmp_path):
    path, images = toy_data
    model, enc = fresh()
    ds = LlavaJsonDataset(path, images)
    batch = enc.collate([enc.encode(t) for _, t in ds.items], [ds[i][0] for i in range(len(ds))])
    dense = lambda i, lg: torch.zeros(lg.shape[:2])              # noqa: E731  every layer runs
    with torch.no_grad():
        before = roe_loss(model, batch, dense, 0.3, 1.0)["ce"].item()
    # soft routes: the loss checked below is the dense one, which hard routes do not train directly
    cfg = TrainConfig(steps=12, batch_size=8, lr=3e-3, backbone_lr=3e-3, save_every=6, log_every=3,
                      stage1_start=0.0, stage2_start=0.0, hard_routes=False)
    train(model, enc, ds, cfg, tmp_path, progress=False)
    with torch.no_grad():
        after = roe_loss(model, batch, dense, 0.3, 1.0)["ce"].item()
    assert after < before - 0.05
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["step"] == 12
    assert {"roe_config.json", "roe.safetensors", "optimizer.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    # resume: a fresh model picks up the saved parts and optimizer and runs only the missing steps
    model2, _ = fresh(seed=1)
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 15})
    log = train(model2, enc, ds, cfg2, tmp_path, resume=True, progress=False)
    assert [r["step"] for r in log] == [15]
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 12, 15]


def test_sparsity_hinge_moves_skip_ratio_toward_target(toy_data):
    path, images = toy_data
    model, enc = fresh()
    ds = LlavaJsonDataset(path, images)
    batch = enc.collate([enc.encode(t) for _, t in ds.items], [ds[i][0] for i in range(len(ds))])
    # routers start far from the target: a +3 bias on the run logit, P(skip) ~ 0.05
    biased = lambda i, lg: (lg.float() + torch.tensor([3.0, 0.0])).softmax(-1)[..., 1]  # noqa: E731
    with torch.no_grad():
        s0 = roe_loss(model, batch, biased, 0.3, 1.0)
    # lambda * exp(-5 CE) is ~1e-10 for a random model; scale lambda so the hinge has weight ~1
    lam = math.exp(5 * s0["ce"].item())
    opt = torch.optim.AdamW(list(model.routers.parameters()) + [model.routing_tokens], lr=5e-2)
    for _ in range(15):
        stats = roe_loss(model, batch, biased, 0.3, lam)
        stats["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert s0["skip_ratio"].item() < 0.1
    assert stats["skip_ratio"].item() > s0["skip_ratio"].item() + 0.05
    assert stats["sparsity"].item() < s0["sparsity"].item()


def whole_toy_batch(toy_data):
    """A fresh tiny RoE model and every toy conversation in one batch: (model, batch, layout, B, T turns)."""
    from roe_core.systems.roe import layout_batch
    path, images = toy_data
    model, enc = fresh()
    ds = LlavaJsonDataset(path, images)
    batch = enc.collate([enc.encode(t) for _, t in ds.items], [ds[i][0] for i in range(len(ds))])
    x = layout_batch(model, batch)
    return model, batch, x, batch.input_ids.shape[0], x.num_routing - 1


def test_per_turn_sparsity_weights_each_turn_by_its_own_ce(toy_data):
    """The hinge's gradient on a turn's skip weight is -exp(-5 CE_turn) / (turns * B) per turn, and
    -exp(-5 CE_sample) / (turns * B) for every turn of the sample in the method's per-sample form."""
    import torch.nn.functional as F
    model, batch, x, B, T = whole_toy_batch(toy_data)
    n_turns = (batch.turn_ids.max(1).values + 1).clamp(min=1)
    assert n_turns.max() > 1, "the toy data needs a multi-turn sample"

    # the CE of each turn (and sample), computed apart from roe_loss
    with torch.no_grad():
        h, _, _ = model.soft_forward(x, lambda i, lg: torch.full((B, T), 0.1))
        b, q = batch.answer_mask[:, 1:].nonzero(as_tuple=True)
        tok = F.cross_entropy(model.base.lm_head(h[b, q]).float(), batch.input_ids[b, q + 1], reduction="none")
        turn = batch.turn_ids[b, q + 1]
    scale = math.exp(5 * tok.mean().item())    # exp(-5 CE) is tiny for a random model: bring it near 1

    def hinge_grad(per_turn):
        grads = []
        for lam in (0.0, scale):
            p = torch.full((B, T), 0.1, requires_grad=True)
            roe_loss(model, batch, lambda i, lg: p, 0.3, lam, per_turn=per_turn)["loss"].backward()
            grads.append(p.grad.clone())
        return (grads[1] - grads[0]) / scale
    g_turn, g_sample = hinge_grad(True), hinge_grad(False)
    differ = False
    for i in range(B):
        ce_i = tok[b == i].mean()
        expect_sample = -torch.exp(-5 * ce_i) / (n_turns[i] * B)
        for t in range(int(n_turns[i])):
            ce_t = tok[(b == i) & (turn == t)].mean()
            expect_turn = -torch.exp(-5 * ce_t) / (n_turns[i] * B)
            assert g_turn[i, t].item() * scale == pytest.approx(expect_turn.item() * scale, rel=2e-2)
            assert g_sample[i, t].item() * scale == pytest.approx(expect_sample.item() * scale, rel=2e-2)
            differ |= abs(g_turn[i, t].item() - g_sample[i, t].item()) > 0.05 * abs(g_sample[i, t].item())
        assert torch.all(g_turn[i, int(n_turns[i]):] == 0)
    assert differ, "with multi-turn samples the two forms must differ somewhere"


def test_per_turn_ce_weighs_every_turn_the_same(toy_data):
    """per_turn_ce: a sample's CE is the mean of its turns' token-mean CEs (not the mean over all its
    answer tokens), computed here apart from roe_loss; the two forms differ on multi-turn samples."""
    import torch.nn.functional as F
    model, batch, x, B, T = whole_toy_batch(toy_data)
    fixed = lambda i, lg: torch.full((B, T), 0.2)   # noqa: E731
    with torch.no_grad():
        h, _, _ = model.soft_forward(x, fixed)
        b, q = batch.answer_mask[:, 1:].nonzero(as_tuple=True)
        tok = F.cross_entropy(model.base.lm_head(h[b, q]).float(), batch.input_ids[b, q + 1], reduction="none")
        turn = batch.turn_ids[b, q + 1]
        by_turn = [torch.stack([tok[(b == i) & (turn == t)].mean() for t in turn[b == i].unique()]).mean()
                   for i in range(B)]
        by_token = [tok[b == i].mean() for i in range(B)]
        got = roe_loss(model, batch, fixed, 0.3, 0.0, per_turn_ce=True)
        plain = roe_loss(model, batch, fixed, 0.3, 0.0)
    assert got["ce"].item() == pytest.approx(torch.stack(by_turn).mean().item(), rel=1e-4)
    assert got["loss"].item() == pytest.approx(got["ce"].item(), rel=1e-6)     # lam = 0: the loss is the CE
    assert plain["ce"].item() == pytest.approx(torch.stack(by_token).mean().item(), rel=1e-4)
    assert abs(got["ce"].item() - plain["ce"].item()) > 1e-4, "multi-turn samples must tell the forms apart"


def _token_ce(model, batch, x, w_skip):
    """(per-answer-token CE, sample index, logits) on a fixed route, computed apart from roe_loss."""
    import torch.nn.functional as F
    h, _, _ = model.soft_forward(x, lambda i, lg: w_skip)
    b, q = batch.answer_mask[:, 1:].nonzero(as_tuple=True)
    logits = model.base.lm_head(h[b, q]).float()
    return F.cross_entropy(logits, batch.input_ids[b, q + 1], reduction="none"), b, logits


def test_rho_max_lets_easy_samples_skip_beyond_rho(toy_data):
    """--rho-max: the hinge target is rho + (rho_max - rho) exp(-5 CE_i) per sample, checked against
    that formula by hand on a model first fitted to the toy batch (so some CE_i are small and the
    targets differ from rho); rho_max <= rho is the method's loss exactly."""
    model, batch, x, B, T = whole_toy_batch(toy_data)
    s = 0.1
    fixed = lambda i, lg: torch.full((B, T), s)   # noqa: E731
    params = list(model.base.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=2e-2)
    for _ in range(100):       # overfit the 8 conversations: CE_i spread out, some near 0
        roe_loss(model, batch, fixed, 0.3, 0.0)["loss"].backward()
        opt.step()
        opt.zero_grad()
    rho, rho_max, lam = 0.3, 0.8, 2.0
    with torch.no_grad():
        from roe_core.systems.roe import layout_batch
        tok, b, _ = _token_ce(model, batch, layout_batch(model, batch), torch.full((B, T), s))
        ce = torch.stack([tok[b == i].mean() for i in range(B)])
        target = rho + (rho_max - rho) * torch.exp(-5 * ce)
        expect = (ce + lam * torch.exp(-5 * ce) * (target - s).clamp(min=0)).mean()
        got = roe_loss(model, batch, fixed, rho, lam, rho_max=rho_max)
        method = roe_loss(model, batch, fixed, rho, lam)
        same = roe_loss(model, batch, fixed, rho, lam, rho_max=rho)
    assert ce.min().item() < 0.3, "the fitted model must have easy samples"
    assert got["loss"].item() == pytest.approx(expect.item(), rel=1e-4)
    assert got["sparsity"].item() == pytest.approx((target - s).mean().item(), rel=1e-4)
    assert got["loss"].item() > method["loss"].item() + 1e-3     # easy samples are pushed further
    assert same["loss"].item() == pytest.approx(method["loss"].item(), rel=1e-6)


def test_distillation_is_the_kl_to_the_dense_path(toy_data):
    """--distill: + w * KL(p_dense || p_routed) over answer tokens, computed by hand here; zero when
    every layer runs, positive when layers are skipped through (untrained) adapters."""
    import torch.nn.functional as F
    model, batch, x, B, T = whole_toy_batch(toy_data)
    with torch.no_grad():
        _, _, dense_logits = _token_ce(model, batch, x, torch.zeros(B, T))
        skip_half = lambda i, lg: torch.full((B, T), float(i % 2))   # noqa: E731  (every other layer skipped)
        h, _, _ = model.soft_forward(x, skip_half)
        b, q = batch.answer_mask[:, 1:].nonzero(as_tuple=True)
        routed_logits = model.base.lm_head(h[b, q]).float()
        pd, lr_ = F.log_softmax(dense_logits, -1), F.log_softmax(routed_logits, -1)
        kl = (pd.exp() * (pd - lr_)).sum(-1).mean()
        plain = roe_loss(model, batch, skip_half, 0.3, 1.0)
        got = roe_loss(model, batch, skip_half, 0.3, 1.0, distill=0.5)
        dense = roe_loss(model, batch, lambda i, lg: torch.zeros(B, T), 0.3, 1.0, distill=0.5)
    assert kl.item() > 1e-4
    assert got["kl"].item() == pytest.approx(kl.item(), rel=1e-4)
    assert got["loss"].item() == pytest.approx(plain["loss"].item() + 0.5 * kl.item(), rel=1e-5)
    assert dense["kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_train_cli_dispatches_through_the_registry(capsys):
    """python -m roe_core.train --system NAME runs the registry's trainer for NAME; a system without one
    is a clear error naming those that have one."""
    import importlib
    from roe_core.systems import registry
    cli = importlib.import_module("roe_core.train.__main__")
    with pytest.raises(SystemExit) as e:
        cli.main(["--system", "dense"])
    with_trainer = [n for n, s in registry.SYSTEMS.items() if s.trainer]
    assert "dense" not in with_trainer and all(n in str(e.value) for n in with_trainer)
    with pytest.raises(SystemExit) as e:
        cli.main(["--system=moe_llava", "--help"])
    assert e.value.code == 0 and "--system moe_llava" in capsys.readouterr().out
