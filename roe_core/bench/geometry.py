"""Speed at any model geometry, with random weights built from a config (no download).

    python -m roe_core.bench.geometry --preset llava-1.5-7b             # on a GPU: bench/results_gpu.{json,md}
    python -m roe_core.bench.geometry --preset llava-1.5-7b --batch-sizes 1,16,64,128
    python -m roe_core.bench.geometry --preset llava-1.5-7b --fuse both  # the engine with and without fusion
    python -m roe_core.bench.geometry --quick                            # tiny preset on the CPU (CI)

Every system is built over one base (dense; RoE with its routers forced to a route; MoE-LLaVA top-2 of 4
on every other layer and EvoMoE top-1, both with full expert copies) and timed on one synthetic prompt
of LLaVA-1.5's layout (1 BOS + 24 system + image tokens + 40 question tokens) and a fixed number of
new tokens (no stop token, so every answer is the same length). Prefill (ms) and decode (ms per token)
are reported separately, each the median of interleaved rounds (every variant once per round, after
one untimed warm-up that also captures the engine's graphs), CUDA-synchronised.

Variants: each system through the decode engine (`graphs` on CUDA, `eager` on the CPU) and through
the eager loop it had before (`off`); RoE every layer, the same k layers skipped for every example
(fixed), each example its own k (mixed), and the RoE release's union rule on those mixed routes
(a layer runs for the batch when any example runs it). The reference a user would pick:
transformers' own `generate`, with the dynamic cache and with the static cache (`cache_implementation`)
(which compiles the forward itself; CUDA only).

The floor: the bytes of weights a decode step must read (the layers an example runs, the adapters that
stand in, the experts its tokens pick in expectation, the LM head) over the copy bandwidth measured in
the same run; `floor_fraction` = floor / measured.

`--fuse both` adds, beside each engine variant, the same engine with its layer body compiled
(runtime.fused: torch.compile without its own CUDA graphs, inside the engine's graphs; decoding
`graphs+fuse`), for `--fuse-systems` at `--fuse-batches`. Compilation happens in the untimed warm-up.

Large batches (`--large-batch`, default 64 and up) ask one question: from which batch do mixed routes
beat every layer (decode turns compute-bound)? There only `--large-systems` (RoE) runs, through the
engine, with `--large-rounds` rounds. A memory plan is printed per batch before anything is built
(weights, each engine's arena, the eager loop's cache, prefill's transient); where the variants of a
batch do not fit the device at once, they are measured in groups (each group's engines freed before
the next; rounds interleave within a group), and a group that alone does not fit is left out and
said so. `summary.crossover` gives the first batch where mixed routes beat every layer; `targets`
the issue's targets, measured or None.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ..runtime.conversation import Batch
from ..runtime.engine import DecodeEngine
from ..runtime.generation import Timing, sync
from ..systems import pipeline_class, registry
from .geometry_plan import group_fit, memory_plan, moe_extra_bytes, print_plan, print_targets, public_plan, targets

HF_STATIC = 'static'          # transformers' cache_implementation name (not this project's fixed-path system)
FUSED = "+fuse"               # the decoding label's suffix for the fused engine (graphs+fuse, eager+fuse)
KEY_MULTIPLE = 64             # the bench's engines round key capacities to 64 (the app's use a grid of 256)

PRESETS = {
    # name: decoder (layers, hidden, heads, kv heads, MLP, vocab), vision (image, patch, hidden, layers, heads, MLP)
    "tiny": dict(text=(4, 64, 4, 2, 128, 256), vision=(28, 14, 32, 1, 2, 64), system=4, question=8),
    "embedded": dict(text=(30, 576, 9, 3, 1536, 49152), vision=(128, 16, 384, 6, 6, 1536), system=24, question=40),
    "llava-1.5-7b": dict(text=(32, 4096, 32, 32, 11008, 32064), vision=(336, 14, 1024, 24, 16, 4096),
                         system=24, question=40),
    "llava-1.5-13b": dict(text=(40, 5120, 40, 40, 13824, 32064), vision=(336, 14, 1024, 24, 16, 4096),
                          system=24, question=40),
}
IMAGE_TOKEN = 3


def build_config(preset: str) -> LlavaConfig:
    p = PRESETS[preset]
    L, d, h, kv, mlp, vocab = p["text"]
    image, patch, vd, vl, vh, vmlp = p["vision"]
    text = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=mlp, num_hidden_layers=L,
                       num_attention_heads=h, num_key_value_heads=kv, max_position_embeddings=4096,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = CLIPVisionConfig(image_size=image, patch_size=patch, hidden_size=vd, intermediate_size=vmlp,
                              num_hidden_layers=vl, num_attention_heads=vh, projection_dim=d)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                       projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=-2, image_seq_length=(image // patch) ** 2)


def build_base(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = build_config(preset)
    cfg.text_config._attn_implementation = "sdpa"
    with torch.device(device):
        base = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    with torch.no_grad():                       # a sane scale: random init of a 7B is fine, keep it finite
        for p in base.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    return base.eval()


def synthetic_batch(preset: str, B: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Batch:
    """B prompts of LLaVA-1.5's layout: BOS, system, image tokens, question (no padding, one turn)."""
    p = PRESETS[preset]
    vocab = p["text"][5]
    image = p["vision"][0]
    n_img = (image // p["vision"][1]) ** 2
    g = torch.Generator().manual_seed(seed)
    sys_ = torch.randint(10, vocab, (B, p["system"]), generator=g)
    q = torch.randint(10, vocab, (B, p["question"]), generator=g)
    ids = torch.cat([torch.ones(B, 1, dtype=torch.long), sys_, torch.full((B, n_img), IMAGE_TOKEN), q], 1)
    S = ids.shape[1]
    token_ok = torch.ones(B, S, dtype=torch.bool)
    turn_ids = torch.full((B, S), -1)
    turn_ids[:, -p["question"]:] = 0
    image_keys = torch.zeros(B, S, dtype=torch.bool)
    image_keys[:, :S - p["question"]] = True
    question_keys = (turn_ids == 0)[:, None]
    pixels = torch.randn(B, 3, image, image, generator=g).to(dtype)
    return Batch(ids, token_ok, turn_ids, image_keys, question_keys, torch.zeros_like(token_ok), pixels).to(device)


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float | None:
    """Bytes per second of a device-to-device copy (read + write counted), median of 5."""
    if device.type != "cuda":
        return None
    n = int(gib * 2 ** 30)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    del x, y
    return 2 * n / statistics.median(times[1:])


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())


@dataclass
class Variant:
    system: str
    name: str
    engine: str                          # graphs / eager / off / hf, "+fuse" for the fused engine
    run: Callable[[int], Timing]         # max_new_tokens -> Timing
    step_bytes: float                    # weight bytes one decode step reads (expectation)
    layers_run: float
    group: str = ""                      # the memory group: its engines are freed after it (see measure)
    engine_obj: DecodeEngine | None = None
    error: str | None = None             # a fused variant whose compile failed: left out, said so


def moe_step_bytes(layer_bytes: float, ffn_bytes: float, n_moe: int, E: int, k: int, B: int) -> float:
    """Expected weight bytes of one MoE layer's decode step: attention + the distinct experts B tokens
    pick (uniform routing: E (1 - (1 - k/E)^B))."""
    distinct = E * (1 - (1 - k / E) ** B)
    return n_moe * (layer_bytes - ffn_bytes + distinct * ffn_bytes)


def variants(preset: str, base, batch: Batch, B: int, engine_mode: str, skip: int, seed: int,
             systems: list[str], fuse=None, fuse_systems: list[str] | None = None, loop: bool = True,
             loop_systems: list[str] | None = None, large: bool = False
             ) -> tuple[list[Variant], list[DecodeEngine]]:
    """Every system's variants at batch B. fuse: FuseOptions for the fused engine (None: none) on
    fuse_systems (None: all). loop: also the eager loop ("off"), for loop_systems (None: all). large:
    RoE's fused variants only where the large-batch question needs them (every layer, mixed)."""
    from ..systems.dense import DenseModel
    from ..systems.roe import RoEModel, generate as roe_generate

    dev = batch.input_ids.device
    L = base.config.text_config.num_hidden_layers
    layers = base.model.language_model.layers
    layer_b = nbytes(layers[0].parameters())
    ffn_b = nbytes(layers[0].mlp.parameters())
    head_b = nbytes(base.lm_head.parameters()) + nbytes(base.model.language_model.norm.parameters())
    out: list[Variant] = []
    made: list[DecodeEngine] = []

    def modes_of(system):
        ms = [engine_mode]
        if fuse is not None and (fuse_systems is None or system in fuse_systems):
            ms.append(engine_mode + FUSED)
        if loop and (loop_systems is None or system in loop_systems):
            ms.append("off")
        return ms

    def engine_for(m):          # an engine per system and flavour: each keeps its own arenas and graphs
        if m == "off":
            return None
        made.append(DecodeEngine(m.removesuffix(FUSED), key_multiple=KEY_MULTIPLE,
                                 fuse=fuse if m.endswith(FUSED) else False))
        return made[-1]

    def group(system, m):
        return f"{system}/{m}"

    if "dense" in systems:
        dense = DenseModel(base)
        modes = modes_of("dense")
        engines = {m: engine_for(m) for m in modes}
        for m in modes:
            out.append(Variant("dense", "every layer", m,
                               lambda n, e=engines[m]: dense.generate(batch, n, set(), engine=e)[2],
                               L * layer_b + head_b, L, group("dense", m), engines[m]))
    if "roe" in systems:
        torch.manual_seed(seed)
        roe = RoEModel(base)
        adapter_b = nbytes(roe.adapters[0].parameters())
        g = torch.Generator().manual_seed(seed)
        fixed_skip = sorted((torch.randperm(L - 1, generator=g)[:skip] + 1).tolist())     # never layer 0
        fixed = torch.ones(B, L, dtype=torch.bool)
        fixed[:, fixed_skip] = False
        mixed = torch.ones(B, L, dtype=torch.bool)
        for b in range(B):
            mixed[b, (torch.randperm(L - 1, generator=g)[:skip] + 1)] = False
        union = mixed.any(0, keepdim=True).expand(B, -1)
        modes = modes_of("roe")
        engines = {m: engine_for(m) for m in modes}
        routes = [("every layer", torch.ones(B, L, dtype=torch.bool)), (f"fixed: {skip} of {L} skipped", fixed)]
        if B > 1:
            routes += [(f"mixed: each its own {skip} skipped", mixed), ("union rule on the mixed routes", union)]
        for name, route in routes:
            run_frac = route.float().mean(0)                     # per layer: share of examples running it
            ran = run_frac.sum().item()
            # bytes: a layer any example runs is read once; a skipped share reads the adapter
            step = sum(layer_b if f > 0 else 0 for f in run_frac.tolist()) + \
                sum(adapter_b if f < 1 else 0 for f in run_frac.tolist()) + head_b
            for m in modes:
                if m == "off" and not name.startswith(("every", "fixed", "mixed")):
                    continue
                if large and m.endswith(FUSED) and not name.startswith(("every", "mixed")):
                    continue
                out.append(Variant("roe", name, m,
                                   lambda n, e=engines[m], r=route.to(dev): roe_generate(roe, batch, r, n, set(),
                                                                                          engine=e).timing,
                                   step, ran, group("roe", m), engines[m]))
    for system in registry.moe_systems():              # MoE-LLaVA, EvoMoE: fresh parts, full expert copies
        if system not in systems:
            continue
        Model = pipeline_class(system).model_cls
        torch.manual_seed(seed)
        model = Model(base).eval()
        cfg = model.config
        n_moe = len(model.moe_layers)
        step = (L - n_moe) * layer_b + moe_step_bytes(layer_b, ffn_b, n_moe, cfg.num_experts, cfg.top_k, B) + head_b
        label = f"top-{cfg.top_k} of {cfg.num_experts}, {n_moe} MoE layers"
        modes = modes_of(system)
        engines = {m: engine_for(m) for m in modes}
        for m in modes:
            # the eager loop with the dispatch it had (per-expert loop, host-read sizes); the engine sync-free
            out.append(Variant(system, label if m != "off" else label + ", per-expert loop", m,
                               lambda n, e=engines[m], model=model, m=m: moe_run(model, batch, n, e, m == "off"),
                               step, L, group(system, m), engines[m]))
    return out, made


def moe_run(model, batch: Batch, n: int, engine, old_dispatch: bool) -> Timing:
    from ..systems.dispatch import set_sync_free
    set_sync_free(model, False if old_dispatch else None)
    try:
        return model.generate(batch, n, set(), engine=engine).timing
    finally:
        set_sync_free(model, None)


def hf_variants(base, batch: Batch, B: int, static: bool) -> list[Variant]:
    """transformers' own generate, timed per step with a logits processor (CUDA-synchronised)."""
    L = base.config.text_config.num_hidden_layers
    layer_b = nbytes(base.model.language_model.layers[0].parameters())
    head_b = nbytes(base.lm_head.parameters())
    out = []
    kinds = [("dynamic cache", None)] + ([("static cache (compiled by generate)", HF_STATIC)] if static else [])
    for name, impl in kinds:
        def run(n, impl=impl):
            stamps = []

            def stamp(input_ids, scores):      # the first call: prefill done (synchronised once, not per step)
                if not stamps:
                    sync(batch.input_ids.device)
                stamps.append(time.perf_counter())
                return scores
            gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=[],
                                  pad_token_id=0, bos_token_id=1, cache_implementation=impl)
            sync(batch.input_ids.device)
            t0 = time.perf_counter()
            base.generate(input_ids=batch.input_ids, attention_mask=batch.token_ok.long(),
                          pixel_values=batch.pixel_values, generation_config=gc, logits_processor=[stamp])
            sync(batch.input_ids.device)
            t1 = time.perf_counter()
            return Timing(stamps[0] - t0, t1 - stamps[0], len(stamps))
        out.append(Variant("transformers", name, "hf", run, L * layer_b + head_b, L, f"transformers/{name}"))
    return out


def measure(vs: list[Variant], max_new: int, rounds: int, device: torch.device,
            groups: list[list[str]] | None = None) -> list[dict]:
    """One warm-up, then `rounds` interleaved rounds; medians. Peak memory per variant (CUDA).
    groups: lists of Variant.group measured one list after another (rounds interleave within a list;
    its engines' arenas are freed after it); None: every variant interleaved with every other."""
    if groups is None:
        return _measure(vs, max_new, rounds, device)
    rows = {}
    for names in groups:
        part = [v for v in vs if v.group in names]
        got = _measure(part, max_new, rounds, device)
        for v, r in zip([v for v in part if v.error is None], got):
            rows[id(v)] = r
        for v in part:
            if v.engine_obj is not None:
                v.engine_obj.release_idle()          # its arenas' buffers and graphs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return [rows[id(v)] for v in vs if id(v) in rows]


def _measure(vs: list[Variant], max_new: int, rounds: int, device: torch.device) -> list[dict]:
    peaks = {}
    for v in vs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            v.run(max_new)
        except Exception as e:                 # noqa: BLE001  (a fused variant's compile: reported, not fatal)
            if not v.engine.endswith(FUSED) or isinstance(e, torch.OutOfMemoryError):
                raise
            v.error = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  {v.system} {v.name} {v.engine}: failed at its warm-up, left out ({v.error})", flush=True)
            if v.engine_obj is not None:
                v.engine_obj.release_idle()
            continue
        if device.type == "cuda":
            peaks[id(v)] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    vs = [v for v in vs if v.error is None]
    times = {id(v): [] for v in vs}
    for _ in range(rounds):
        for v in vs:
            times[id(v)].append(v.run(max_new))
    rows = []
    for v in vs:
        t = times[id(v)]
        steps = [max(1, x.new_tokens - 1) for x in t]
        rows.append({"system": v.system, "variant": v.name, "engine": v.engine,
                     "prefill_ms": 1e3 * statistics.median(x.prefill_s for x in t),
                     "decode_ms_per_token": 1e3 * statistics.median(x.decode_s / s for x, s in zip(t, steps)),
                     "new_tokens": t[0].new_tokens, "layers_run": v.layers_run,
                     "step_weight_GB": v.step_bytes / 1e9, "peak_memory_GiB": peaks.get(id(v))})
    return rows


def summary(rows: list[dict], L: int) -> dict:
    """The issue's ratios per batch (None where a row is missing), for the engine (`bsB`) and the fused
    engine (`bsB.fused`, where measured); `crossover`: the first batch where mixed routes beat every
    layer, per flavour; `targets`: each target with its measured value (best flavour) and whether met."""
    def find(system, prefix, engine, B, key="decode_ms_per_token"):
        for r in rows:
            if r["system"] == system and r["variant"].startswith(prefix) and r["engine"] == engine and r["batch"] == B:
                return r.get(key)
        return None

    def ratio(a, b):
        return None if a is None or b is None else a / b
    eng = next((r["engine"] for r in rows if r["engine"] in ("graphs", "eager")), "graphs")

    def flavour(e, B):
        get = lambda system, prefix, B=B, e=e: find(system, prefix, e, B)          # noqa: E731
        every = get("roe", "every")
        dense = get("dense", "every")
        ref = dense if dense is not None else every          # the every-layer engine (RoE's where dense is absent)
        floor = find("dense", "every", e, B, "floor_fraction")
        return {
            "roe_fixed_ms": get("roe", "fixed"), "every_layer_engine_ms": every, "dense_engine_ms": dense,
            "hf_static_ms": find("transformers", "static cache", "hf", B),
            "roe_fixed_vs_hf_static": ratio(find("transformers", "static cache", "hf", B), get("roe", "fixed")),
            "mixed_vs_every_layer": ratio(every, get("roe", "mixed")),
            "union_vs_every_layer": ratio(every, get("roe", "union")),
            "every_layer_floor_fraction": floor if floor is not None else find("roe", "every", e, B, "floor_fraction"),
            **{f"{m}_over_every_layer": ratio(get(m, "top"), ref) for m in registry.moe_systems()},
            "engine_vs_eager_loop_dense": ratio(find("dense", "every", "off", B), dense),
        }
    out: dict = {}
    batches = sorted({r["batch"] for r in rows})
    fused_engines = {r["engine"] for r in rows if r["engine"].endswith(FUSED)}
    for B in batches:
        out[f"bs{B}"] = flavour(eng, B)
        for fe in sorted(fused_engines):
            if any(r["batch"] == B and r["engine"] == fe for r in rows):
                out[f"bs{B}"]["fused"] = flavour(fe, B)
    out["crossover"] = {}
    for e, label in [(eng, "engine"), *[(fe, "fused") for fe in sorted(fused_engines)]]:
        by_b = {B: (out[f"bs{B}"] if label == "engine" else out[f"bs{B}"].get("fused", {})).get("mixed_vs_every_layer")
                for B in batches}
        by_b = {B: x for B, x in by_b.items() if x is not None}
        first = next((B for B in sorted(by_b) if by_b[B] > 1.0 and all(by_b[b] > 1.0 for b in by_b if b > B)), None)
        out["crossover"][label] = {"mixed_vs_every_layer_by_batch": by_b, "first_batch_mixed_beats_every_layer": first}
    out["targets"] = targets(out)
    return out


def markdown(res: dict) -> str:
    lines = [f"# Speed at {res['preset']} geometry ({res['device_name']}, {res['dtype']})", "",
             f"`{res['command']}` — random weights from a config; prompt {res['prompt_tokens']} tokens "
             f"({res['image_tokens']} image), {res['new_tokens']} new tokens; medians of {res['rounds']} "
             f"interleaved rounds after a warm-up; torch {res['torch']}, transformers {res['transformers']}.", ""]
    if res["bandwidth_TBps"]:
        lines += [f"Copy bandwidth measured: {res['bandwidth_TBps']:.2f} TB/s (read + write). Floor = weight bytes "
                  "a decode step reads / that bandwidth.", ""]
    lines += ["| batch | system | variant | decoding | prefill ms | decode ms/token | floor ms | of floor | peak GiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    def fmt(x, spec):
        return "" if x is None else format(x, spec)
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {r['system']} | {r['variant']} | {r['engine']} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_ms_per_token']:.2f} | {fmt(r.get('floor_ms'), '.2f')} | "
                     f"{fmt(r.get('floor_fraction'), '.0%')} | {fmt(r['peak_memory_GiB'], '.1f')} |")
    lines += ["", f"Engine graphs captured: {res['graph_count']} (bound {res['graph_bound']} per arena).", "",
              "Decoding: `graphs` the static-shape engine with CUDA graphs (runtime/engine.py), `eager` the same "
              "engine uncaptured, `+fuse` that engine with its layer body compiled (runtime/fused.py, mode "
              f"{res.get('fuse_mode')}), `off` the eager loop with a growing cache, `hf` transformers' generate. "
              f"From batch {res.get('large_batch')} on: RoE through the engine only, {res.get('large_rounds')} rounds.", ""]
    for plan in res.get("memory_plans", []):
        lines.append(f"- memory plan, batch {plan['batch']}: models {plan['models_GB']:.1f} GB, arena per engine "
                     f"{plan['arena_GB']:.1f} GB (key capacity {plan['key_capacity']}), all at once "
                     f"{plan['all_at_once_GB']:.1f} GB" + ("; measured in groups" if plan["measured_in_groups"] else ""))
    lines += [f"- {n}" for n in res.get("notes", [])]
    lines += ["", "## Ratios", "", "```json", json.dumps(res["summary"], indent=1), "```", ""]
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llava-1.5-7b", choices=sorted(PRESETS))
    ap.add_argument("--batch-sizes", default="1,16,64,128")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", type=int, default=10, help="layers RoE skips in the fixed and mixed routes")
    ap.add_argument("--systems", default=",".join(["dense", "roe", *registry.moe_systems()]))
    ap.add_argument("--systems-by-batch", default="",
                    help="per batch, the systems instead of --systems: '16:dense,roe;32:roe'")
    ap.add_argument("--no-hf-static", action="store_true", help="leave out transformers' static-cache generate")
    ap.add_argument("--hf-static-batches", default="1",
                    help="batches with transformers' static-cache generate (each costs ~40 s of its compile)")
    ap.add_argument("--no-compile", action="store_true", help="the engine uncaptured (mode eager)")
    ap.add_argument("--fuse", default="off", choices=("off", "on", "both"),
                    help="the engine's layer body compiled (runtime.fused): off, on (instead), both (beside)")
    ap.add_argument("--fuse-mode", default="default", help="Inductor mode for --fuse (never one with cudagraphs)")
    ap.add_argument("--fuse-backend", default="inductor", help="torch.compile backend for --fuse (aot_eager: trace only)")
    ap.add_argument("--fuse-systems", default=None, help="systems with a fused engine (default: all)")
    ap.add_argument("--fuse-batches", default=None, help="batches with a fused engine (default: all)")
    ap.add_argument("--loop-systems", default=None, help="systems also timed on the eager loop 'off' (default: all)")
    ap.add_argument("--large-batch", type=int, default=64, help="from this batch on: only --large-systems, engine only")
    ap.add_argument("--large-systems", default="roe")
    ap.add_argument("--large-rounds", type=int, default=2)
    ap.add_argument("--memory-fraction", type=float, default=0.92, help="share of the device memory the plan may use")
    ap.add_argument("--memory-gb", type=float, default=None, help="device memory to plan for (default: the device's)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new batch after this many seconds")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny preset, CPU, 1 round, batches 1 and 4")
    ap.add_argument("--out", default=None, help="folder (default bench/ on CUDA, bench/geometry_cpu otherwise)")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batch_sizes, args.new_tokens, args.rounds = "tiny", "1,4", 6, 1
        args.skip = min(args.skip, 2)
        args.large_batch = 1 << 30
        if args.device == "auto":
            args.device = "cpu"
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine_mode = "eager" if (args.no_compile or device.type != "cuda") else "graphs"
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    out_dir = Path(args.out or ("bench" if device.type == "cuda" else "bench/geometry_cpu"))
    stem = "results_gpu" if device.type == "cuda" else "results_geometry"
    fuse = None
    if args.fuse != "off":
        from ..runtime.fused import FuseOptions
        fuse = FuseOptions(backend=args.fuse_backend, mode=None if args.fuse_mode in ("", "none") else args.fuse_mode)
    fuse_systems = None if args.fuse_systems is None else args.fuse_systems.split(",")
    fuse_batches = None if args.fuse_batches is None else int_list(args.fuse_batches)
    loop_systems = None if args.loop_systems is None else args.loop_systems.split(",")
    large_systems = [s for s in args.large_systems.split(",") if s]
    by_batch = {int(b): [s for s in names.split(",") if s]
                for b, names in (part.split(":", 1) for part in args.systems_by_batch.split(";") if part.strip())}

    t_start = time.perf_counter()
    base = build_base(args.preset, device, dtype)
    L = base.config.text_config.num_hidden_layers
    layers = base.model.language_model.layers
    weights_b, ffn_b = nbytes(base.parameters()), nbytes(layers[0].mlp.parameters())
    extra = {m: moe_extra_bytes(m, L, ffn_b) for m in registry.moe_systems()}
    budget = None if args.memory_gb is None else args.memory_fraction * args.memory_gb * 1e9
    if budget is None and device.type == "cuda":
        budget = args.memory_fraction * torch.cuda.get_device_properties(device).total_memory
    bw = copy_bandwidth(device)
    p = PRESETS[args.preset]
    prompt = 1 + p["system"] + (p["vision"][0] // p["vision"][1]) ** 2 + p["question"]
    rows, graphs, bound, plans, notes = [], 0, 0, [], []
    ctx = dict(args=args, argv=argv, device=device, dtype=dtype, engine_mode=engine_mode, L=L, bw=bw,
               out_dir=out_dir, stem=stem, plans=plans, notes=notes)
    for B in int_list(args.batch_sizes):
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            notes.append(f"batch {B}: not run, the time budget ({args.budget_s:.0f} s) was spent")
            print(notes[-1], flush=True)
            continue
        large = B >= args.large_batch
        sys_b = by_batch.get(B, [s for s in systems if s in large_systems] if large else systems)
        fuse_b = fuse if fuse is not None and (fuse_batches is None or B in fuse_batches) else None
        rounds = args.large_rounds if large else args.rounds
        if large:
            print(f"batch {B}: large batch: {', '.join(sys_b)} through the engine only, {rounds} rounds", flush=True)
        try:
            batch = synthetic_batch(args.preset, B, device, dtype)
            vs, engines = variants(args.preset, base, batch, B, engine_mode, args.skip, 0, sys_b, fuse=fuse_b,
                                   fuse_systems=fuse_systems, loop=not large, loop_systems=loop_systems, large=large)
            if args.fuse == "on":            # instead of the plain engine: drop it where a fused one runs
                fused_groups = {v.system for v in vs if v.engine.endswith(FUSED)}
                vs = [v for v in vs if not (v.engine == engine_mode and v.system in fused_groups)]
            if not large:
                static = device.type == "cuda" and not args.no_hf_static and B in int_list(args.hf_static_batches)
                vs += hf_variants(base, batch, B, static=static)
            plan = memory_plan(base.config, B, prompt, args.new_tokens, KEY_MULTIPLE, weights_b, extra,
                               {v.group: v.system for v in vs}, torch.tensor([], dtype=dtype).element_size())
            groups, dropped = group_fit(plan, budget)
            print_plan(plan, budget, groups, dropped)
            plans.append(public_plan(plan, groups, dropped))
            notes += [f"batch {B}: {g} left out (alone it does not fit the device)" for g in dropped]
            vs = [v for v in vs if v.group not in dropped]
            t0 = time.perf_counter()
            got = measure(vs, args.new_tokens, rounds, device, groups)
            notes += [f"batch {B}: {v.system} {v.name} {v.engine} left out: {v.error}" for v in vs if v.error]
            vs = [v for v in vs if v.error is None]
        except torch.OutOfMemoryError as e:
            notes.append(f"batch {B}: out of memory ({str(e)[:80]}); skipped")
            print(notes[-1], flush=True)
            vs = engines = None
            torch.cuda.empty_cache()
            continue
        for r, v in zip(got, vs):
            r["batch"] = B
            r["floor_ms"] = None if bw is None else 1e3 * v.step_bytes / bw
            r["floor_fraction"] = None if bw is None else r["floor_ms"] / r["decode_ms_per_token"]
        rows += got
        bound = max(bound, DecodeEngine.graph_bound(L, B))
        graphs = max([graphs] + [e.graph_count for e in engines])
        print(f"batch {B}: {len(vs)} variants in {time.perf_counter() - t0:.0f} s", flush=True)
        for r in got:
            print(f"  {r['system']:12s} {r['variant'][:34]:34s} {r['engine']:11s} prefill {r['prefill_ms']:8.1f} ms  "
                  f"decode {r['decode_ms_per_token']:7.2f} ms/token", flush=True)
        del vs, engines
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(rows=rows, graphs=graphs, bound=bound, **ctx)   # so far
    res = write(rows=rows, graphs=graphs, bound=bound, **ctx)
    print_targets(res["summary"])
    return res


KEEP = ("graph_tests", "serving_tests", "embedded_check", "gpu_check")   # written by scripts/gpu_check.sh


def write(args, argv, device, dtype, engine_mode, L, bw, rows, graphs, bound, out_dir: Path, stem: str,
          plans: list, notes: list) -> dict:
    import transformers
    p = PRESETS[args.preset]
    n_img = (p["vision"][0] // p["vision"][1]) ** 2
    res = {
        "preset": args.preset, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "command": "python -m roe_core.bench.geometry " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "prompt_tokens": 1 + p["system"] + n_img + p["question"], "image_tokens": n_img,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "large_batch": args.large_batch,
        "large_rounds": args.large_rounds, "skip": args.skip, "num_layers": L,
        "engine_mode": engine_mode, "fuse": args.fuse, "fuse_mode": args.fuse_mode if args.fuse != "off" else None,
        "bandwidth_TBps": None if bw is None else bw / 1e12,
        "graph_count": graphs, "graph_bound": bound, "memory_plans": plans, "notes": notes,
        "rows": rows, "summary": summary(rows, L),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    if path.is_file():                   # what the GPU script recorded beside the bench (test counts) stays
        try:
            old = json.loads(path.read_text())
            res.update({k: old[k] for k in KEEP if k in old})
        except (ValueError, OSError):
            pass
    path.write_text(json.dumps(res, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(res))
    print(f"wrote {out_dir / stem}.json and .md", flush=True)
    return res


if __name__ == "__main__":
    main()
