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


def test_box_larger_than_the_image_is_edge_extended_at_model_scale():
    image = np.zeros((4, 6, 3), np.uint8)
    image[0] = 200  # the first row bright: the rows above the image repeat it
    box = region.context_box(np.full((4, 6), 255, np.uint8), padding=0.25)
    assert box.w == 6 + 2 * 2 and box.y < 0
    rgb, m = region.to_model(image, np.full((4, 6), 255, np.uint8), box, 20)
    assert rgb.shape == (20, 20, 3) and m.shape == (20, 20)
    assert (rgb[0] == rgb[1]).all() and rgb[0, 10, 0] > 0.5  # overhang: the edge repeated
    assert m.min() == 1.0


def test_a_huge_padded_box_never_materialises_at_image_scale():
    # padding 4 around a 1000 px selection: a 9000 px box (243 MB at image scale) is never built
    import tracemalloc

    image = np.zeros((1000, 1000, 3), np.uint8)
    mask = np.full((1000, 1000), 255, np.uint8)
    box = region.context_box(mask, padding=4)
    assert box.w == 9000
    tracemalloc.start()
    rgb, _ = region.to_model(image, mask, box, 64)
    back = region.from_model(rgb, box, region.selection_bounds(mask))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert back.shape == (1000, 1000, 3)
    assert peak < 8 * image.nbytes  # a few copies of the image, never the box (243 MB)


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
