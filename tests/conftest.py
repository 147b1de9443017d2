"""Shared fixtures: a tiny random LLaVA wrapped in RoE, its encoder, a few images, reference helpers."""
from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig

from roe_core.runtime.conversation import Batch, ConversationEncoder
from roe_core.systems.roe import DecoderInputs, RoEModel
from roe_core.runtime.tiny import tiny_llava

# different lengths on purpose: a batch of them is left padded
QUESTIONS = ["What colour is the circle?", "How many?", "Is there a large red square left of the small blue circle?"]


@dataclass
class Tiny:
    model: RoEModel
    enc: ConversationEncoder

    @property
    def base(self):
        return self.model.base

    def batch(self, questions, images, histories=None, last_turn_only=True) -> Batch:
        histories = histories or [()] * len(questions)
        convs = [self.enc.encode(list(h) + [(q, None)]) for q, h in zip(questions, histories)]
        return self.enc.collate(convs, images, last_turn_only=last_turn_only)

    def layout(self, b: Batch) -> DecoderInputs:
        return self.model.layout(b.input_ids, b.token_ok, b.turn_ids, b.image_keys, b.question_keys, b.pixel_values)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP oversubscription
    makes them 10x slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_tiny():
    """make_tiny(attn="sdpa", seed=0, num_layers=6) -> Tiny: fresh random base + fresh RoE parts, fp32, eval."""
    def make(attn: str = "sdpa", seed: int = 0, num_layers: int = 6) -> Tiny:
        base, tok, proc = tiny_llava(num_layers=num_layers, seed=seed, attn_implementation=attn)
        torch.manual_seed(seed)
        return Tiny(RoEModel(base), ConversationEncoder.for_model(base, tok, proc))
    return make


@pytest.fixture
def tiny(make_tiny) -> Tiny:
    return make_tiny()


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Four different 16x16 RGB noise images (the processor resizes them to 8x8)."""
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()) for _ in range(4)]


@torch.no_grad()
def _diversify_routers(t: Tiny, b: Batch, scale: float = 3.0) -> None:
    """Random routers barely tell examples apart (the routing tokens' own vectors dominate their
    hidden states). Point each router along the spread of its inputs over batch `b` with no offset,
    so the examples of `b` take different routes under "auto"."""
    from roe_core.systems.roe import prefill

    seen = {}
    hooks = [r.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, torch.cat(inp, -1).flatten(0, -2)))
             for i, r in enumerate(t.model.routers)]
    prefill(t.model, t.layout(b), "dense")
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(1)
    for i, r in enumerate(t.model.routers):
        z = seen[i].float()                              # (B*T, 2d) router inputs
        mean, dz = z.mean(0), z - z.mean(0)
        u = dz.T @ torch.randn(z.shape[0], generator=g)  # a direction inside the spread
        u = u - (u @ mean) / (mean @ mean) * mean        # orthogonal to the mean: the average input sits on the boundary
        spread = (dz @ u).std()
        r.proj.weight.zero_()
        # layer 0's router reads the bare routing tokens (no spread): make it run
        r.proj.weight[0] = scale * u / spread if spread > 1e-6 else scale * mean / (mean @ mean)


@pytest.fixture
def diversify_routers():
    return _diversify_routers


@torch.no_grad()
def _hf_greedy(base, b: Batch, n: int) -> list[list[int]]:
    """n greedy tokens per example from the unmodified transformers model (eos_token_id=[]: never stops early)."""
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=[],
                          pad_token_id=0, bos_token_id=1)
    dev = next(base.parameters()).device
    out = base.generate(input_ids=b.input_ids.to(dev), attention_mask=b.token_ok.long().to(dev),
                        pixel_values=b.pixel_values.to(dev, next(base.parameters()).dtype), generation_config=gc)
    return out[:, b.input_ids.shape[1]:].tolist()


@pytest.fixture
def hf_greedy():
    return _hf_greedy


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a TCP port on 127.0.0.1 that nothing listens on now."""
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return pick


# --- MoE systems (test_moe_llava.py, test_evomoe.py) ---

@torch.no_grad()
def randomise(ffns, seed=1, router_std=0.5, expert_std=0.0):
    """MoE systems' routers made random (every parameter ~ N(0, router_std): tokens spread over all
    experts); expert_std > 0 also moves each expert (its deltas, when delta-stored) apart."""
    g = torch.Generator().manual_seed(seed)
    for ffn in ffns:
        for p in ffn.router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * router_std)
        for e in ffn.experts:
            for p in (e.delta if e.delta_rank else e).parameters():
                p.add_(torch.randn(p.shape, generator=g) * expert_std)


@torch.no_grad()
def logits(model, b):
    return model(b.input_ids, b.token_ok, b.pixel_values).logits


@torch.no_grad()
def base_logits(base, b):
    return base(input_ids=b.input_ids, attention_mask=b.token_ok.long(), pixel_values=b.pixel_values).logits


# --- one tiny RoE pipeline (test_serving.py, test_analysis.py) ---

@pytest.fixture(scope="module")
def tiny_roe():
    """The tiny random model behind RoE's pipeline (fresh parts, asked for), one per test module."""
    from roe_core.systems import load_system
    return load_system("roe", model="tiny", device="cpu", fresh=True)


@pytest.fixture
def routed(tiny_roe, images, diversify_routers):
    """tiny_roe with routers that send the three QUESTIONS different ways."""
    items = [(images[k], q, ()) for k, q in enumerate(QUESTIONS)]
    diversify_routers(Tiny(tiny_roe.model, tiny_roe.encoder), tiny_roe.batch(items))
    return tiny_roe


# --- concurrency tests: both decoding paths, and a deadline so a hang fails in seconds ---

# the decode engine uncaptured (the CUDA graphs' code) and the eager loop; on a GPU the graphs themselves too
DECODING_PATHS = ("eager", "off") + (("graphs",) if torch.cuda.is_available() else ())


def run_within(seconds: float, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a daemon thread; the test fails if it has not returned within `seconds`
    (every thread's stack is printed first, to show where it hung). Returns fn's value, raises its error.
    pytest has no timeout plugin here: a hang must fail, not stall the run."""
    import faulthandler
    import sys
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
            box["error"] = e
    t = threading.Thread(target=run, daemon=True, name="run_within")
    t.start()
    t.join(seconds)
    if t.is_alive():
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        pytest.fail(f"did not finish within {seconds:g} s: a hang (stacks above)", pytrace=False)
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def within():
    """within(seconds, fn, *args) -> fn's value; fails the test when fn hangs (see run_within)."""
    return run_within


@pytest.fixture(params=DECODING_PATHS)
def decoding(request):
    """The decoding path of a concurrency test: "eager" (the decode engine, on CUDA the graphs' code), "off"
    (the eager loop), and on a GPU "graphs"."""
    return request.param


def use_path(pipe, decoding: str):
    """pipe on a fresh decoder of path `decoding`; skips "graphs" for a pipe on the CPU."""
    if decoding == "graphs" and pipe.device.type != "cuda":
        pytest.skip("the graphs path needs the pipe on CUDA")
    return pipe.use_engine("off").use_engine(decoding)


# --- scripts/gpu_check.sh's hook: the concurrency tests on the CUDA-graph engine ---
# ROE_TEST_ENGINE="graphs" (a comma list: "graphs", "graphs,eager,off") replaces the decoding paths of every
# test that takes `decoding`; unset, nothing here changes anything. "graphs" needs CUDA: the module's
# tiny_roe is moved there (its tests skip without a GPU).

ENGINE_OVERRIDE = tuple(x.strip() for x in __import__("os").environ.get("ROE_TEST_ENGINE", "").split(",") if x.strip())

if ENGINE_OVERRIDE:
    @pytest.fixture(params=ENGINE_OVERRIDE)
    def decoding(request):                                    # noqa: F811  (the override of the one above)
        """The decoding path, from ROE_TEST_ENGINE; "graphs" puts tiny_roe on CUDA first."""
        if request.param == "graphs":
            if not torch.cuda.is_available():
                pytest.skip("decoding 'graphs' needs a CUDA GPU")
            if "tiny_roe" in request.fixturenames:
                pipe = request.getfixturevalue("tiny_roe")
                if pipe.device.type != "cuda":
                    pipe.use_engine("off")
                    pipe.model.to("cuda")
                    pipe.device = torch.device("cuda")
        return request.param


@pytest.fixture(scope="module")
def entry():
    """app.py as a module (the name `app` is the package)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("roe_app_main", Path(__file__).resolve().parent.parent / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
