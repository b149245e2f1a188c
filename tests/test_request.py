"""The request schema (engine/shared/request.py): every setting's edges, the figures derived from
them, and the one check the wire, the CLI, the plug-ins and the edit share."""

import math

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from engine.shared import protocol, request
from engine.shared.request import FIELDS, SettingError

NUMBERS = [f for f in FIELDS if f.low is not None]


@pytest.mark.parametrize("f", NUMBERS, ids=lambda f: f.name)
def test_each_number_takes_its_edges_and_refuses_past_them_naming_itself_and_its_range(f):
    base = {"steps": 1000} if f.name == "skip" else {}  # skip's own edge needs the most steps
    for edge in (f.low, f.high):
        assert getattr(request.check(base | {f.name: f.kind(edge)}), f.name) == edge
    step = 1 if f.kind is int else max(abs(f.high) * 1e-6, 1e-6)
    for past in (f.low - step, f.high + step):
        with pytest.raises(SettingError) as e:
            request.check(base | {f.name: f.kind(past) if f.kind is int else past})
        assert e.value.name == f.name and f"settings.{f.name}" in str(e.value)
        assert f"{f.high:g}" in str(e.value)  # the range is in the message


@pytest.mark.parametrize("f", NUMBERS, ids=lambda f: f.name)
@pytest.mark.parametrize("bad", [True, "3", math.nan, math.inf, [1]])
def test_a_number_of_the_wrong_kind_is_refused(f, bad):
    with pytest.raises(SettingError, match=f"settings.{f.name}"):
        request.check({f.name: bad})


def test_an_int_setting_refuses_a_fraction_and_optional_ones_take_none():
    with pytest.raises(SettingError, match="integer"):
        request.check({"steps": 10.5})
    for f in FIELDS:
        if f.optional:
            assert getattr(request.check({f.name: None}), f.name) is None
        elif f.kind is not str:
            with pytest.raises(SettingError):
                request.check({f.name: None})


def test_choices_and_flags():
    assert request.check({"sampler": "ddim", "refine": False}).refine is False
    for name, bad in (("sampler", "euler"), ("guidance_mode", 1), ("refine", 1)):
        with pytest.raises(SettingError, match=f"settings.{name} must be"):
            request.check({name: bad})


def test_a_cap_of_zero_or_at_least_one():
    assert request.check({"refine_cap": 0}).refine_cap == 0
    assert request.check({"refine_cap": 1}).refine_cap == 1
    with pytest.raises(SettingError, match="0 or 1 to 16"):
        request.check({"refine_cap": 0.5})


def test_an_engines_limit_caps_the_range_and_says_so():
    caps = protocol.Limits(max_variants=3).to_json()
    assert request.check({"variants": 3}, caps).variants == 3
    with pytest.raises(SettingError, match=r"1 to 3 \(this engine's limit\)") as e:
        request.check({"variants": 4}, caps)
    assert e.value.limit  # the wire answers `limit`, not `bad_field`
    with pytest.raises(SettingError) as e:
        request.check({"padding": 5}, caps)
    assert not e.value.limit


def test_unknown_names_and_the_engines_own_options_on_the_wire():
    with pytest.raises(SettingError, match="unknown settings stepz"):
        request.check({"stepz": 3})
    assert request.check({"batch": 2}).batch == 2  # the CLI's
    with pytest.raises(SettingError, match="unknown settings batch"):
        request.check({"batch": 2}, wire=True)


def test_skip_must_leave_a_step():
    assert request.check({"steps": 10, "skip": 9}).steps_run == 1
    with pytest.raises(SettingError, match=r"skip must be 0 to steps - 1 \(9\)"):
        request.check({"steps": 10, "skip": 10})


@hypothesis_settings(deadline=None)
@given(steps=st.integers(2, 1000), strength=st.integers(1, 100), strength_refine=st.floats(0.01, 1))
def test_the_derived_figures_over_the_whole_range(steps, strength, strength_refine):
    s = request.check({"steps": steps, "strength": strength, "refine_strength": strength_refine})
    assert 0 <= s.start < steps and s.steps_run == steps - s.start >= 1
    assert abs(s.steps_run - steps * strength / 100) <= 1  # strength is the share that runs
    assert 1 <= s.refine_steps <= steps
    assert s.total_steps(False) == s.steps_run < s.total_steps(True)


def test_what_a_client_sends_is_what_differs_from_the_defaults():
    s = request.check({"variants": 2, "precision": "fp32"})
    assert s.wire() == {"variants": 2}  # the engine's own options never go on the wire
    assert request.check(s.wire(), wire=True) == request.check({"variants": 2})
