"""The embedded model's image-familiarity check (runtime.familiarity): statistics of its projected image
features over training scenes, and the threshold above which an answer says the image is unlike them.

    python -m roe_core.embedded familiarity [--fit-n 1000] [--calibrate-n 400]

- statistics: --fit-n train-split scenes drawn plainly + --fit-n reworded/restyled ones (grammar, the wide
  training distribution);
- the threshold, chosen on val (never the test split): the highest score of --calibrate-n plain val scenes,
  --calibrate-n restyled val scenes and --calibrate-n shifted-split scenes (other sizes, outlines, tones, JPEG)
  is the floor (no scene may get the note), and real photos that ship inside installed packages (gradio's
  media assets; scikit-image's sample data when it is installed) set how far above it: halfway from the
  highest scene to the median photo (at least 0.02 above the scenes), a margin for scene styles not seen;
- writes assets/embedded/familiarity.{safetensors,json} with every score summary and the photos' names.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..runtime.familiarity import Familiarity
from .base import ASSETS, TRAINED_ON, build_base, image_processor


def package_photos(include_skimage: bool = True) -> dict[str, object]:
    """Real photos that ship inside installed packages: {name: PIL image}. gradio's media assets (always
    installed here) and, when installed, scikit-image's sample data (colour photos only)."""
    from PIL import Image
    import gradio
    out = {}
    media = Path(gradio.__file__).parent / "media_assets" / "images"
    for name in ("cheetah.jpg", "cheetah1.jpg", "lion.jpg", "tower.jpg", "bus.png"):
        if (media / name).is_file():
            out[f"gradio:{name}"] = Image.open(media / name).convert("RGB")
    if include_skimage:
        try:
            from skimage import data
        except ImportError:
            return out
        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"):
            try:
                out[f"skimage:{name}"] = Image.fromarray(getattr(data, name)()).convert("RGB")
            except Exception:            # a file scikit-image would download: not here
                continue
    return out


def _pixels(images, batch: int = 64):
    proc = image_processor()
    for i in range(0, len(images), batch):
        yield proc(images=[im.convert("RGB") for im in images[i:i + batch]], return_tensors="pt")["pixel_values"]


def _scores(fam: Familiarity, base, images) -> list[float]:
    return [s for pv in _pixels(images) for s in fam.scores(base, pv).tolist()]


def scene_images(split: str, n: int, style: str = "plain", start: int = 0) -> list:
    """n scene images of a split: "plain" (256 px), "wide" (grammar's restyling) or "shifted"."""
    from ..scenes import make_shifted_split, render
    from ..scenes.grammar import make_wide_sample
    from ..scenes.splits import make_split, split_seeds
    if style == "shifted":
        return [s.image() for s in make_shifted_split(start + n)[start:]]
    if style == "wide":
        return [make_wide_sample(s).image() for s in list(split_seeds(split, start + n))[start:]]
    return [render(s.scene, 256) for s in make_split(split, n, start=start, n_turns=1)]


def calibrate_familiarity(fit_n: int = 1000, calibrate_n: int = 400, out: Path | None = None) -> dict:
    torch.manual_seed(0)
    base, _ = build_base(None)
    train = scene_images("train", fit_n) + scene_images("train", fit_n, "wide")
    fam = Familiarity.fit(base, _pixels(train), TRAINED_ON)
    scenes = {style: _scores(fam, base, scene_images("val", calibrate_n, style)) for style in ("plain", "wide")}
    scenes["shifted"] = _scores(fam, base, scene_images("shifted", calibrate_n, "shifted"))
    photos = package_photos()
    photo_scores = dict(zip(photos, _scores(fam, base, list(photos.values()))))
    top = max(max(v) for v in scenes.values())
    ranked = sorted(photo_scores.values())
    median = ranked[len(ranked) // 2] if ranked else top + 1.0
    # halfway from the highest scene to the typical photo (at least 0.02 above the scenes)
    tau = top + max(0.02, 0.5 * (median - top))
    record = {"chosen_on": {"val_plain": calibrate_n, "val_wide": calibrate_n, "shifted": calibrate_n,
                            "photos": sorted(photos)},
              "fit_on": {"train_plain": fit_n, "train_wide": fit_n},
              "scene_scores": {k: {"max": max(v), "mean": sum(v) / len(v)} for k, v in scenes.items()},
              "photo_scores": photo_scores,
              "photos_flagged": sum(s > tau for s in photo_scores.values()), "n_photos": len(photo_scores)}
    fam.with_threshold(round(tau, 4)).save(out or ASSETS, **record)
    return {"threshold": round(tau, 4), **record}


def main_familiarity(args) -> None:
    print(json.dumps(calibrate_familiarity(args.fit_n, args.calibrate_n), indent=1))
