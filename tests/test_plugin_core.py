"""The plug-ins' shared core (engine/shared): the settings table and requests, the context window
within the engine's limit, time estimates, wording; and the engine's measured step times."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from engine import region
from engine.shared import estimate, geometry, protocol, request, settings, wording
from engine.shared.client import Job
from engine.shared.geometry import Rect
from engine.steptime import StepTimes

ROOT = Path(__file__).resolve().parents[1]
VALUES = settings.defaults() | {"prompt": "a red circle"}


def test_core_imports_without_pyzmq_torch_or_numpy():
    code = (
        "import sys; sys.modules['zmq'] = None\n"  # any `import zmq` now fails
        "import engine.shared.settings, engine.shared.geometry, engine.shared.estimate\n"
        "import engine.shared.wording\n"
        "heavy = {'torch', 'numpy', 'engine.shared.client'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("path", sorted((ROOT / "engine" / "shared").glob("*.py")), ids=str)
def test_core_parses_as_python_310(path):
    ast.parse(path.read_text(), feature_version=(3, 10))  # Krita 5.2 bundles Python 3.10


# -- settings ---------------------------------------------------------------------------------


def test_table_is_consistent_and_matches_the_engine():
    limits = protocol.Limits()
    for s in settings.TABLE:
        assert s.low is None or s.low <= s.default <= s.high, s.name
        assert settings.coerce(s, s.default) == s.default
        if s.limit:
            assert s.high == getattr(limits, s.limit), s.name  # the engine's own default limit
    for name, preset in settings.PRESETS.items():
        assert settings.matching_preset(preset) == name
        for key, value in preset.items():
            assert settings.coerce(settings.BY_NAME[key], value) == value, (name, key)


def test_paper_preset_is_the_official_defaults():
    paper = settings.request(VALUES | {"preset": "paper"}).settings
    # the paper: 100 steps at 75% (75 guided), 4 variants, full guidance at the model's weight
    assert paper == {"variants": 4, "steps": 100, "strength": 75, "guidance_mode": "full",
                     "refine": True}  # fmt: skip
    assert request.check(paper).steps_run == 75


def test_draft_is_quicker_than_paper():
    draft = settings.request(VALUES | {"preset": "draft"}).settings
    paper = settings.request(VALUES | {"preset": "paper"}).settings
    work = {k: request.check(s).variants * request.check(s).steps_run
            for k, s in (("draft", draft), ("paper", paper))}  # fmt: skip
    assert work["draft"] < work["paper"] / 3


def test_custom_takes_the_advanced_values_a_preset_overrides_them():
    custom = VALUES | {"preset": "custom", "variants": 3, "steps": 40, "strength": 50,
                       "fast_guidance": True, "guidance_weight": 200.0, "seed": 7}  # fmt: skip
    assert settings.request(custom).settings == {
        "variants": 3, "steps": 40, "strength": 50, "guidance_mode": "fast",
        "refine": True, "seed": 7, "guidance_weight": 200.0,
    }  # fmt: skip
    draft = settings.request(custom | {"preset": "draft"}).settings
    assert draft["variants"] == settings.PRESETS["draft"]["variants"] and draft["seed"] == 7
    # unticked, the pass is turned off by name (the engine's default is on); no preset ticks it
    unticked = settings.request(custom | {"refine": False, "preset": "paper"}).settings
    assert unticked["refine"] is False


@hypothesis_settings(deadline=None)
@given(steps=st.integers(2, 1000), strength=st.integers(1, 100))
def test_strength_is_always_a_start_the_engine_takes(steps, strength):
    checked = protocol.check_settings({"steps": steps, "strength": strength}, protocol.Limits())
    assert 0 <= checked.start < steps and checked.steps_run >= 1
    as_skip = protocol.check_settings({"steps": steps, "skip": checked.start}, protocol.Limits())
    assert as_skip.steps_run == checked.steps_run  # the pixel method's own start, the same
    if strength == 100:
        assert checked.start == 0


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"prompt": "   "}, "Type a prompt first"),
        ({"prompt": "x" * 501}, "the engine takes 500"),
        ({"preset": "custom", "variants": 9}, "Variants must be 1 to 8"),
        ({"preset": "custom", "strength": 0}, "Strength % must be 1 to 100"),
        ({"seed": -2}, "Seed must be -1"),
        ({"endpoint": "localhost"}, "must look like tcp://"),
        ({"endpoint": "tcp://"}, "must look like tcp://"),
    ],
)
def test_bad_values_say_what_to_fix(change, words):
    with pytest.raises(ValueError, match=words):
        settings.request(VALUES | change)


def test_the_engines_hello_limits_tighten_the_table():
    limits = {"max_variants": 2, "max_steps": 30, "max_prompt": 10, "max_side": 512}
    tight = {s.name: s for s in settings.table(limits)}
    assert tight["variants"].high == 2 and tight["steps"].high == 30
    with pytest.raises(ValueError, match="Variants must be 1 to 2, not 4 .the engine's limit"):
        settings.request(VALUES | {"preset": "custom", "variants": 4, "prompt": "a cat"}, limits)
    with pytest.raises(ValueError, match="the engine takes 10"):
        settings.request(VALUES | {"prompt": "a much longer prompt"}, limits)
    assert {s.name: s.high for s in settings.table({"max_steps": "x"})}["steps"] == 1000


@hypothesis_settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([s.name for s in settings.TABLE]),
                       st.one_of(st.text(max_size=8), st.integers(), st.floats(), st.booleans(),
                                 st.none())))  # fmt: skip
def test_stored_values_never_break_anything(stored):
    loaded = settings.loads(settings.dumps({k: v for k, v in stored.items()}))
    for name, value in loaded.items():
        s = settings.BY_NAME[name]
        assert s.low is None or s.low <= value <= s.high
        assert not s.choices or value in dict(s.choices)
    assert settings.loads("not json") == {} and settings.loads("[1]") == {}


def test_preset_follower_keeps_preset_and_advanced_in_step():
    ui = dict(VALUES)
    writes = []

    def write(values):
        writes.append(values)
        for key, value in values.items():
            ui[key] = value
            follower.advanced_changed() if key != "preset" else follower.preset_changed()

    follower = settings.PresetFollower(lambda: dict(ui), write)
    ui["preset"] = "paper"
    follower.preset_changed()
    assert {k: ui[k] for k in settings.PRESETS["paper"]} == settings.PRESETS["paper"]
    ui["steps"] = 60
    follower.advanced_changed()
    assert ui["preset"] == "custom" and ui["steps"] == 60  # the edit stays
    ui["steps"] = 100
    follower.advanced_changed()
    assert ui["preset"] == "paper"


# -- the served method ------------------------------------------------------------------------

# every setting an artist can set, each away from its default
EVERYTHING = VALUES | {"preset": "custom", "variants": 3, "steps": 30, "strength": 60,
                       "seed": 5, "fast_guidance": True, "guidance_weight": 200.0, "grow": 2,
                       "feather": 4, "refine": False, "negative_prompt": "blurry, text",
                       "guidance": 5.5, "scheduler": "ddim"}  # fmt: skip
HOSTS_OWN = {"prompt", "preset", "layer_only", "endpoint"}


def test_each_setting_knows_the_methods_that_take_it_from_the_schema():
    ui_to_schema = {"fast_guidance": "guidance_mode"}  # the UI's name for the schema's setting
    for s in settings.TABLE:
        name = ui_to_schema.get(s.name, s.name)
        if s.name in HOSTS_OWN:
            assert s.methods == request.METHODS, s.name
        else:
            assert s.methods == request.BY_NAME[name].methods, s.name
    assert set(settings.shown("latent")) == HOSTS_OWN | {
        "negative_prompt", "seed", "variants", "strength", "steps", "scheduler", "guidance",
        "grow", "feather"}  # fmt: skip
    pixel = set(settings.shown("pixel"))
    assert pixel == set(settings.shown(None))  # an older engine's hello names no method: pixel
    assert {"fast_guidance", "guidance_weight", "refine"} <= pixel
    assert not pixel & {"negative_prompt", "guidance", "scheduler"}
    assert settings.only_for(settings.BY_NAME["guidance"]) == "Stable Diffusion models only"
    assert settings.only_for(settings.BY_NAME["fast_guidance"]) == "ADM models only"
    assert settings.only_for(settings.BY_NAME["steps"]) == ""


@pytest.mark.parametrize("method", [*request.METHODS, None])
def test_the_request_carries_exactly_what_the_served_method_takes(method):
    sent = settings.request(EVERYTHING, None, method)
    assert sent.method == (method or "pixel") and sent.values == EVERYTHING
    if method == "latent":
        assert sent.settings == {"variants": 3, "steps": 30, "strength": 60, "seed": 5,
                                 "grow": 2, "feather": 4, "negative_prompt": "blurry, text",
                                 "guidance": 5.5, "scheduler": "ddim"}  # fmt: skip
    else:  # as before the latent method: the negative prompt, CFG and scheduler left out
        assert sent.settings == {"variants": 3, "steps": 30, "strength": 60, "seed": 5,
                                 "guidance_mode": "fast", "guidance_weight": 200.0, "grow": 2,
                                 "feather": 4, "refine": False}  # fmt: skip
    assert set(sent.settings) <= set(request.taken_by(method or "pixel"))
    request.check(sent.settings, wire=True, method=method)  # what the engine will check


def test_the_latent_presets_pick_variants_and_strength_and_leave_steps_to_the_scheduler():
    for preset, (variants, strength) in (("draft", (2, 80)), ("paper", (4, 75))):
        for scheduler, steps in request.SCHEDULER_STEPS.items():
            values = EVERYTHING | {"preset": preset, "scheduler": scheduler}
            sent = settings.request(values, None, "latent").settings
            assert (sent["variants"], sent["strength"]) == (variants, strength)
            assert "steps" not in sent  # the scheduler's own
            assert request.check(sent, method="latent").steps == steps
            shown = settings.effective(values, "latent")  # what the UI's Steps field shows
            assert shown["steps"] == steps and settings.matching_preset(shown, "latent") == preset
    # Custom sends the steps as set, those equal to the scheduler's default left to it
    custom = EVERYTHING | {"scheduler": "dpmpp_2m_karras"}
    assert settings.request(custom, None, "latent").settings["steps"] == 30
    assert "steps" not in settings.request(custom | {"steps": 25}, None, "latent").settings
    # empty or blank: no negative prompt sent; guidance -1: the scheduler's; the default
    # scheduler is not named
    plain = custom | {"negative_prompt": "  ", "guidance": -1.0}
    sent = settings.request(plain, None, "latent").settings
    assert not {"negative_prompt", "guidance", "scheduler"} & set(sent)
    with pytest.raises(ValueError, match="The negative prompt is 501 characters"):
        settings.request(custom | {"negative_prompt": "x" * 501}, None, "latent")
    # the pixel method's presets as before, whatever the latent settings say
    assert settings.effective(custom | {"preset": "draft"}) == custom | {"preset": "draft"} | (
        settings.PRESETS["draft"])  # fmt: skip


def test_the_preset_follows_the_scheduler_and_the_engines_method():
    ui = dict(VALUES)
    method = ["pixel"]

    def write(values):
        for key, value in values.items():
            ui[key] = value
            follower.changed(key)

    follower = settings.PresetFollower(lambda: dict(ui), write, lambda: method[0])
    write({"preset": "draft"})
    assert ui["steps"] == 50  # the pixel method's Draft
    method[0] = "latent"  # the engine's hello names another method: its preset's values
    follower.preset_changed()
    assert (ui["preset"], ui["variants"], ui["strength"], ui["steps"]) == ("draft", 2, 80, 25)
    write({"scheduler": "ddim"})  # no preset decides it; a preset's steps follow it
    assert (ui["preset"], ui["steps"]) == ("draft", 50)
    write({"steps": 20})
    assert ui["preset"] == "custom"
    write({"scheduler": "lcm"})  # Custom: the steps as the artist set them
    assert (ui["preset"], ui["steps"]) == ("custom", 20)
    write({"guidance": 3.0, "negative_prompt": "fog"})
    assert ui["preset"] == "custom"


def test_a_request_is_made_again_for_the_engine_it_reaches():
    asked = settings.request(EVERYTHING)  # before any hello: the pixel method's
    latent = settings.for_engine(asked, {"method": "latent", "limits": {}})
    assert latent == settings.request(EVERYTHING, None, "latent")
    assert settings.for_engine(asked, {"models": "older engine"}) == asked  # no method: pixel
    with pytest.raises(ValueError, match="Variants must be 1 to 2, not 3 .the engine's limit"):
        settings.for_engine(asked, {"method": "latent", "limits": {"max_variants": 2}})
    # a run again from the history (settings, no values): what the engine takes of them
    again = settings.Request("a cat", "tcp://x:1", asked.settings | {"seed": None})
    kept = settings.for_engine(again, {"method": "latent"})
    assert kept.settings == {"variants": 3, "steps": 30, "strength": 60, "seed": None, "grow": 2,
                             "feather": 4} and kept.method == "latent"  # fmt: skip


def test_a_latent_estimate_counts_the_schedulers_steps():
    info = {"method": "latent", "device": "cpu", "step_seconds": {"full": {"2": 0.5}}}
    draft = settings.request(VALUES | {"preset": "draft"}, None, "latent").settings
    plan = estimate.plan(info, draft)
    assert (plan.variants, plan.steps, plan.seconds) == (2, 20, 10.0)  # 25 steps at 80%
    paper = settings.request(VALUES | {"preset": "paper"}, None, "latent").settings
    assert "slow" not in wording.before_run(info, paper, "paper")  # the pixel method's warning


# -- geometry ---------------------------------------------------------------------------------


def test_selection_is_clipped_to_the_source_in_its_coordinates():
    layer_at, size = (10, 8), (64, 56)
    assert geometry.selection_in_source(None, layer_at, size) is None
    inside = geometry.selection_in_source(Rect(20, 18, 10, 10), layer_at, size)
    assert inside == Rect(10, 10, 10, 10)
    assert geometry.selection_in_source(Rect(60, 30, 40, 10), layer_at, size) == Rect(
        50, 22, 14, 10
    )
    assert geometry.selection_in_source(Rect(0, 0, 10, 8), layer_at, size) is None  # beside it
    assert geometry.selection_in_source(Rect(-5, -6, 10, 10), (0, 0), (64, 48)) == Rect(0, 0, 5, 4)


def test_window_is_clipped_and_holds_the_context():
    # a small selection: the engine's least context a side (geometry.MIN_CONTEXT, one figure)
    assert geometry.context_window(Rect(50, 22, 14, 10), (64, 56)) == Rect(2, 0, 62, 56)
    # margin: 40 + 2 * 10 each side
    assert geometry.context_window(Rect(1000, 800, 40, 20), (4000, 3000)) == Rect(
        940, 740, 160, 140
    )


def test_window_capped_at_the_engines_limit_but_holding_the_selection():
    sel = Rect(3000, 100, 1000, 50)
    win = geometry.context_window(sel, (10000, 400), max_side=2048)
    assert (win.width, win.height) == (2048, 400) and win.x == 3000 + 500 - 1024
    edge = geometry.context_window(Rect(9300, 0, 600, 10), (10000, 400), max_side=1000)
    assert edge.x + edge.width == 10000 and edge.width == 1000
    with pytest.raises(ValueError, match="5000x10 pixels; the engine takes at most 4096"):
        geometry.context_window(Rect(0, 0, 5000, 10), (6000, 6000))


@hypothesis_settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.tuples(st.integers(1, 9000), st.integers(1, 9000)),
    data=st.data(),
    max_side=st.sampled_from([64, 1000, 4096]),
)
def test_window_always_fits_the_limit_and_holds_the_selection(size, data, max_side):
    x = data.draw(st.integers(0, size[0] - 1))
    y = data.draw(st.integers(0, size[1] - 1))
    w = data.draw(st.integers(1, min(size[0] - x, max_side)))
    h = data.draw(st.integers(1, min(size[1] - y, max_side)))
    win = geometry.context_window(Rect(x, y, w, h), size, max_side=max_side)
    assert win.width <= max_side and win.height <= max_side
    assert win.x <= x and x + w <= win.x + win.width and win.y <= y and y + h <= win.y + win.height
    assert win.x >= 0 and win.y >= 0 and win.x + win.width <= size[0]
    assert win.y + win.height <= size[1]


def test_window_changes_nothing_the_engine_sees():
    """Under the limit, the engine's context box placed in the window is the one it places in
    the whole source: the results are the same bytes, only fewer are sent."""
    rnd = random.Random(5)
    for _ in range(400):
        width, height = rnd.randint(1, 300), rnd.randint(1, 300)
        x, y = rnd.randrange(width), rnd.randrange(height)
        w, h = rnd.randint(1, width - x), rnd.randint(1, height - y)
        mask = np.zeros((height, width), np.uint8)
        mask[y : y + h, x : x + w] = 255
        mask[y + rnd.randrange(h), x + rnd.randrange(w)] = 0  # not always a full rectangle
        if not mask.any():
            continue
        win = geometry.context_window(Rect(x, y, w, h), (width, height))  # a looser box
        whole = region.context_box(mask, geometry.PADDING)
        part = mask[win.y : win.y + win.height, win.x : win.x + win.width]
        inside = region.context_box(part, geometry.PADDING)
        assert inside.moved(win.x, win.y) == whole


def test_grow_and_feather_are_the_engines_with_its_range():
    for name in ("grow", "feather"):
        s = settings.BY_NAME[name]
        assert (s.low, s.high, s.default) == (0, request.BY_NAME[name].high, 0) and s.advanced
    shaped = settings.request(VALUES | {"grow": 4, "feather": 9}).settings
    assert (shaped["grow"], shaped["feather"]) == (4, 9)
    protocol.check_settings(shaped, protocol.Limits())
    assert "grow" not in settings.request(VALUES).settings  # off: what engines before it took
    # the preset never decides them, nor the source read
    custom = VALUES | {"preset": "draft", "grow": 4, "layer_only": True}
    assert settings.matching_preset(settings.effective(custom)) == "draft"
    assert settings.request(custom).layer_only and not settings.request(VALUES).layer_only


@hypothesis_settings(deadline=None, max_examples=60)
@given(
    size=st.tuples(st.integers(8, 160), st.integers(8, 160)),
    data=st.data(),
    grow=st.integers(0, 30),
    feather=st.integers(0, 30),
)
def test_window_holds_what_the_engine_grows_and_feathers(size, data, grow, feather):
    """The engine grows and feathers the selection in the window the plug-in sends exactly as
    it would in the whole picture, and places the same context box: the window's `widen` is
    the reach of engine/region.py's shape_selection."""
    width, height = size
    x, y = data.draw(st.integers(0, width - 1)), data.draw(st.integers(0, height - 1))
    w = data.draw(st.integers(1, width - x))
    h = data.draw(st.integers(1, height - y))
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + h, x : x + w] = data.draw(st.sampled_from([255, 200, 60]))  # 60: all soft
    try:
        whole = region.shape_selection(mask, grow, feather)
    except region.RegionError:  # feathered away: the engine says so, nothing to place
        return
    widen = geometry.reach({"grow": grow, "feather": feather})
    reach = Rect(x, y, w, h).grown(widen).intersect(Rect(0, 0, width, height))
    ys, xs = np.nonzero(whole)
    assert reach.x <= xs.min() and xs.max() < reach.x + reach.width
    assert reach.y <= ys.min() and ys.max() < reach.y + reach.height
    win = geometry.context_window(Rect(x, y, w, h), size, widen=widen)
    part = region.shape_selection(mask[win.y : win.y + win.height, win.x : win.x + win.width],
                                  grow, feather)  # fmt: skip
    cut = whole[win.y : win.y + win.height, win.x : win.x + win.width]
    assert np.array_equal(part, cut) and cut.sum() == whole.sum()
    # the edit's (and the budget's) box: around the bounds the shaping can reach, found without
    # shaping; they hold the shaped selection, exactly for a grow alone
    bounds, tight = region.shaped_bounds(mask, grow, feather), region.selection_bounds(whole)
    assert bounds.x <= tight.x and tight.x + tight.width <= bounds.x + bounds.width
    assert bounds.y <= tight.y and tight.y + tight.height <= bounds.y + bounds.height
    assert bounds == tight or feather
    box = region.context_box(mask, geometry.PADDING, grow, feather)
    assert box == geometry.box_around(bounds, width, height, geometry.PADDING)
    inside = region.context_box(mask[win.y : win.y + win.height, win.x : win.x + win.width],
                                geometry.PADDING, grow, feather)  # fmt: skip
    assert inside.moved(win.x, win.y) == box


def test_place_and_blank():
    assert geometry.place((10, 8), Rect(5, 6, 40, 40), 3, 4) == (18, 18)
    assert geometry.place((-20, 0), Rect(0, 0, 9, 9), 2, 2) == (-18, 2)
    assert geometry.is_blank(bytes(100)) and not geometry.is_blank(bytes(99) + b"\x01")


# -- time -------------------------------------------------------------------------------------


def test_estimate_from_the_engines_step_times():
    info = {"step_seconds": {"full": {"1": 2.0, "4": 6.0}, "fast": {"2": 1.0}}}
    paper = settings.request(VALUES | {"preset": "paper"}).settings
    assert estimate.plan(info, paper).seconds == 6.0 * 75  # measured at this batch
    assert estimate.step_seconds(info, "full", 2) == 4.0  # nearest batch (1), per variant
    assert estimate.step_seconds(info, "fast", 4) == 2.0
    assert estimate.plan({}, paper).seconds is None
    assert estimate.plan({"step_seconds": {}}, paper).seconds is None


def test_the_estimate_counts_the_refinement_by_its_tiles():
    """The engine's `accepted` says an edit's steps (the pass's too) and the pass's tiles a step;
    a tile's step is the engine's REFINE figure, else (no pass measured yet) a fast step's."""
    paper = settings.request(VALUES | {"preset": "paper", "refine": True}).settings
    measured = {"full": {"4": 6.0}, "fast": {"2": 1.0}, "refine": {"4": 0.5}}
    p = estimate.plan({"step_seconds": measured}, paper, total=85, tiles=6)
    assert (p.steps, p.refine_steps, p.tiles) == (75, 10, 6)
    assert p.seconds == 6.0 * 75 + 10 * 6 * 0.5 and p.ratio == 0.5
    unmeasured = estimate.plan({"step_seconds": measured | {"refine": {}}}, paper, 85, 6)
    assert unmeasured.seconds == 6.0 * 75 + 10 * 6 * 2.0  # 4 fast variants: 2 x 1.0 s
    full_only = estimate.plan({"step_seconds": {"full": {"4": 6.0}}}, paper, 85, 6)
    assert full_only.seconds is None and full_only.ratio == 6  # a tile: one UNet forward
    # no pass: the engine found the selection small enough (tiles 0), or an older engine
    assert estimate.plan({"step_seconds": measured}, paper, 75, 0).seconds == 6.0 * 75
    assert estimate.plan({"step_seconds": measured}, paper).refine_steps == 0


def test_clock_uses_the_estimate_then_the_runs_own_pace():
    now = [100.0]
    clock = estimate.Clock(estimate.Plan(4, 20, step_s=3.0), now=lambda: now[0])
    now[0] += 10
    assert clock.left(1, 20) == 50.0  # one step seen: the engine's estimate less the time spent
    now[0] += 4
    assert clock.left(3, 20) == 2.0 * 17  # 2 steps in 4 s
    assert estimate.Clock(None).left(1, 5) is None
    blind = estimate.Clock(None, now=lambda: now[0])
    blind.left(1, 5)
    now[0] += 2
    assert blind.left(2, 5) == 2.0 * 3


def test_clock_paces_the_refinement_apart():
    """10 base steps of 2 s, then 3 refinement steps the plan says cost 4 base steps each: the
    time left weighs them so during the base pass, then follows the pass's own pace."""
    now = [0.0]
    plan = estimate.Plan(1, 10, refine_steps=3, tiles=6, step_s=2.0, refine_step_s=8.0)
    clock = estimate.Clock(plan, now=lambda: now[0])
    assert clock.left(1, 13) == plan.seconds  # nothing timed yet
    now[0] += 4
    assert clock.left(3, 13) == 2.0 * (7 + 4 * 3)  # the pass at the plan's ratio to this pace
    now[0] += 14
    assert clock.left(10, 13) == 2.0 * 4 * 3  # the base pass ends: its pace x the ratio
    now[0] += 20  # the pass's first step took 20 s, not 8
    assert clock.left(11, 13) == 20.0 * 2
    now[0] += 20
    assert clock.left(12, 13) == 20.0


def test_durations_read_well():
    assert estimate.duration(None) == ""
    assert estimate.duration(0.2) == "about 1 s" and estimate.duration(45) == "about 45 s"
    assert estimate.duration(600) == "about 10 min"
    assert estimate.duration(3 * 3600 + 600) == "about 3 h 10 min"


def test_step_times_measured_after_the_first_step():
    t = [0.0]
    times = StepTimes(clock=lambda: t[0], key={"precision": "fp32"})  # the engine's precision
    step = times.timer("full", 4)
    for done, at in ((1, 30.0), (2, 32.0), (3, 34.5)):  # the first step holds the warm-up
        t[0] = at
        step(done)
    assert times.to_json() == {"full": {"4": 2.25}}
    assert StepTimes().to_json() == {}
    # a job's timer: keyed by its mode and variants; one guiding a step in N mixes two paces,
    # one asking another precision than the engine's steps at another pace
    from engine.shared.request import Settings

    for asked, t[0] in ((Settings(variants=2, guidance_every=3), 40.0),
                        (Settings(variants=3, guidance_mode="fast"), 50.0),
                        (Settings(variants=5, precision="bf16"), 60.0),
                        (Settings(variants=6, precision="fp32"), 70.0)):  # fmt: skip
        step = times.for_job(asked)
        step(1)
        t[0] += 1.5
        step(2)
    assert times.to_json() == {"fast": {"3": 1.5}, "full": {"4": 2.25, "6": 1.5}}


def test_the_engine_announces_its_step_times(start_engine):
    from engine.shared.client import Client

    server = start_engine()
    with Client(server.endpoint, timeout=5) as client:
        assert client.hello()["step_seconds"] == {}
        rgba = bytes(16 * 16 * 4)
        mask = bytes(255 if 4 <= i % 16 < 10 else 0 for i in range(256))
        fast = {"variants": 2, "steps": 4, "skip": 0, "guidance_mode": "fast"}
        job = client.submit(rgba, 16, 16, mask, "a red ball", fast)
        client.wait(job, timeout=120)
        seconds = client.hello()["step_seconds"]
    assert list(seconds) == ["fast"] and list(seconds["fast"]) == ["2"]
    assert seconds["fast"]["2"] > 0


def test_the_refinements_steps_are_timed_per_tile_apart_from_the_base_pass():
    t = [0.0]
    times = StepTimes(clock=lambda: t[0], key={"precision": "fp32"})
    step = times.timer("fast", 2, steps=3, tiles=4)
    for done, at in ((1, 10.0), (2, 11.0), (3, 12.0), (4, 20.0), (5, 28.0)):  # 4, 5: the pass
        t[0] = at
        step(done)
    assert times.to_json() == {"fast": {"2": 1.0}, "refine": {"2": 2.0}}  # 8 s a step, 4 tiles
    # a pass guided by CLIP steps at another pace: not timed (the base pass is)
    from engine.shared.request import Settings

    guided = Settings(variants=3, steps=3, skip=0, refine=True, refine_guidance=1)
    step = times.for_job(guided, tiles=4)
    for done in range(1, 6):
        t[0] += 1.0
        step(done)
    assert "3" not in times.to_json()["refine"] and times.to_json()["full"] == {"3": 1.0}


def test_the_engine_tells_an_edits_steps_and_tiles_and_times_its_refinement(start_engine):
    from engine.shared.client import Client

    server = start_engine()
    with Client(server.endpoint, timeout=5) as client:
        rgba = bytes(96 * 96 * 4)
        mask = bytes(255 if 24 <= i % 96 < 72 and 24 <= i // 96 < 72 else 0 for i in range(96**2))
        # refine_cap 0: the pass at the image's scale, asked for (the default keeps it within
        # the base edit's work: 6 steps leave too little for any pass)
        asked = {"variants": 2, "steps": 6, "skip": 0, "guidance_mode": "fast", "refine": True,
                 "refine_strength": 0.5, "refine_cap": 0}  # fmt: skip
        job = client.submit(rgba, 96, 96, mask, "a red ball", asked)
        assert job.total == 6 + 3  # accepted says it before the first step
        # the context box (72 px) over the tiny model's 32 px tiles, half shared: 4 x 4, all
        # touching the 48 px square in its middle
        assert job.refine_tiles == 16 and job.plan["refine"]["tiles_total"] == 16
        client.wait(job, timeout=120)
        seconds = client.hello()["step_seconds"]
        small = client.submit(bytes(40 * 40 * 4), 40, 40, bytes([255] * 1600), "x", asked)
        assert (small.total, small.refine_tiles) == (6, 0)  # no gain over the base canvas: no pass
        client.cancel(small)
    assert set(seconds) == {"fast", "refine"} and seconds["refine"]["2"] > 0


# -- wording ----------------------------------------------------------------------------------


def test_a_started_edit_says_what_runs_it_the_queue_and_the_time():
    info = {"models": "demo shapes-world UNet (trained here); CLIP", "device": "cpu",
            "step_seconds": {"full": {"2": 0.5}}}  # fmt: skip
    draft = settings.request({"prompt": "x", "preset": "draft"}).settings
    line = wording.started(info, draft, Job("1", position=2, total=40))
    assert line.startswith("Running on demo shapes-world UNet. Waiting: 2 jobs ahead")
    assert "Expected: about 20 s (2 variant(s) x 40 steps)" in line
    paper = settings.request({"prompt": "x", "preset": "paper"}).settings
    first = Job("2", total=75)
    assert "Paper on a CPU engine is slow" in wording.started(info, paper, first, settings.PAPER)
    assert wording.started({}, draft, first).startswith("Running on the engine. Starting…")
    refined = settings.request({"prompt": "x", "preset": "draft", "refine": True}).settings
    info["step_seconds"]["refine"] = {"2": 0.25}
    line = wording.started(info, refined, Job("3", total=44, refine_tiles=4))
    assert "about 24 s (2 variant(s) x 40 steps, then 4 refinement steps over 4 tiles)" in line
    before = wording.before_run(info, refined, settings.DRAFT)
    assert "then a refinement pass if the selection is larger than the model's canvas" in before


def test_connection_line_names_model_and_device():
    assert "not connected" in wording.connection("tcp://x", {})
    demo = "demo shapes-world UNet (trained here on coloured shapes; not the paper's model); CLIP"
    line = wording.connection("tcp://x", {"models": demo, "device": "cpu"})
    assert line == "Engine: demo shapes-world UNet on CPU"
    gpu = wording.connection("tcp://x", {"models": "adm256", "device": "cuda:0", "queue": 2})
    assert gpu == "Engine: adm256 on GPU (cuda:0), 2 job(s) queued"
    served = [{"name": "demo-latent", "weights": "demo"}, {"name": "tiny", "weights": "random"}]
    many = {"available": served, "default": "demo-latent", "device": "cpu"}
    line = wording.connection("tcp://x", many)
    assert line == "Engine: demo-latent [demo model] (+1 more) on CPU"
    alone = {"available": served[1:], "default": "tiny", "device": "cpu"}
    assert wording.connection("tcp://x", alone) == "Engine: tiny [random weights] on CPU"


def test_paper_on_a_cpu_warns_draft_does_not():
    paper = settings.request(VALUES | {"preset": "paper"}).settings
    draft = settings.request(VALUES | {"preset": "draft"}).settings
    cpu = {"device": "cpu", "step_seconds": {"full": {"4": 40.0}}}
    text = wording.before_run(cpu, paper, "paper")
    assert "about 50 min" in text and "slow" in text and "Draft" in text
    assert "slow" not in wording.before_run(cpu, draft, "draft")
    assert "slow" not in wording.before_run({"device": "cuda"}, paper, "paper")
    assert "first edit" in wording.before_run({"device": "cpu"}, draft, "draft")


def test_layer_and_group_names_are_short_and_name_the_model_marking_demo_and_random_ones():
    assert wording.group_name("a red ball") == 'Blended Diffusion: "a red ball"'
    long = wording.group_name("word " * 30)
    assert len(long) < 70 and long.endswith('…"')
    demo = wording.made_by("demo-latent", "demo")
    name = wording.layer_name("a red ball", 2, 0.51234, demo)
    assert name == '"a red ball" #2 (demo-latent [demo model], CLIP d=0.512)'
    tiny = wording.layer_name("x", 1, 0.5, wording.made_by("tiny", "random"))
    assert tiny == '"x" #1 (tiny [random weights], CLIP d=0.500)'
    real = wording.layer_name("x", 1, 0.5, wording.made_by("sd15", "real"))
    assert real == '"x" #1 (sd15, CLIP d=0.500)'
    assert wording.layer_name("x", 1, 0.5) == '"x" #1 (CLIP d=0.500)'  # an engine that named none
