"""demo-latent, the latent demo world's model: the latent method obeys prompts where training
never put a shape, over backgrounds it never saw; thin selections edit with progressive mask
shrinking; the paper's applications do what a viewer would check."""

from unittest.mock import patch

import numpy as np
import pytest

from engine.demo import applications as apps
from engine.demo import latent_world, obeys
from engine.demo.ablation import Reader
from engine.demo.world import COLOURS, SHAPES, Shape, render
from engine.latent_models import DEMO_LATENT, DEMO_LATENT_DIR
from engine.methods import latent
from engine.region import composite
from engine.shared.request import LATENT, check

# the gated subset of the obeys table (docs/demo-latent-obeys.md): a colour and a shape each
GATED = [("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("white", "circle")]


@pytest.fixture(scope="module")
def method():
    return latent.load(DEMO_LATENT, device="cpu")


@pytest.fixture(scope="module")
def reader(method):
    return Reader(method)


def test_demo_latent_is_a_small_sd_shaped_diffusers_folder_named_demo(method):
    size = sum(f.stat().st_size for f in DEMO_LATENT_DIR.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MiB"
    pipe = method.pipe
    assert pipe.weights == "demo" and "demo" in method.label
    assert "demo" in method.clip.label  # ranked by the demo CLIP, not an absent ViT-B/16
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_factor == 8
    assert pipe.native // pipe.vae_factor >= 8
    assert pipe.text_encoder.config.vocab_size == 49408  # CLIP's whole BPE vocabulary


@pytest.mark.parametrize("colour", list(COLOURS))
@pytest.mark.parametrize("shape", SHAPES)
def test_the_pixel_judge_reads_a_drawn_shape(colour, shape):
    """The judge itself, on shapes drawn by the world (not by a model)."""
    shape_ = Shape(shape, colour, 14.0, 14.0, 10.0)
    background = latent_world.PHOTO["dusk" if colour in ("white", "yellow") else "sand"]
    rgb = render([shape_], np.asarray(background), 28)
    assert obeys.pixel_check(rgb, colour, shape)
    others = [s for s in SHAPES if s != shape]
    assert not any(obeys.pixel_check(rgb, colour, s) for s in others)
    other = next(c for c in COLOURS if latent_world.contrast(COLOURS[c], COLOURS[colour]) > 150)
    assert not obeys.pixel_check(rgb, other, shape)


def test_test_cases_are_where_training_never_was():
    corner = latent_world.SIZE * 5 / 8  # training centres no shape right of and below it
    for c in obeys.cases():
        x, y, side = c.box
        assert min(x, y) + side / 2 >= corner + 6  # the box's centre, 6 px inside the corner
        assert not latent_world.allowed(x + side / 2, y + side / 2)
        assert x + side <= latent_world.SIZE and y + side <= latent_world.SIZE
    rng = np.random.default_rng(0)
    shapes = [latent_world.training_shape(rng) for _ in range(500)]
    assert all(latent_world.allowed(s.cx, s.cy) for s in shapes)


def test_it_paints_the_asked_colour_in_a_gated_subset(method, reader):
    """The gate is below the issue's targets (docs/demo-latent.md: not met): the asked colour in
    most variants, a whole obeying variant (colour and shape, both judges) in some cases, and a
    swapped prompt's colour never taken for the asked one."""
    chosen = [obeys.case(c, s) for c, s in GATED]
    edit = obeys.latent_editor(method)
    row = obeys.measure(edit, reader, chosen)
    swapped = obeys.measure(edit, reader, chosen, "swapped prompt")
    figures = f"asked: {row}; swapped prompt: {swapped}"
    assert row["colour"] >= 0.6 and row["best_of_4"] >= 0.25, figures
    assert swapped["colour"] <= 0.25 and swapped["every_variant"] <= 0.25, figures


def test_a_thin_stroke_edits_with_progressive_mask_shrinking_only_inside(method):
    """A 3 px stroke, thinner than a latent cell (8 px): with progressive mask shrinking against
    the official repository's mask (the cells it covers half of: none here)."""
    image, mask = apps.thin_stroke()
    changes = {}
    for name, shrink, masks in (
        ("official", 0, apps.official_masks), ("no shrinking", 0, None), ("shrinking", None, None)
    ):  # fmt: skip
        values = {"seed": 1, "variants": 4, "strength": 100, "mask_shrink": shrink}
        with patch.object(latent, "latent_masks", masks or latent.latent_masks):
            variants = latent.run_edit(
                method, image, mask, apps.THIN_PROMPT, check(values, method=LATENT)
            )
        changes[name] = np.mean([apps.change_inside(image, mask, v) for v in variants])
        for v in variants:
            seen = composite(image, v.rgba, v.box)
            assert np.array_equal(seen[mask == 0], image[mask == 0])
    figures = ", ".join(f"{k} {v:.1f}" for k, v in changes.items())
    assert changes["shrinking"] >= 3 * changes["official"], f"mean change in the stroke: {figures}"


def _result(method, app, seed=1):
    image, mask = app.inputs()
    values = {"seed": seed, "variants": 4, "strength": app.strength}
    settings = check(values | {"negative_prompt": app.negative_prompt}, method=LATENT)
    return image, mask, latent.run_edit(method, image, mask, app.prompt, settings)[0]


def _distance(pixels, colour):
    return float(np.linalg.norm(pixels.reshape(-1, 3).mean(0) - np.asarray(colour)))


def test_replace_the_background(method):
    image, mask, best = _result(method, apps.BACKGROUND)
    seen = composite(image, best.rgba, best.box)
    kept = mask == 0
    assert np.array_equal(seen[kept], image[kept])  # the object, untouched
    teal = latent_world.BACKGROUNDS["teal"]
    now, before = _distance(seen[mask == 255], teal), _distance(image[mask == 255], teal)
    assert now < 60 and now < before / 2, f"distance to teal {now:.0f}, before {before:.0f}"


def test_add_an_object_from_a_scribble(method, reader):
    image, mask, best = _result(method, apps.SCRIBBLE)
    box = (slice(30, 60), slice(30, 60))
    seen = composite(image, best.rgba, best.box)[box]
    redrawn = np.abs(seen.astype(float) - image[box]).mean()
    assert redrawn > 10, f"the scribble kept as it was (mean change {redrawn:.1f})"
    assert obeys.pixel_check(seen, "red", "circle") and reader.read(seen) == "a red circle"


def test_extend_past_the_border(method):
    image, mask, best = _result(method, apps.EXTEND)
    seen = composite(image, best.rgba, best.box).astype(float)
    old, strip = seen[:, : apps.SIZE], seen[:, apps.SIZE :]
    assert np.array_equal(old, image[:, : apps.SIZE])
    edge = old[:, -4:].reshape(-1, 3).mean(0)
    assert _distance(strip, edge) < 40, "the strip continues the picture's background"
    assert _distance(strip[:, :4], old[:, -4:].reshape(-1, 3).mean(0)) < 30, "no seam"
    white = np.linalg.norm(strip - COLOURS["white"], axis=-1) < 80
    assert white.mean() < 0.02, "no new object in the strip"


def test_remove_an_object_with_a_negative_prompt(method):
    image, mask, best = _result(method, apps.REMOVE)
    seen = composite(image, best.rgba, best.box).astype(float)
    inside = mask == 255
    red = np.linalg.norm(seen - COLOURS["red"], axis=-1) < 100
    assert red[inside].mean() < 0.02, f"{red[inside].mean():.1%} of the selection still red"
    assert np.array_equal(seen[~inside], image[~inside])


@pytest.mark.xfail(reason="not met (docs/demo-latent.md): demo-latent fills the removed object's "
                   "box with a lavender grey, 40 levels from the picture's grey", strict=True)
def test_the_removed_object_is_filled_with_the_pictures_background(method):
    image, mask, best = _result(method, apps.REMOVE)
    seen = composite(image, best.rgba, best.box).astype(float)
    inside = mask == 255
    around = image[~inside].reshape(-1, 3).mean(0)
    assert _distance(seen[inside], around) < 25, f"{_distance(seen[inside], around):.0f} levels"
