"""The embedded recipe's data: rendered scenes as cached pixel tensors, the vision tower's targets,
the LLaVA JSON the routing systems train on, and the datasets `train.loop.fit` reads.

    pixel_cache(n, split, augment)      (pixel_values, samples): scenes with their conversations
    wide_pixel_cache(n, start)          the same for train samples reworded and restyled (scenes.grammar)
    vision_pixels(n, split, augment)    (pixel_values, scenes, aspects): scenes alone
    vision_targets(scenes, aspects)     the vision stage's per-cell / per-patch / count targets
    roe_data(n, start, wide)            LLaVA JSON of train-split scenes (runs/data*/train*.json)
    PixelConversations, LMCollator      align / finetune batches: right-padded ids, answer mask, pixels
    PixelTargets, VisionCollator        vision batches: pixels + targets

Pixels are rendered once in ROE_THREADS processes and cached in runs/embedded/cache/.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from .base import MAX_COUNT, RUNS, image_processor, vision_spec

# ----------------------------------------------------------------------------- pixel caches


def pixel_cache(n: int, split: str = "train", augment: bool = False):
    """(pixel_values fp16 (n, 3, S, S), samples) for the first n scenes of a split; cached in runs/.
    augment: each image rendered as _vision_image does (random size, aspect ratio, JPEG)."""
    from ..scenes import make_split
    samples = make_split(split, n)
    pv = _cached_pixels(f"{split}_{n}", [(s.scene, s.seed, augment) for s in samples], augment,
                        f"rendering {split} scenes")
    return pv, samples


def wide_pixel_cache(n: int, start: int = 0):
    """(pixel_values fp16 (n, 3, S, S), samples): train-split samples start .. start+n-1 as
    scenes.grammar.make_wide_sample rewords and restyles them (sizes 96-1024 px, aspect 1:2-2:1, JPEG,
    outline widths; never the shifted split's held-out words or styles); cached in runs/."""
    from ..scenes import SPLIT_BASE
    from ..scenes.grammar import make_wide_sample
    seeds = range(SPLIT_BASE["train"] + start, SPLIT_BASE["train"] + start + n)
    samples = [make_wide_sample(s) for s in seeds]
    pv = _cached_pixels(f"wide_train_{start}_{n}", list(seeds), False, "rendering wide train scenes",
                        render=_wide_image)
    return pv, samples


def _wide_image(seed: int):
    from ..scenes.grammar import make_wide_sample
    return make_wide_sample(seed).image()


def _cache_tag(augment: bool) -> str:
    """What a cached pixel tensor depends on: the scene world's version, the tower's input, augmenting."""
    from ..scenes import WORLD_VERSION
    spec = vision_spec()
    return (f"w{WORLD_VERSION}_{spec['clip']['image_size']}{'_pad' if spec['pad_to_square'] else ''}"
            f"{'_aug' if augment else ''}")


def _cached_pixels(name: str, jobs: list, augment: bool, desc: str, render=None) -> Tensor:
    """render (default _vision_image, over (scene, seed, augment) jobs) in ROE_THREADS processes, then the
    image processor: (n, 3, S, S) fp16, cached in runs/cache/<name>_<tag>.safetensors."""
    from concurrent.futures import ProcessPoolExecutor
    path = RUNS / "cache" / f"{name}_{_cache_tag(augment)}.safetensors"
    if path.is_file():
        return load_file(str(path))["pixel_values"]

    from tqdm.auto import tqdm
    proc = image_processor()
    chunks = []
    with ProcessPoolExecutor(max_workers=int(os.environ.get("ROE_THREADS", "2"))) as pool:
        for i in tqdm(range(0, len(jobs), 1000), desc=desc):
            ims = list(pool.map(render or _vision_image, jobs[i:i + 1000], chunksize=50))
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


# ----------------------------------------------------------------------------- vision targets


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


# ----------------------------------------------------------------------------- LLaVA JSON (routing systems)


def roe_data(n: int, start: int = 0, wide: bool = False) -> Path:
    """LLaVA JSON of train-split scenes start .. start+n-1 (runs/data/ for start 0, else
    runs/data_from<start>/); start >= --n-train gives scenes the dense finetune never saw. wide: the
    same scenes and answers with questions reworded and images restyled (scenes.grammar; never the
    shifted split's held-out words or styles), in runs/data_wide*/train_wide.json."""
    from ..scenes import SPLIT_SPAN, export_llava_json
    if not 0 <= start <= SPLIT_SPAN - n:
        raise ValueError(f"--roe-data-from must be in [0, {SPLIT_SPAN - n}], got {start}")
    data = RUNS / (("data_wide" if wide else "data") + (f"_from{start}" if start else ""))
    js = data / ("train_wide.json" if wide else "train.json")
    if not js.is_file() or len(json.loads(js.read_text())) != n:
        export_llava_json("train", n, data, image_size=256, start=start, wide=wide)
    return js


# ----------------------------------------------------------------------------- datasets for train.loop.fit
# fit batches a dataset of (image, turns) items with its encoder: encoder.encode(turns) per item, then
# encoder.collate(encoded, images). The collators below stand in for the ConversationEncoder so that
# the items' "images" can be cached pixel tensors.


@dataclass
class LMBatch:
    """Right-padded conversations (answers never see padding, so no attention mask is needed)."""
    input_ids: Tensor          # (B, S)
    answer_mask: Tensor        # (B, S) bool: answer tokens + end-of-turn (as in Batch.answer_mask)
    pixel_values: Tensor       # (B, 3, H, W) fp32

    def to(self, device, **kwargs) -> "LMBatch":     # accelerate may pass non_blocking=...
        return LMBatch(*(t.to(device, **kwargs) for t in (self.input_ids, self.answer_mask, self.pixel_values)))


class PixelConversations(Dataset):
    """(cached pixels, [(question, answer), ...]) per sample: what align and finetune train on."""

    def __init__(self, pixel_values: Tensor, samples):
        self.pv = pixel_values
        self.turns = [[(qa.question, qa.answer) for qa in s.turns] for s in samples]

    def __len__(self) -> int:
        return len(self.turns)

    def __getitem__(self, i):
        return self.pv[i], self.turns[i]


class LMCollator:
    """fit's encoder for PixelConversations: the model's ConversationEncoder tokenises, the batch is
    right-padded (LMBatch) and the cached pixels are stacked."""

    def __init__(self, encoder):
        self.encoder = encoder

    def encode(self, turns):
        return self.encoder.encode(turns)

    def collate(self, convs, pixel_values) -> LMBatch:
        S = max(len(c.input_ids) for c in convs)
        tok = self.encoder.tokenizer
        ids = torch.full((len(convs), S), tok.pad_token_id if tok.pad_token_id is not None else 0, dtype=torch.long)
        ans = torch.zeros(len(convs), S, dtype=torch.bool)
        for b, c in enumerate(convs):
            ids[b, :len(c.input_ids)] = torch.tensor(c.input_ids)
            for s, e in c.answer_spans:
                ans[b, s:e] = True
        return LMBatch(ids, ans, torch.stack(list(pixel_values)).float())


@dataclass
class VisionBatch:
    pixel_values: Tensor              # (B, 3, H, W) fp32
    targets: dict[str, Tensor]        # vision_targets rows

    def to(self, device, **kwargs) -> "VisionBatch":
        return VisionBatch(self.pixel_values.to(device, **kwargs),
                           {k: v.to(device, **kwargs) for k, v in self.targets.items()})


class PixelTargets(Dataset):
    """(cached pixels, index) per scene; VisionCollator looks the index's targets up."""

    def __init__(self, pixel_values: Tensor):
        self.pv = pixel_values

    def __len__(self) -> int:
        return len(self.pv)

    def __getitem__(self, i):
        return self.pv[i], i


class VisionCollator:
    """fit's encoder for PixelTargets: no text; a batch is the stacked pixels and their targets."""

    def __init__(self, targets: dict[str, Tensor]):
        self.targets = targets

    def encode(self, index: int) -> int:
        return index

    def collate(self, indices, pixel_values) -> VisionBatch:
        idx = torch.tensor(list(indices))
        return VisionBatch(torch.stack(list(pixel_values)).float(), {k: v[idx] for k, v in self.targets.items()})
