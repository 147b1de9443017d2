"""RoE checkpoints (roe_config.json + roe.safetensors) and model loading: round trips, clear errors,
and a LLaVA folder written with the standard save_pretrained calls."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import LlavaForConditionalGeneration

from conftest import QUESTIONS
from roe_core import ModelLoadError, RoEConfig, RoEModel, RoEPipeline
from roe_core.systems.roe import all_logits, generate
from roe_core.runtime.loading import load_llava
from roe_core.systems.roe import CONFIG_NAME, WEIGHTS_NAME
from roe_core.runtime.tiny import tiny_llava, tiny_llava_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def trained_like(tiny, images, diversify_routers):
    """A tiny RoE model whose routers take different, non-trivial routes (as if trained)."""
    b = tiny.batch(QUESTIONS, images[:3])
    diversify_routers(tiny, b)
    return tiny, b


def test_save_and_load_round_trip(trained_like, tmp_path):
    t, b = trained_like
    t.model.save_roe(tmp_path / "roe")
    fresh_base = tiny_llava(seed=0)[0]                     # the same base, loaded again
    torch.manual_seed(123)                                 # fresh RoE parts would differ
    loaded = RoEModel.from_roe_folder(fresh_base, tmp_path / "roe")
    assert loaded.config == t.model.config
    for k, v in t.model.roe_state_dict().items():
        assert torch.equal(loaded.roe_state_dict()[k], v), k

    before = generate(t.model, b, "auto", max_new_tokens=6, trace_l1=True)
    after = generate(loaded, b, "auto", max_new_tokens=6, trace_l1=True)
    routes = [tr.route for tr in before.traces]
    assert any(not all(r) for r in routes) and any(any(r) for r in routes)    # non-trivial
    assert len({tuple(r) for r in routes}) > 1
    assert [tr.route for tr in after.traces] == routes
    assert [tr.p_run for tr in after.traces] == [tr.p_run for tr in before.traces]
    assert after.tokens == before.tokens
    assert_close(all_logits(loaded, b, "auto"), all_logits(t.model, b, "auto"), rtol=0, atol=0)


def test_a_packed_folder_loads_the_same_parts(trained_like, tmp_path):
    """What ships is stored packed (runtime.weights.pack_file, embedded.pack_assets): a RoE folder whose
    weights and route guard are xz-packed loads the same parts, guard and routes."""
    from roe_core.embedded.base import pack_assets
    from roe_core.systems.roe import layout_batch
    from roe_core.systems.route_guard import RouteGuard
    t, b = trained_like
    guard = RouteGuard.fit(t.model, [layout_batch(t.model, b)])
    guard.tau = guard.quantile_tau(0.5)
    t.model.guard = guard
    try:
        t.model.save_roe(tmp_path / "roe")
        before = generate(t.model, b, "auto", max_new_tokens=4)
    finally:
        t.model.guard = None
    packed = pack_assets(tmp_path, min_bytes=0)
    assert {name for name, _, _ in packed} == {f"roe/{WEIGHTS_NAME}", "roe/guard.safetensors"}
    assert not list((tmp_path / "roe").glob("*.safetensors"))
    loaded = RoEModel.from_roe_folder(tiny_llava(seed=0)[0], tmp_path / "roe")
    assert loaded.guard is not None and loaded.guard.tau == guard.tau
    assert torch.equal(loaded.guard.mean, guard.mean) and torch.equal(loaded.guard.train_dist, guard.train_dist)
    for k, v in t.model.roe_state_dict().items():
        assert torch.equal(loaded.roe_state_dict()[k], v), k
    after = generate(loaded, b, "auto", max_new_tokens=4)
    assert after.tokens == before.tokens and [tr.route for tr in after.traces] == [tr.route for tr in before.traces]


def test_folder_layout_and_config(tmp_path):
    base, tok, proc = tiny_llava(seed=0)
    base.save_pretrained(tmp_path / "llava")
    loaded_base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    model = RoEModel(loaded_base, rho=0.25)
    model.save_roe(tmp_path / "roe")
    assert sorted(p.name for p in (tmp_path / "roe").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    cfg = json.loads((tmp_path / "roe" / CONFIG_NAME).read_text())
    assert cfg["base_model"] == str(tmp_path / "llava")    # names the base it belongs to
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["adapter_rank"], cfg["rho"]) == (6, 32, 8, 0.25)
    assert RoEConfig.load(tmp_path / "roe") == model.config
    weights = load_file(str(tmp_path / "roe" / WEIGHTS_NAME))
    assert not any(k.startswith("base.") for k in weights)  # only the RoE parts
    assert set(weights) == set(model.roe_state_dict())
    assert {k.split(".")[0] for k in weights} == {"routers", "adapters", "routing_tokens"}
    assert weights["routing_tokens"].shape == (2, 32)


def test_parts_load_in_the_base_models_dtype(tiny, tmp_path):
    tiny.model.save_roe(tmp_path)
    base16 = tiny_llava(seed=0)[0].to(torch.bfloat16)
    loaded = RoEModel.from_roe_folder(base16, tmp_path)
    assert {p.dtype for p in loaded.roe_parameters()} == {torch.bfloat16}
    assert_close(loaded.routing_tokens.float(), tiny.model.routing_tokens, atol=1e-2, rtol=1e-2)


def test_overrides_may_name_the_base_model(tiny):
    """A base built in memory has no _name_or_path; the caller must be able to say what it is."""
    model = RoEModel(tiny.base, base_model="tiny", rho=0.2)
    assert model.config.base_model == "tiny" and model.config.rho == 0.2


@pytest.mark.parametrize("num_layers, hidden", [(4, 32), (8, 32), (6, 64)])
def test_loading_onto_a_different_base_raises(tiny, tmp_path, num_layers, hidden):
    tiny.model.save_roe(tmp_path)
    other = LlavaForConditionalGeneration(tiny_llava_config(num_layers=num_layers, hidden=hidden)).eval()
    with pytest.raises(ValueError, match=rf"6 layers of width 32.*{num_layers} layers of width {hidden}"):
        RoEModel.from_roe_folder(other, tmp_path)


def test_missing_or_broken_folders_raise(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="roe_config.json"):
        RoEModel.from_roe_folder(tiny.base, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="roe_config.json"):
        RoEModel.from_roe_folder(tiny.base, tmp_path)       # exists, but empty
    tiny.model.save_roe(tmp_path)
    (tmp_path / WEIGHTS_NAME).rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        RoEModel.from_roe_folder(tiny.base, tmp_path)
    state = load_file(str(tmp_path / "elsewhere.safetensors"))
    state.pop("routers.3.proj.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing \['routers.3.proj.weight'\], unexpected \['extra.weight'\]"):
        RoEModel.from_roe_folder(tiny.base, tmp_path)


def test_pipeline_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="/does/not/exist"):
        RoEPipeline.load("tiny", roe="/does/not/exist", device="cpu")
    with pytest.raises(ModelLoadError, match="/no/such/path"):
        load_llava("/no/such/path", torch.device("cpu"), torch.float32)
    with pytest.raises(ModelLoadError, match="/no/such/path"):
        RoEPipeline.load("/no/such/path", device="cpu")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_llava(str(tmp_path), torch.device("cpu"), torch.float32)    # a folder, but not a model
    with pytest.raises(ModelLoadError, match="dtype"):
        RoEPipeline.load("tiny", device="cpu", dtype="float13")


def test_pipeline_loads_its_roe_folder(trained_like, tmp_path):
    t, _ = trained_like
    t.model.save_roe(tmp_path)
    pipe = RoEPipeline.load("tiny", roe=str(tmp_path), device="cpu")
    assert pipe.info["parts"] == str(tmp_path)
    for k, v in t.model.roe_state_dict().items():
        assert torch.equal(pipe.model.roe_state_dict()[k], v), k


def test_local_llava_folder_loads_and_answers(tmp_path):
    """A LLaVA folder written by save_pretrained (model, tokenizer, image processor) loads through the
    same path as a hub id, and answers exactly as the same model built in memory."""
    base, tok, proc = tiny_llava(seed=0)
    for part in (base, tok, proc):
        part.save_pretrained(tmp_path)
    pipe = RoEPipeline.load(str(tmp_path), device="cpu", seed=0, fresh=True)
    ref = RoEPipeline.load("tiny", device="cpu", seed=0, fresh=True)
    assert pipe.model.config.base_model == str(tmp_path)
    assert pipe.encoder.num_image_tokens == ref.encoder.num_image_tokens == 16
    assert pipe.encoder.stop_ids == ref.encoder.stop_ids == {tok.eos_token_id}

    img = Image.new("RGB", (24, 16), (30, 160, 220))
    got = pipe.answer(img, "What colour is the sky?", history=[("Hi?", "Hello.")], max_new_tokens=8)
    want = ref.answer(img, "What colour is the sky?", history=[("Hi?", "Hello.")], max_new_tokens=8)
    assert got.text == want.text and got.trace.route == want.trace.route
    assert len(got.trace.route) == 6 and len(got.trace.l1) == 6 and got.trace.new_tokens > 0
    b = pipe.batch([(img, "What colour is the sky?", ())])
    with torch.no_grad():
        assert_close(all_logits(pipe.model, b, "dense"),
                     base(input_ids=b.input_ids, pixel_values=b.pixel_values).logits)
