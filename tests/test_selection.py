"""The selection's round trip through a real edit (tiny models): a feathered edge gets the whole
edit, faded once by its alpha; border and long selections; grow and feather by the engine."""

import numpy as np
import pytest

from engine import region
from engine.methods.pixel import run_edit
from engine.region import composite
from engine.shared.geometry import Rect
from engine.shared.request import Settings

FAST = dict(steps=12, skip=3, variants=2, augmentations=2, seed=5)


def _feathered_disc(size: int, radius: float, band: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    alpha = np.clip((radius - np.hypot(xx - size / 2, yy - size / 2)) / band, 0, 1)
    return (alpha * 255).round().astype(np.uint8)


def _flat(size: int) -> np.ndarray:
    return np.zeros((size, size, 3), np.uint8)


def _textured(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    stripes = 127 + 100 * np.sin(xx / 3.0) * np.cos(yy / 5.0)
    return np.stack([stripes, (xx * 4) % 256, (yy * 4) % 256], axis=2).astype(np.uint8)


@pytest.mark.parametrize("picture", [_flat, _textured])
def test_a_feathered_edge_gets_the_edit_at_full_strength_faded_once(tiny_models, picture):
    """Every alpha band changes the picture as much, per unit of alpha, as the interior: the
    whole selection is editable (the hard mask), and the layer fades the edit once, by exactly
    the selection's alpha. (CLIP judges the edit through that alpha, so the band's content is
    not the hard selection's edit.)"""
    image, mask = picture(64), _feathered_disc(64, 24, 12)
    a = mask / 255.0
    soft = run_edit(tiny_models, image, mask, "a red circle", Settings(**FAST))
    strengths = {0.3: [], 0.5: [], 0.7: []}
    for s in soft:
        b = s.box
        assert (s.rgba[..., 3] == mask[b.y : b.y + b.height, b.x : b.x + b.width]).all()
        out = composite(image, s.rgba, s.box).astype(float)
        change = np.abs(out - image).mean(axis=2)
        inside = change[mask == 255].mean()
        assert inside > 20  # the edit is there to measure
        for band, values in strengths.items():
            px = np.abs(a - band) < 0.05
            values.append((change[px] / a[px]).mean() / inside)
    for band, values in strengths.items():
        strength = np.mean(values)
        assert 0.9 <= strength <= 1.1, f"alpha {band}: {strength:.0%} of the interior's edit"


@pytest.mark.parametrize(
    "shape, sel",
    [
        ((60, 160), (0, 0, 160, 24)),  # a sky: a top strip, the picture's full width
        ((120, 48), (36, 0, 12, 120)),  # a right-hand strip
        ((50, 70), (0, 0, 70, 50)),  # the whole picture
        ((80, 80), (79, 30, 1, 1)),  # one pixel at the border
    ],
)
def test_border_and_long_selections_edit_inside_and_keep_every_other_byte(tiny_models, shape, sel):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    mask = np.zeros(shape, np.uint8)
    x, y, w, h = sel
    mask[y : y + h, x : x + w] = 255
    for v in run_edit(tiny_models, image, mask, "a blue square", Settings(**FAST)):
        assert v.box == Rect(*sel)
        out = composite(image, v.rgba, v.box)
        assert (out[mask == 0] == image[mask == 0]).all()
        assert (out[mask == 255] != image[mask == 255]).any()


def test_grow_and_feather_are_done_by_the_engine_and_nothing_beyond_changes(tiny_models):
    image = _textured(64)
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 24:40] = 255
    settings = Settings(grow=4, feather=6, **FAST)
    shaped = region.shape_selection(mask, 4, 6)
    for v in run_edit(tiny_models, image, mask, "a red circle", settings):
        assert v.box == region.selection_bounds(shaped)
        b = v.box
        assert (v.rgba[..., 3] == shaped[b.y : b.y + b.height, b.x : b.x + b.width]).all()
        out = composite(image, v.rgba, v.box)
        assert (out[shaped == 0] == image[shaped == 0]).all()
        ring = (mask == 0) & (shaped > 128)  # grown and feathered beyond the selection
        assert (np.abs(out[ring].astype(int) - image[ring]).sum(axis=1) > 0).mean() > 0.9
