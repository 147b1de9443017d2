"""How much memory training RoE on a LLaVA model takes, per stage: a plan from parameter counts.

    python -m roe_core.train.memory --preset llava-1.5-7b              # the plan (CPU, nothing downloaded)
    python -m roe_core.train.memory --preset llava-1.5-7b --time       # on a GPU: one step per stage, timed
    python -m roe_core.train.memory --preset llava-1.5-7b --fit        # + the fit's plan (roe_core.fit), one GPU

The model is built on the meta device from its config (LlavaConfig: Llama decoder, CLIP vision tower,
2-layer projector), RoE's parts added as train/roe.py adds them, and every number is counted from it:

    weights     every parameter in fp32, as the training commands load them (bf16 autocast computes)
    grads       fp32, the trained parameters
    AdamW       exp_avg + exp_avg_sq in fp32, the trained parameters
    FSDP / GPU  the three above sharded over the GPUs, plus what is gathered at a time (fp32, as the loop
                gathers): the largest unit (shard_for_fsdp's units: a decoder layer with its router and
                adapter) twice (the running one and the prefetched one), its gradients before the
                reduce-scatter, and the root unit (routing tokens, vision embeddings, ...) for the whole step
    DDP / GPU   weights + grads + AdamW unsharded, plus DDP's fp32 gradient buckets

Activations are measured, not guessed: one decoder layer at the model's width is built on the CPU and
run forward and backward under bf16 autocast at three sequence lengths, counting the bytes of every tensor
autograd saves (unique storages, parameters excluded); per layer they are c0 + a S + q S^2 (c0: bf16 copies
of the frozen fp32 weights autocast saves for backward; q: attention scores where no fused kernel runs,
0 on GPUs with SDPA's flash / memory-efficient kernels, which this plan assumes), times the layers.
"""
from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import torch
from torch import nn

GiB = 2 ** 30

# LLaVA-1.5's geometry: Vicuna-7B/13B decoder, CLIP ViT-L/14 at 336 px, a 2-layer MLP projector
PRESETS = {
    "llava-1.5-7b": dict(layers=32, hidden=4096, mlp=11008, heads=32, vocab=32064, vision_layers=24,
                         vision_hidden=1024, vision_mlp=4096, vision_heads=16, patch=14, image=336),
    "llava-1.5-13b": dict(layers=40, hidden=5120, mlp=13824, heads=40, vocab=32064, vision_layers=24,
                          vision_hidden=1024, vision_mlp=4096, vision_heads=16, patch=14, image=336),
    "tiny": dict(layers=4, hidden=64, mlp=172, heads=4, vocab=512, vision_layers=2, vision_hidden=32,
                 vision_mlp=64, vision_heads=4, patch=4, image=16),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llava_config(p: dict, layers: int | None = None, vocab: int | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    text = LlamaConfig(vocab_size=vocab or p["vocab"], hidden_size=p["hidden"], intermediate_size=p["mlp"],
                       num_hidden_layers=layers or p["layers"], num_attention_heads=p["heads"],
                       num_key_value_heads=p["heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=p["vision_hidden"], intermediate_size=p["vision_mlp"],
                              num_hidden_layers=p["vision_layers"], num_attention_heads=p["vision_heads"],
                              patch_size=p["patch"], image_size=p["image"], projection_dim=p["hidden"])
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=(vocab or p["vocab"]) - 1,
                      image_seq_length=(p["image"] // p["patch"]) ** 2, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    return cfg


def build_roe(p: dict, device="meta", layers: int | None = None, vocab: int | None = None):
    """A LLaVA of this geometry (random weights, or none on the meta device) with fresh RoE parts."""
    from transformers import LlavaForConditionalGeneration
    from ..systems.roe import RoEModel
    with torch.device(device):
        base = LlavaForConditionalGeneration(llava_config(p, layers, vocab))
        return RoEModel(base)


def numel(params) -> int:
    return sum(q.numel() for q in params)


def lora_numel(model, rank: int) -> int:
    """LoRA of rank r on every projection of every decoder layer: r x (in + out) each."""
    return sum(rank * (m.in_features + m.out_features) for layer in model.layers for n, m in layer.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[-1] in LORA_TARGETS)


@dataclass
class Counts:
    vision: int
    projector: int
    lm: int              # embeddings, decoder layers, final norm (what --backbone language_model trains)
    lm_head: int
    parts: int           # RoE: routers, adapters, routing tokens
    lora: int
    max_unit: int        # largest FSDP unit (a decoder layer with its router and adapter)
    unit_parts: int      # the RoE parts in one such unit (its router and adapter)
    unit_lora: int       # LoRA parameters in one decoder layer
    root: int            # what no unit holds: gathered for the whole step

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.lm + self.lm_head + self.parts


def count(model, lora_rank: int) -> Counts:
    from .loop import base_units
    from .roe import RoEObjective, TrainConfig
    base = model.base
    units = RoEObjective(model, TrainConfig(backbone_lr=0)).fsdp_units(model) + base_units(base)
    in_units = {id(q) for u in units for m in u for q in m.parameters()}
    return Counts(numel(base.model.vision_tower.parameters()), numel(base.model.multi_modal_projector.parameters()),
                  numel(model.lm.parameters()), numel(base.lm_head.parameters()), numel(model.roe_parameters()),
                  lora_numel(model, lora_rank), max(numel(q for m in u for q in m.parameters()) for u in units),
                  numel(model.routers[0].parameters()) + numel(model.adapters[0].parameters()),
                  lora_numel(model, lora_rank) // len(model.layers),
                  numel(q for q in model.parameters() if id(q) not in in_units))


# --- activations, measured on one layer ----------------------------------------------------------------

def saved_bytes(run, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while run() builds its graph (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    out.backward()
    return sum(seen.values())


def layer_inputs(model, S: int):
    """One conversation of S decoder tokens, laid out for RoE (one turn: the last half is the question)."""
    ids = torch.randint(3, model.base.config.text_config.vocab_size - 1, (1, S))
    ok = torch.ones(1, S, dtype=torch.bool)
    turn = torch.full((1, S), -1)
    turn[:, S // 2:] = 0
    image_keys = turn < 0
    question_keys = (turn == 0)[:, None]
    return model.layout(ids, ok, turn, image_keys, question_keys, None)


def probe(p: dict, seqs=(64, 128, 256), lora_rank: int = 128) -> dict[str, tuple[float, float, float]]:
    """Per decoder layer (c0, a, q) bytes for: RoE's soft forward with the parts training (stage 0-1),
    with the backbone too (stage 2), with LoRA (the cheap stage 2), each with and without activation
    checkpointing of the decoder layer; and the plain decoder layer (no RoE) for comparison."""
    from torch.distributed._composable import checkpoint
    from .roe import RouteSchedule, TrainConfig
    def make(lora: bool):
        torch.manual_seed(0)
        model = build_roe(p, "cpu", layers=1, vocab=256)
        if lora:
            from peft import LoraConfig, inject_adapter_in_model
            inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                               target_modules=list(LORA_TARGETS)), model.lm)
        checkpoint(model.layers[0])
        return model
    weights = RouteSchedule(TrainConfig(steps=10, stage1_start=0.0, stage2_start=1.0)).weights

    def train(model, which: str):
        model.requires_grad_(False)
        lm = [q for n, q in model.lm.named_parameters() if "lora_" not in n]
        lora = [q for n, q in model.lm.named_parameters() if "lora_" in n]
        for q in (model.roe_parameters() if which != "dense" else []) + \
                (lm if which in ("backbone", "dense") else []) + (lora if which == "lora" else []):
            q.requires_grad_(True)

    def run(model, which: str, S: int):
        x = layer_inputs(model, S)
        layer = model.layers[0]
        if which == "dense":       # the base's layer alone, its input as RoE's would be (gradients flow)
            h = x.embeds.detach().requires_grad_(True)
            pos = model.rotary(h, x.position_ids)
            return layer(h, attention_mask=x.mask, position_embeddings=pos).float().pow(2).mean()
        h, _, _ = model.soft_forward(x, lambda i, lg: weights(lg, 1))
        return h.float().pow(2).mean()

    out = {}
    for which in ("parts", "backbone", "lora", "dense"):
        if which in ("parts", "lora"):
            model = make(which == "lora")
            params = {q.untyped_storage().data_ptr() for q in model.parameters()}
        train(model, which)
        for ac in (False, True):
            checkpoint.state(model.layers[0]).enable_hook = ac
            with torch.autocast("cpu", dtype=torch.bfloat16):
                b = [saved_bytes(lambda: run(model, which, S), params) for S in seqs]
            model.zero_grad(set_to_none=True)
            # c0 + a S + q S^2 through the three points
            A = torch.tensor([[1.0, S, S * S] for S in seqs], dtype=torch.float64)
            c0, a, q = torch.linalg.solve(A, torch.tensor(b, dtype=torch.float64)).tolist()
            out[f"{which}{' +AC' if ac else ''}"] = (max(c0, 0.0), a, max(q, 0.0))
    del model
    gc.collect()
    return out


# --- the plan -------------------------------------------------------------------------------------------

def stages(c: Counts) -> list[tuple[str, int]]:
    """(stage, trained parameters) as train/roe.py trains them."""
    return [("0-1: RoE parts only", c.parts),
            ("2: + LM backbone (lower LR)", c.parts + c.lm),
            ("2 with LoRA on the LM", c.parts + c.lora)]


def plan(preset: str, gpus: int = 8, seq: int = 700, batch: int = 4, lora_rank: int = 128,
         measure: bool = True) -> dict:
    p = PRESETS[preset]
    c = count(build_roe(p), lora_rank)
    act = probe(p, lora_rank=lora_rank) if measure else {}
    L = p["layers"]
    rows = []
    unit_trained = {"parts": c.unit_parts, "backbone": c.max_unit, "lora": c.unit_parts + c.unit_lora}
    for (name, trained), key in zip(stages(c), ("parts", "backbone", "lora")):
        weights = 4 * (c.total + (c.lora if key == "lora" else 0))
        grads, adam = 4 * trained, 8 * trained
        states = weights + grads + adam
        # gathered at a time, fp32: two units (running, prefetched), one unit's gradients before the
        # reduce-scatter, the root
        gathered = 2 * 4 * c.max_unit + 4 * unit_trained[key] + 4 * c.root
        row = dict(stage=name, trained=trained, weights=weights, grads=grads, adamw=adam, one_gpu=states,
                   ddp_gpu=states + grads, fsdp_gpu=states / gpus + gathered)
        if key in act:
            c0, a, _ = act[key]
            row["act"] = L * (c0 + batch * a * seq)
            c0_ac, a_ac, _ = act[key + " +AC"]
            # what each layer keeps, plus one layer's full activations while it is recomputed in backward
            row["act_ac"] = L * (c0_ac + batch * a_ac * seq) + c0 + batch * a * seq
        rows.append(row)
    if "dense" in act:
        dense = act["dense"][1]
        ratio = act["backbone"][1] / dense
    else:
        ratio = None
    return dict(preset=preset, counts=c, rows=rows, probe=act, gpus=gpus, seq=seq, batch=batch,
                lora_rank=lora_rank, roe_over_dense=ratio)


def format_plan(r: dict) -> str:
    c: Counts = r["counts"]
    g = lambda b: f"{b / GiB:7.1f}"    # noqa: E731
    m = lambda n: f"{n / 1e6:,.0f}M"   # noqa: E731
    lines = [f"{r['preset']}: {m(c.total)} parameters = vision {m(c.vision)} + projector {m(c.projector)} + "
             f"LM {m(c.lm)} + LM head {m(c.lm_head)} + RoE parts {m(c.parts)}; LoRA r={r['lora_rank']}: "
             f"{m(c.lora)}; largest FSDP unit {m(c.max_unit)}, root {m(c.root)}",
             "",
             f"GiB per GPU; FSDP over {r['gpus']} GPUs; activations for a batch of {r['batch']} x {r['seq']} "
             f"tokens per GPU (bf16 autocast, flash/SDPA attention)",
             "",
             "| stage | trained | weights | grads | AdamW | 1 GPU: states | DDP / GPU | FSDP / GPU | "
             "activations | with act. ckpt |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        act = lambda k: g(row[k]) if k in row else "      -"   # noqa: E731
        lines.append(f"| {row['stage']} | {m(row['trained'])} | {g(row['weights'])} | {g(row['grads'])} | "
                     f"{g(row['adamw'])} | {g(row['one_gpu'])} | {g(row['ddp_gpu'])} | {g(row['fsdp_gpu'])} | "
                     f"{act('act')} | {act('act_ac')} |")
    if r["probe"]:
        lines += ["", "measured per decoder layer (bytes): c0 + a x tokens (c0: bf16 copies of frozen fp32 "
                      "weights saved for backward)", ""]
        lines += [f"  {k:16s} c0 {c0 / 2**20:8.1f} MiB   a {a / 1024:8.1f} KiB/token"
                  for k, (c0, a, _) in r["probe"].items()]
    if r["roe_over_dense"]:
        lines += ["", f"RoE's soft forward (every layer and every adapter, mixed) saves {r['roe_over_dense']:.2f}x "
                      "what the plain decoder layer saves per token (backbone training)"]
    return "\n".join(lines)


# --- the fit (roe_core.fit): no training, three inference passes -------------------------------------------

def fit_plan(preset: str, n_inputs: int = 1000, n_val: int = 96, n_evidence: int = 384, seq: int = 641,
             batch: int = 16, evidence_batch: int = 4, answer_tokens: int = 8, calib_steps: int = 6,
             rank: int = 0, tflops: float = 300.0, measure: bool = True) -> dict:
    """Memory and time of `python -m roe_core.fit` on one GPU at a preset's geometry, from parameter counts:
    bf16 weights; the normal equations (fp32, 2 x L x d^2, on the GPU); the routers' inputs (bf16, on the
    host); the dense pass's KV cache; the evidence pass's activations (its backward reaches the activations,
    no weight gradients: bounded by the plain layer's measured training activations) and its stand-in
    errors (fp32, every layer). Time: multiply-adds at `tflops` effective bf16 TFLOP/s, plus decoding as a
    launch-bound ~20 ms per step (FACTS: H200 eager decode) and the per-layer solves (fp64 eigh, ~1.5 s)."""
    p = PRESETS[preset]
    c = count(build_roe(p), 0)
    L, d = p["layers"], p["hidden"]
    r = rank or d // 8
    n_fit = n_inputs - n_val
    kv = 2 * L * d * 2                                              # bytes per token of K and V (MHA), bf16
    act = probe(p)["dense"] if measure else (0.0, 34.0 * d, 0.0)    # per layer: c0 + a x tokens
    mem = {"weights (bf16)": 2 * c.total,
           "normal equations (fp32, GPU)": 2 * L * d * d * 4,
           "dense pass: KV cache + hook rows": batch * (seq + answer_tokens) * kv + 2 * batch * seq * d * 4,
           "evidence pass: activations (bound)": L * (act[0] + evidence_batch * seq * act[1]),
           "evidence pass: stand-in errors (fp32)": L * evidence_batch * seq * d * 4,
           "stand-ins (fp32 while solving, one layer)": 3 * d * d * 8}
    gpu = mem["weights (bf16)"] + mem["normal equations (fp32, GPU)"] + max(
        mem["dense pass: KV cache + hook rows"], mem["evidence pass: activations (bound)"] +
        mem["evidence pass: stand-in errors (fp32)"])
    host = n_inputs * L * 2 * d * 2 + mem["normal equations (fp32, GPU)"]      # router inputs + the cache's copy
    layers = c.lm - p["vocab"] * d                                 # the decoder's matmuls (embeddings are a lookup)
    per_token = 2 * layers + 4 * L * d * d                         # forward + the normal equations' rank updates
    vision = 2 * (c.vision + c.projector) * (p["image"] // p["patch"]) ** 2
    flops = {"dense pass (fit + held out)": n_inputs * (seq * per_token + vision),
             "evidence pass (forward + backward)": 3 * n_evidence * (seq * 2 * layers + vision),
             "threshold search (routed, ~2/3 of layers)": (calib_steps + 1) * n_val * (seq * 2 * layers * 2 / 3 + vision)}
    secs = {k: v / (tflops * 1e12) for k, v in flops.items()}
    steps = (n_inputs + (calib_steps + 1) * n_val) / batch * answer_tokens
    secs["decoding (~20 ms a step)"] = 0.020 * steps
    secs["solves (fp64 eigh per layer)"] = 1.5 * L
    return dict(preset=preset, n_inputs=n_inputs, n_val=n_val, n_evidence=n_evidence, seq=seq, batch=batch,
                evidence_batch=evidence_batch, rank=r, tflops=tflops, memory=mem, gpu_bytes=gpu, host_bytes=host,
                flops=flops, seconds=secs, total_seconds=sum(secs.values()),
                parts_bytes_bf16={"roe": 2 * (L * (2 * 2 * d + 2 * 2 * r * d + d + 2) + 2 * d),
                                  "stand-ins per layer": 2 * 2 * 2 * r * d})


def format_fit_plan(r: dict) -> str:
    g = lambda b: f"{b / GiB:.2f} GiB"   # noqa: E731
    lines = [f"Fit plan, {r['preset']}: {r['n_inputs']} inputs ({r['n_val']} held out, evidence on {r['n_evidence']}), "
             f"{r['seq']} tokens each, batch {r['batch']} (evidence {r['evidence_batch']}), stand-ins of rank {r['rank']} "
             f"(adapters {2 * r['rank']}), one GPU", "", "| memory | |", "|---|---|"]
    lines += [f"| {k} | {g(v)} |" for k, v in r["memory"].items()]
    lines += [f"| **GPU peak (weights + normal equations + the larger pass)** | **{g(r['gpu_bytes'])}** |",
              f"| host (router inputs + the cache's normal equations) | {g(r['host_bytes'])} |", "",
              f"| time at {r['tflops']:.0f} TFLOP/s effective | s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in r["seconds"].items()]
    lines += [f"| **total** | **{r['total_seconds']:.0f} s = {r['total_seconds'] / 60:.1f} min** |", "",
              f"Fitted RoE parts, bf16: {r['parts_bytes_bf16']['roe'] / 2**20:.0f} MiB. A plan, not a measurement: "
              "no GPU has run it."]
    return "\n".join(lines)


# --- on a GPU: one training step per stage, timed ---------------------------------------------------------

def fake_batch(model, batch: int, text: int = 100, answer: int = 40):
    """A LLaVA-1.5 conversation as the collator lays it out, random tokens: [bos, image tokens, question,
    answer]: one turn, 1 + image_seq_length + text tokens."""
    from ..runtime.conversation import Batch
    cfg = model.base.config
    n_img = cfg.image_seq_length
    S = 1 + n_img + text
    ids = torch.randint(3, cfg.text_config.vocab_size - 1, (batch, S))
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = cfg.image_token_index
    turn = torch.full((batch, S), -1)
    turn[:, 1 + n_img:] = 0
    answer_mask = torch.zeros(batch, S, dtype=torch.bool)
    answer_mask[:, S - answer - 1:S - 1] = True          # token p+1 is predicted at p
    image = cfg.vision_config.image_size
    return Batch(ids, torch.ones(batch, S, dtype=torch.bool), turn, turn < 0,
                 ((turn == 0) & ~answer_mask)[:, None], answer_mask, torch.randn(batch, 3, image, image))


def time_steps(preset: str, batch: int = 1, steps: int = 3, variants=None) -> list[dict]:
    """Seconds per training step and peak GPU memory, one process, random weights, bf16 autocast, for
    each stage (and with activation checkpointing). Each variant builds the model afresh."""
    from accelerate import Accelerator
    from .loop import prepare_model, train_step
    from .roe import RoEObjective, TrainConfig
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p = PRESETS[preset]
    variants = variants or [("0-1: parts", dict(stage1_start=0.5, stage2_start=2.0, backbone_lr=0.0), False),
                            ("0-1: parts", dict(stage1_start=0.5, stage2_start=2.0, backbone_lr=0.0), True),
                            ("2: + backbone", dict(stage1_start=0.0, stage2_start=0.0, backbone_lr=2e-6), True),
                            ("2: + backbone", dict(stage1_start=0.0, stage2_start=0.0, backbone_lr=2e-6), False)]
    accelerator = Accelerator(mixed_precision="bf16", cpu=dev == "cpu")
    out = []
    for name, kw, ac in variants:
        row = dict(stage=name, activation_checkpointing=ac, batch=batch)
        model = wrapped = optimizer = objective = None
        try:
            torch.manual_seed(0)
            model = build_roe(p, dev)
            cfg = TrainConfig(steps=2 * steps, batch_size=batch, bf16=True, activation_checkpointing=ac, **kw)
            objective = RoEObjective(model, cfg)
            wrapped, optimizer, _ = prepare_model(accelerator, model, objective, cfg, sharded=False)
            b = fake_batch(model, batch).to(dev)
            row["tokens"] = b.input_ids.shape[1]
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for k in range(steps + 1):          # the first step warms up (and allocates AdamW's moments)
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                stats, _ = train_step(accelerator, wrapped, model, objective, optimizer, b, steps + k,
                                      cfg.max_grad_norm)
                float(stats["loss"].detach())            # waits for the step to finish
                times.append(time.perf_counter() - t0)
            row.update(s_per_step=sum(times[1:]) / steps, loss=float(stats["loss"].detach()),
                       trained=numel(q for q in model.parameters() if q.requires_grad))
            if dev == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e)[:120]}"
        finally:
            model = wrapped = optimizer = objective = None
            accelerator.free_memory()
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
        print(row, flush=True)
        out.append(row)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m roe_core.train.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5-7b")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seq", type=int, default=700, help="tokens per sample in the decoder (576 image + text)")
    ap.add_argument("--batch", type=int, default=4, help="samples per GPU per step")
    ap.add_argument("--lora-rank", type=int, default=128)
    ap.add_argument("--no-measure", action="store_true", help="parameter counts only (no activation probe)")
    ap.add_argument("--time", action="store_true", help="time one training step per stage here (a GPU: random "
                                                        "weights at the preset's geometry)")
    ap.add_argument("--fit", action="store_true", help="also the plan of python -m roe_core.fit (one GPU)")
    ap.add_argument("--fit-inputs", type=int, default=1000)
    args = ap.parse_args(argv)
    if args.fit:
        print(format_fit_plan(fit_plan(args.preset, args.fit_inputs, measure=not args.no_measure)) + "\n")
    if args.time:
        time_steps(args.preset, batch=1)
        return
    print(format_plan(plan(args.preset, args.gpus, args.seq, args.batch, args.lora_rank, not args.no_measure)))


if __name__ == "__main__":
    main()
