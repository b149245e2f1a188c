"""Regions: the context box, the crop, and compositing that keeps unselected bytes exact."""

import numpy as np
import pytest

from engine import region


def _mask(h: int, w: int, box: tuple[int, int, int, int], value: int = 255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    x, y, bw, bh = box
    m[y : y + bh, x : x + bw] = value
    return m


def test_context_box_is_square_padded_and_inside_the_image():
    m = _mask(300, 400, (100, 50, 40, 20))
    box = region.context_box(m, padding=0.25)
    assert box.w == box.h == 40 + 2 * 10
    assert 0 <= box.x and box.x + box.w <= 400 and 0 <= box.y and box.y + box.h <= 300
    sel = region.selection_bounds(m)
    assert box.x <= sel.x and sel.x + sel.w <= box.x + box.w
    assert box.y <= sel.y and sel.y + sel.h <= box.y + box.h


def test_context_box_near_a_corner_is_shifted_inside():
    box = region.context_box(_mask(100, 100, (0, 0, 10, 10)), padding=0.5)
    assert (box.x, box.y, box.w) == (0, 0, 20)


def test_box_larger_than_the_image_is_edge_extended():
    image = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3)
    box = region.context_box(np.full((4, 6), 255, np.uint8), padding=0.25)
    assert box.w == 6 + 2 * 2 and box.y < 0
    patch = region.crop(image, box)
    assert patch.shape == (box.h, box.w, 3)
    # the rows above the image repeat its first row
    assert (patch[0, -box.x : -box.x + 6] == image[0]).all()


def test_composite_keeps_exact_bytes_where_alpha_is_zero_and_takes_the_edit_at_full_alpha():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:25] = rng.integers(0, 256, (10, 15), dtype=np.uint8)
    mask[8, 12] = 255
    sel = region.selection_bounds(mask)
    edit = rng.integers(0, 256, (sel.h, sel.w, 3), dtype=np.uint8)
    out = region.composite(image, region.layer_pixels(edit, mask, sel), sel)
    assert (out[mask == 0] == image[mask == 0]).all()
    assert (out[..., 3] == image[..., 3]).all()
    assert (out[8, 12, :3] == edit[8 - sel.y, 12 - sel.x]).all()


@pytest.mark.parametrize(
    "image, mask, message",
    [
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), "empty"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 9), 255, np.uint8), "same size"),
        (np.zeros((8, 8, 3), np.uint16), np.full((8, 8), 255, np.uint8), "8-bit"),
        (np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8), "8-bit"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_message(image, mask, message):
    with pytest.raises(region.RegionError, match=message):
        region.check_inputs(image, mask)
