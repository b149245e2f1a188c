"""The demo world: reproducible, and its captions say what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from engine.demo import world


def test_same_seed_same_images() -> None:
    a, ca = world.batch(np.random.default_rng(7), 16, p_second=0.5)
    b, cb = world.batch(np.random.default_rng(7), 16, p_second=0.5)
    c, _ = world.batch(np.random.default_rng(8), 16, p_second=0.5)
    assert ca == cb and np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batch_format() -> None:
    x, captions = world.batch(np.random.default_rng(0), 8)
    assert x.shape == (8, 3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    assert all(c in world.CAPTIONS for c in captions)


@pytest.mark.parametrize("colour", list(world.COLOURS))
@pytest.mark.parametrize("kind", world.SHAPES)
def test_caption_names_the_drawn_colour(colour: str, kind: str) -> None:
    rng = np.random.default_rng(world.CAPTIONS.index(f"a {colour} {kind}"))
    for _ in range(5):
        shapes, bg = world.scene(rng, colour, kind)
        img = world.render(shapes, bg)
        assert shapes[0].caption == f"a {colour} {kind}"
        inside = world.coverage(shapes[0]) == 1  # pixels wholly inside, no anti-aliased edge
        assert inside.sum() >= 8
        mean = img[inside].mean(axis=0)
        assert np.abs(mean - world.COLOURS[colour]).max() <= 1
        # The background is plain and far from the shape's colour, so the shape stands out.
        corner_far = world.coverage(shapes[0]) == 0
        assert np.linalg.norm(img[corner_far].mean(axis=0) - mean) >= world.MIN_CONTRAST - 1


def test_draw_caption_matches_colour() -> None:
    """`draw`'s caption alone tells the shape's colour: the pixels far from the background."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        img, caption = world.draw(rng)
        colour = caption.split()[1]
        flat = img.reshape(-1, 3).astype(float)
        values, counts = np.unique(flat, axis=0, return_counts=True)
        bg = values[counts.argmax()]  # the plain background is the most common pixel
        shape_px = flat[np.linalg.norm(flat - bg, axis=1) > world.MIN_CONTRAST / 2]
        # Edge pixels are blends, so compare the typical (median) shape pixel.
        assert np.abs(np.median(shape_px, axis=0) - world.COLOURS[colour]).max() <= 20


def test_shapes_differ() -> None:
    masks = {k: world.coverage(world.Shape(k, "red", 16.0, 16.0, 8.0)) > 0.5 for k in world.SHAPES}
    areas = {k: m.sum() for k, m in masks.items()}
    # square 16x16 = 256 > circle pi*8^2 ~ 201 > triangle 16*16/2 = 128
    assert areas["square"] > areas["circle"] > areas["triangle"]
    assert abs(areas["square"] - 256) <= 16 and abs(areas["triangle"] - 128) <= 16
    for a in world.SHAPES:
        for b in world.SHAPES:
            if a != b:
                assert (masks[a] != masks[b]).sum() >= 30


def test_second_shape_named_and_apart() -> None:
    rng = np.random.default_rng(5)
    two = 0
    for _ in range(30):
        shapes, _ = world.scene(rng, second=True)
        if len(shapes) == 2:
            two += 1
            overlap = (world.coverage(shapes[0]) > 0) & (world.coverage(shapes[1]) > 0)
            assert not overlap.any()
    assert two >= 20


def test_unknown_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        world.coverage(world.Shape("hexagon", "red", 16.0, 16.0, 8.0))
