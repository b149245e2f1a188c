"""Detail at any size in the demo world: the refinement pass sharpens a large edit without adding
shapes or losing the prompt's colour (engine/demo/sharpness.py's measures)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.demo import sharpness as sh
from engine.demo import world
from engine.methods.pixel import run_edit
from engine.models import load_models
from engine.region import composite
from engine.shared.request import Settings

# the clean-disc setting (engine/demo/sharpness.py CLEAN): the demo model's base edit of this
# selection is one clean red disc at seeds 1-5 and 7 of 0-7 (README)
QUICK = dict(variants=1, seed=0, steps=sh.CLEAN["steps"], skip=sh.CLEAN["skip"],
             guidance_weight=sh.CLEAN["guidance_weight"], refine=False)  # the base edit alone


def _blurred(rgb: np.ndarray, scale: int) -> np.ndarray:
    """`rgb` shrunk by `scale` and enlarged again: what a base edit without the pass looks like."""
    x = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
    small = F.interpolate(x, scale_factor=1 / scale, mode="area")
    big = F.interpolate(small, size=rgb.shape[:2], mode="bicubic")
    return big[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()


def test_the_measures_read_drawn_shapes_as_drawn():
    image, mask = sh.picture()
    drawn = sh.drawn_circle(image, mask).astype(np.uint8)
    sharp = sh.edge_width(sh.redness(drawn))
    assert 0.5 <= sharp <= 1.5  # the renderer's anti-aliased edge: about a pixel
    assert sh.edge_width(sh.redness(_blurred(drawn, 4))) > 2 * sharp
    assert sh.blobs(drawn) == 1 and sh.blob_colour(drawn)[0] > 200
    two = drawn.copy()
    two[:10, :10] = world.COLOURS["blue"]
    assert sh.blobs(two) == 2
    # a faint shape (a third of the way to green) beside the circle counts; the demo model's
    # regenerated background (within about 20 of the picture's) counts none
    ys, xs = np.nonzero(mask)
    left = (xs.min() + xs.max() + 1) / 2 - 0.35 * (xs.max() - xs.min() + 1)  # the circle's
    faint = world.Shape("triangle", "green", left - 12, (ys.min() + ys.max() + 1) / 2, 8)
    a = 0.33 * world.coverage(faint, image.shape[0])[..., None]
    beside = np.rint(drawn * (1 - a) + np.asarray(world.COLOURS["green"]) * a).astype(np.uint8)
    assert sh.blobs(beside) == 2
    g = np.random.default_rng(0)
    stray = np.clip(drawn + g.normal(0, 6, drawn.shape), 0, 255).astype(np.uint8)
    assert sh.blobs(stray) == 1
    shaded = drawn.copy()  # its left half in shadow, half way to black: still one red blob
    half = (sh.redness(drawn) > 0.2) & (np.arange(drawn.shape[1]) < left + 30)[None]
    shaded[half] //= 2
    assert sh.blobs(shaded) == 1
    tex, tex_mask = sh.textured()
    assert sh.hf_ratio(tex, tex_mask) == pytest.approx(1, abs=0.2)  # the same texture inside
    soft = np.where(tex_mask[..., None] > 0, _blurred(tex, 4), tex)  # enlarged inside only
    assert sh.hf_ratio(soft, tex_mask) < 0.2


@pytest.fixture(scope="module")
def demo():
    return load_models("demo", device="cpu")


def _seen(models, image, mask, **overrides):
    best = run_edit(models, image, mask, sh.PROMPT, Settings(**(QUICK | overrides)))[0]
    b = best.box
    out = composite(image, best.rgba, b)
    return out, out[b.y : b.y + b.height, b.x : b.x + b.width]


ON = dict(refine=True)  # at its default strength, 0.1


@pytest.mark.parametrize("seed", [2, 3])
def test_the_pass_narrows_a_clean_discs_edge_keeping_its_blobs_and_red(demo, seed):
    """Measured over seeds 0-7 (README, fp32): without the pass 4.19 +- 0.27 px over the 6
    clean discs, 3.12 +- 0.32 with it at its defaults (drawn: 1.5); seeds 2 and 3: 4.25 -> 3.0
    and 4.0 -> 3.0. Another AVX2 EPYC (Zen 3, fp32) measured 4.75 -> 4.25 and 4.0 -> 3.0: the
    CPU's kernels move a seed's figures, so the margin is the smallest seen, half a pixel."""
    image, mask = sh.picture()  # a round selection, its context box 4x the demo model's 32 px
    _, soft = _seen(demo, image, mask, seed=seed)
    _, sharp = _seen(demo, image, mask, seed=seed, **ON)
    before, after = sh.edge_width(sh.redness(soft)), sh.edge_width(sh.redness(sharp))
    assert sh.blobs(soft) == 1 and sh.is_red(sh.blob_colour(soft))  # a clean disc to measure
    drawn = sh.edge_width(sh.redness(sh.drawn_circle(image, mask)))
    assert before > 2 * drawn  # readable and soft
    assert after <= before - 0.5  # narrower by a margin
    assert sh.blobs(sharp) == sh.blobs(soft)
    assert sh.is_red(sh.blob_colour(sharp))
    assert np.abs(np.subtract(sh.blob_colour(sharp), sh.blob_colour(soft))).max() < 40


def test_the_square_setting_is_a_patchwork_at_the_default_guidance(demo):
    """Why the clean-disc setting: at the demo model's default weight (300) a square selection
    this large came back as a patchwork, with no readable edge at seed 2."""
    image, mask = sh.picture(shape="square")
    _, soft = _seen(demo, image, mask, seed=2, guidance_weight=None, steps=20, skip=4)
    assert not np.isfinite(sh.edge_width(sh.redness(soft)))


def test_the_pass_brings_back_some_texture_detail(demo):
    """Measured 0.035 +- 0.007 without the pass, 0.076 +- 0.013 with it at the image's own scale
    (refine_cap 0; the texture: 1). The default pass, within the base edit's work, is smaller."""
    image, mask = sh.textured()
    soft, _ = _seen(demo, image, mask)
    sharp, _ = _seen(demo, image, mask, **ON, refine_cap=0)
    assert sh.hf_ratio(sharp, mask) > 1.5 * sh.hf_ratio(soft, mask)
