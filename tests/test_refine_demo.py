"""Detail at any size in the demo world: the refinement pass sharpens a large edit without adding
shapes or losing the prompt's colour (engine/demo/sharpness.py's measures)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.demo import sharpness as sh
from engine.demo import world
from engine.edit import EditSettings, run_edit
from engine.models import load_models
from engine.region import composite

QUICK = dict(variants=1, steps=20, skip=4, seed=0)


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
    tex, tex_mask = sh.textured()
    assert sh.hf_ratio(tex, tex_mask) == pytest.approx(1, abs=0.2)  # the same texture inside
    soft = np.where(tex_mask[..., None] > 0, _blurred(tex, 4), tex)  # enlarged inside only
    assert sh.hf_ratio(soft, tex_mask) < 0.2


@pytest.fixture(scope="module")
def demo():
    return load_models("demo", device="cpu")


def _seen(models, image, mask, **overrides):
    best = run_edit(models, image, mask, sh.PROMPT, EditSettings(**(QUICK | overrides)))[0]
    b = best.box
    out = composite(image, best.rgba, b)
    return out, out[b.y : b.y + b.h, b.x : b.x + b.w]


# The pass on at its default strength; it is off by default (README: in the demo world it added
# tile-shaped patches from strength 0.15 on). The demo UNet's base edit of this large selection
# is not one clean disc but a patchwork of colours (one connected blob), so the edge width of
# "the" circle cannot be read without the pass (nan) and is not asserted; what is asserted is
# what the README measured at these settings: no blob added, red kept, some detail back.
ON = dict(refine=True)


def test_the_pass_keeps_the_blobs_and_the_prompts_colour(demo):
    image, mask = sh.picture()  # a context box 4x the demo model's 32 px
    _, soft = _seen(demo, image, mask)
    _, sharp = _seen(demo, image, mask, **ON)
    assert sh.blobs(sharp) == sh.blobs(soft) >= 1
    before, after = sh.blob_colour(soft), sh.blob_colour(sharp)
    assert after[0] - max(after[1:]) > 120 and np.abs(np.subtract(after, before)).max() < 40
    assert not np.array_equal(soft, sharp)  # the pass ran


def test_the_pass_brings_back_some_texture_detail(demo):
    """Measured 0.071 without the pass, 0.104 with it (the texture itself: 1)."""
    image, mask = sh.textured()
    soft, _ = _seen(demo, image, mask)
    sharp, _ = _seen(demo, image, mask, **ON)
    assert sh.hf_ratio(sharp, mask) > 1.25 * sh.hf_ratio(soft, mask)
