"""Does an image look like the images a base was trained on? A score on the projected image features (what
the decoder reads), so that an answer about an image from elsewhere (a photo, for a model that has only
seen generated scenes) can say that it is a guess.

    fam = Familiarity.fit(base, image_batches)          # mean / covariance of training images' vision features
    fam = fam.with_threshold(tau)                       # chosen on held-out in-distribution images (+ others)
    fam.save(folder); fam = Familiarity.load(folder)    # familiarity.safetensors (fp32, d + d^2) + .json
    fam.scores(base, pixel_values) -> (B,)              # log of the mean squared z-score over tokens and channels
    fam.check(base, pixel_values) -> [ImageCheck]       # the score, the threshold, unfamiliar or not, a note

The features are the vision tower's, at the layer LLaVA hands its projector. The score is log(mean over an
image's tokens of the squared Mahalanobis distance / d) under one Gaussian (mean, full covariance) fitted on
every image token of the fitting images: ~0 for features like the training ones, larger the further away.
Measured on the embedded model (roe_core/embedded/familiarity.py), per-channel z-scores and the projected
features did not separate photos from scenes; per-token Mahalanobis on these features did. It is the image
analogue of the route guard (systems.route_guard), which scores the routers' inputs.
A base without a familiarity file gets no check (None), never a guess at one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from .weights import load_tensors, save_tensors, weights_exist

FILE = "familiarity.safetensors"
META = "familiarity.json"
NOTE = "This image looks unlike anything this model was trained on ({trained_on}): treat the answer as a guess."


@dataclass
class ImageCheck:
    score: float
    threshold: float | None          # None: the base's statistics carry no threshold (scores only)
    unfamiliar: bool
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def image_features(base: nn.Module, pixel_values: Tensor) -> Tensor:
    """(B, N, d_vision) the vision features LLaVA hands its projector: the vision tower's hidden states at
    `vision_feature_layer`, CLS dropped under the "default" select strategy (fp32)."""
    llava, cfg = base.model, base.config
    tower = llava.vision_tower
    dtype = next(tower.parameters()).dtype
    out = tower(pixel_values=pixel_values.to(base.device, dtype), output_hidden_states=True)
    layer = cfg.vision_feature_layer
    h = out.hidden_states[layer if isinstance(layer, int) else layer[-1]]
    if cfg.vision_feature_select_strategy == "default":
        h = h[:, 1:]
    return h.float()


class Familiarity:
    """A Gaussian (mean, full covariance) over every image token's vision features of the fitting images,
    and the threshold above which an image is called unfamiliar (None: scores are given, no verdict).
    An image's score: log of the mean over its tokens of the squared Mahalanobis distance / d."""

    SHRINK = 1e-3      # covariance + SHRINK * mean variance * I: invertible whatever the features

    def __init__(self, mean: Tensor, precision: Tensor, threshold: float | None = None, trained_on: str = ""):
        self.mean, self.precision = mean.float().cpu(), precision.float().cpu()
        self.threshold = threshold
        self.trained_on = trained_on

    @classmethod
    @torch.no_grad()
    def fit(cls, base: nn.Module, batches: Iterable[Tensor], trained_on: str = "") -> "Familiarity":
        """Mean and covariance over every image token of the pixel batches (running sums in fp64: memory
        does not grow with the number of images)."""
        n, s1, s2 = 0, None, None
        for pv in batches:
            f = image_features(base, pv).flatten(0, 1).double().cpu()
            s1 = f.sum(0) if s1 is None else s1 + f.sum(0)
            s2 = f.T @ f if s2 is None else s2 + f.T @ f
            n += f.shape[0]
        if n < 2:
            raise ValueError("too few images to fit the familiarity statistics on")
        mean = s1 / n
        cov = s2 / n - torch.outer(mean, mean)
        d = cov.shape[0]
        cov = cov + cls.SHRINK * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype)
        return cls(mean, torch.linalg.inv(cov), None, trained_on)

    def with_threshold(self, threshold: float | None) -> "Familiarity":
        return Familiarity(self.mean, self.precision, threshold, self.trained_on)

    @torch.no_grad()
    def scores(self, base: nn.Module, pixel_values: Tensor) -> Tensor:
        f = image_features(base, pixel_values)
        z = f - self.mean.to(f.device)
        m = ((z @ self.precision.to(f.device)) * z).sum(-1)           # (B, N) squared Mahalanobis distances
        return (m.mean(1) / z.shape[-1]).log().cpu()

    def check(self, base: nn.Module, pixel_values: Tensor) -> list[ImageCheck]:
        out = []
        for s in self.scores(base, pixel_values).tolist():
            bad = self.threshold is not None and s > self.threshold
            note = NOTE.format(trained_on=self.trained_on or "its training images") if bad else None
            out.append(ImageCheck(round(s, 4), self.threshold, bad, note))
        return out

    def save(self, folder: str | Path, **record) -> Path:
        """folder/familiarity.safetensors (fp32 statistics) + familiarity.json (threshold, what the model
        was trained on, and whatever `record` says of how the threshold was chosen)."""
        folder = Path(folder)
        save_tensors({"mean": self.mean, "precision": self.precision}, folder / FILE, keep_fp32=lambda n: True)
        meta = {"threshold": self.threshold, "trained_on": self.trained_on, **record}
        (folder / META).write_text(json.dumps(meta, indent=1))
        return folder / FILE

    @classmethod
    def load(cls, folder: str | Path | None) -> "Familiarity | None":
        """The statistics in folder/familiarity.safetensors, or None when there are none."""
        if folder is None or not weights_exist(Path(folder) / FILE):
            return None
        folder = Path(folder)
        meta = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
        t = load_tensors(folder / FILE)
        return cls(t["mean"], t["precision"], meta.get("threshold"), meta.get("trained_on", ""))
