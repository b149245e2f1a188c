"""The refinement pass (engine/tiles.py): tiling, fusion, the edit's invariants with it (tiny)."""

import numpy as np
import pytest
import torch

from engine import region
from engine.guidance import Guide
from engine.methods import pixel
from engine.methods.pixel import plan, run_edit
from engine.models import load_models
from engine.shared import geometry, request
from engine.shared.geometry import Canvas, Rect, starts
from engine.shared.request import Settings
from engine.tiles import Tiled, ramp

# refine_cap 0: the pass at the image's own scale (the default keeps it within the base edit's
# work, which 6 base steps leave too little of for any pass here)
FAST = dict(steps=8, skip=2, variants=1, augmentations=2, seed=3, refine=True, refine_strength=0.3,
            refine_cap=0)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return load_models("tiny", device="cpu")


@pytest.mark.parametrize("length", [32, 33, 57, 100, 192, 1000])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_tiles_cover_the_canvas_and_overlap_as_asked(length, overlap):
    tile = 32
    s = starts(length, tile, overlap)
    assert s[0] == 0 and s[-1] + tile == max(length, tile)
    gaps = np.diff(s)
    assert (gaps > 0).all() and (tile - gaps >= int(overlap * tile)).all()
    assert ramp(tile, overlap).min() > 0 and ramp(tile, overlap).max() == 1


def _grid(width, height, overlap=0.25, tile=32):
    return geometry.tile_grid(Canvas(Rect(0, 0, width, height), width, height, (width, height)),
                              tile, overlap)  # fmt: skip


def _tiled(fn, width, height, overlap=0.25):
    calls = []

    def unet(x, t):
        calls.append(tuple(x.shape[-2:]))
        return fn(x, len(calls))

    return Tiled(unet, _grid(width, height, overlap), overlap), calls


def test_a_constant_prediction_fuses_to_the_same_constant():
    tiled, calls = _tiled(lambda x, _: torch.full((x.shape[0], 6, *x.shape[-2:]), 0.3), 160, 96)
    out = tiled(torch.zeros(2, 3, 96, 160), torch.zeros(2))
    assert out.shape == (2, 6, 96, 160)
    torch.testing.assert_close(out, torch.full_like(out, 0.3))
    assert set(calls) == {(32, 32)} and len(calls) == len(starts(96, 32, 0.25)) * len(
        starts(160, 32, 0.25)
    )


def test_fusion_is_seam_free_where_tiles_disagree():
    """Each tile predicts its own constant (a tile's bias): the fused canvas changes by at most
    the spread over the overlap per pixel, nowhere in one jump. Equal weights would jump."""
    biases = torch.rand(100, generator=torch.Generator().manual_seed(0))
    tiled, _ = _tiled(lambda x, k: biases[k].expand(x.shape[0], 1, *x.shape[-2:]).clone(), 160, 96)
    out = tiled(torch.zeros(1, 3, 96, 160), torch.zeros(1))[0, 0]
    spread = float(biases.max() - biases.min())
    step = max(out.diff(dim=0).abs().max(), out.diff(dim=1).abs().max())
    assert step <= 2 * spread / (0.25 * 32)


def test_identity_fuses_to_identity_and_one_tile_runs_as_is():
    tiled, calls = _tiled(lambda x, _: x, 80, 64)
    x = torch.randn(1, 3, 64, 80)
    torch.testing.assert_close(tiled(x, torch.zeros(1)), x)
    small, calls[:] = torch.randn(1, 3, 32, 24), []
    one = Tiled(lambda x, t: calls.append(tuple(x.shape[-2:])) or x, _grid(24, 32), 0.25)
    assert one(small, torch.zeros(1)) is small and calls == [(32, 24)]


def test_tiles_left_out_predict_nothing_and_the_rest_fuse_as_before():
    grid = _grid(96, 96)
    kept = [t for t in grid if t.x < 32 and t.y < 32]  # a selection in the top-left corner
    out = Tiled(lambda x, t: x + 1, kept, 0.25)(torch.zeros(1, 1, 96, 96), torch.zeros(1))
    assert (out[..., :32, :32] == 1).all() and (out[..., 64:, 64:] == 0).all()


def _refinement(box, base, cap):
    return geometry.refinement(base, 32, 4, cap=cap, overlap=0.5, steps=1, base_steps=1,
                               touches=lambda r: True)  # fmt: skip


def test_refine_canvas_caps_and_skips_small_gains():
    box = Rect(0, 0, 400, 200)
    base = geometry.canvas_for(box, 32, 4)
    assert _refinement(box, base, 0).canvas.size == (400, 200)
    w, h = _refinement(box, base, 2).canvas.size
    assert w * h == pytest.approx(64 * 64, rel=0.15) and w / h == pytest.approx(2, rel=0.1)
    small = Rect(0, 0, 40, 40)  # 1.25x: no pass
    assert _refinement(small, geometry.canvas_for(small, 32, 4), 0) is None


def _picture(size=96, sel=(24, 72)):
    g = np.random.default_rng(0)
    image = g.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[sel[0] : sel[1], sel[0] : sel[1]] = 255
    return image, mask


def test_the_pass_runs_for_a_large_selection_counts_its_steps_and_keeps_outside_bytes(tiny):
    image, mask = _picture()
    settings = Settings(**FAST, feather=6)
    shaped = region.shape_selection(mask, 0, 6)
    assert plan(32, tiny.downsampling, mask, settings).refinement
    steps, shown = [], []

    def on_step(done, total, previews):
        steps.append((done, total))
        shown.append(previews(16)[0])

    (v,) = run_edit(tiny, image, mask, "x", settings, on_step)
    base = FAST["steps"] - FAST["skip"]
    total = base + settings.refine_steps
    assert steps == [(d, total) for d in range(1, total + 1)]
    # previews go on through the pass, of the same box and size, showing the refined estimate
    assert {(p.box, p.rgba.shape) for p in shown} == {(v.box, (16, 16, 4))}
    assert all(isinstance(p.distance, float) for p in shown)
    assert not np.array_equal(shown[base - 1].rgba, shown[-1].rgba)
    out = region.composite(image, v.rgba, v.box)
    sel = region.selection_bounds(shaped)
    alpha = shaped[sel.y : sel.y + sel.height, sel.x : sel.x + sel.width]
    assert (v.box, v.rgba[..., 3].tolist()) == (sel, alpha.tolist())  # the feathered alpha
    assert (out[shaped == 0] == image[shaped == 0]).all()
    off = run_edit(tiny, image, mask, "x", Settings(**FAST | dict(feather=6, refine=False)))[0]
    assert not np.array_equal(v.rgba, off.rgba)  # the pass changed the edit


def test_a_guided_pass_judges_through_the_selections_alpha_on_its_own_canvas(tiny, monkeypatch):
    """refine_guidance > 0: CLIP sees the pass's estimate through the feathered alpha on the
    pass's canvas (region.seen_on_canvas), as the base edit and the ranking do."""
    image, mask = _picture()
    settings = Settings(**FAST, feather=6, refine_guidance=1, range_weight=0)
    shaped = region.shape_selection(mask, 0, 6)
    fine = plan(32, tiny.downsampling, mask, settings).refinement.canvas
    judged = []
    loss = Guide.loss

    def spy(self, masked, prompt, streams=None):
        judged.append(masked.detach().clone())
        return loss(self, masked, prompt, streams)

    monkeypatch.setattr(Guide, "loss", spy)
    (guided,) = run_edit(tiny, image, mask, "x", settings)
    seen = torch.from_numpy(region.seen_on_canvas(shaped, fine))
    on_fine = [m for m in judged if tuple(m.shape[-2:]) == (fine.height, fine.width)]
    assert len(on_fine) == settings.refine_steps  # every step of the pass guided
    for m in on_fine:
        assert (m[..., seen == 0] == 0).all() and (m[..., (seen > 0) & (seen < 1)] != 0).any()
    unguided = run_edit(tiny, image, mask, "x", Settings(**FAST, feather=6, range_weight=0))
    assert not np.array_equal(guided.rgba, unguided[0].rgba)


class Cancelled(Exception):
    pass


def test_the_tiles_counted_for_the_estimate_are_the_forwards_the_pass_makes(tiny):
    image, mask = _picture(160, (20, 130))
    settings = Settings(**FAST)
    base, forwards, step = FAST["steps"] - FAST["skip"], [], [0]
    hook = tiny.unet.register_forward_hook(lambda *_: forwards.append(step[0]))
    try:
        run_edit(tiny, image, mask, "x", settings, lambda done, *_: step.__setitem__(0, done))
    finally:
        hook.remove()
    in_pass = sum(1 for s in forwards if s >= base)  # made during the steps after the base's
    planned = plan(32, tiny.downsampling, mask, settings)
    tiles = planned.refine_tiles
    assert tiles > 4 and in_pass == tiles * settings.refine_steps
    assert tiles <= planned.refinement.tiles_total


def test_cancel_stops_inside_the_pass_before_the_next_tile(tiny):
    image, mask = _picture()
    base = FAST["steps"] - FAST["skip"]
    seen = {"steps": 0, "forwards_after": 0, "cancelled": False}

    def on_step(done, total, _previews):
        seen["steps"] = done
        seen["cancelled"] = done > base  # the artist cancels during the pass's first step

    def check():
        if seen["cancelled"]:
            raise Cancelled
        if seen["steps"] > base:
            seen["forwards_after"] += 1

    with pytest.raises(Cancelled):
        run_edit(tiny, image, mask, "x", Settings(**FAST), on_step, check)
    assert seen["steps"] == base + 1 and seen["forwards_after"] == 0


def test_the_budget_counts_the_pass_and_names_it(tiny):
    image, mask = _picture(1024, (100, 900))
    facts = pixel.Facts.of(tiny)

    def cost(**settings):
        planned = plan(32, tiny.downsampling, mask, Settings(**settings))
        return pixel.estimate(facts, image.shape, mask, planned)

    default, off, capped, full = cost(), cost(refine=False), cost(refine_cap=4), cost(refine_cap=0)
    assert off.parts["refinement"] == 0 < default.parts["refinement"]  # on by default
    assert default.parts["refinement"] <= capped.parts["refinement"] < full.parts["refinement"]
    assert "refine" in pixel.advice(full, Settings())


@pytest.mark.parametrize(
    "bad",
    [
        dict(refine_strength=0),
        dict(refine_overlap=0.8),
        dict(refine_cap=0.5),
        dict(refine_guidance=-1),
        dict(refine_guidance=11),
    ],
)
def test_refine_settings_out_of_range_are_refused(bad):
    with pytest.raises(request.SettingError, match="refine"):
        request.check(bad)
