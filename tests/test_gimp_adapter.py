"""The GIMP plug-in outside GIMP: its arguments and remembered values (params.py, on a fake
procedure and config from tests/helpers/hosts.py), what a run sends for the engine's method, and
its shape. The edit itself is the shared flow (tests/test_flow.py); tests/test_gimp_real.py runs
the whole plug-in inside real GIMP 3."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from engine.shared import flow, request, settings
from engine.shared.geometry import Rect
from tests.helpers.client import HELLO, FakeClient
from tests.helpers.engine import until
from tests.helpers.hosts import GIMP_PLUGIN, FakeHost, gimp_config, gimp_params

TYPED = {"prompt": "a cat", "preset": "custom", "variants": 3, "strength": 40, "steps": 60,
         "fast_guidance": True, "guidance_weight": 250.0, "seed": -1}  # fmt: skip


@pytest.fixture
def params(monkeypatch):
    return gimp_params(monkeypatch)


def test_the_dialog_shows_every_setting_once_the_advanced_ones_in_their_expander(params):
    rows, folded = params.layout(), params.advanced()
    assert rows.count(params.ADVANCED) == 1 and folded
    shown = [r for r in rows if r != params.ADVANCED] + folded
    assert sorted(shown) == sorted(params.prop(s) for s in settings.TABLE)
    # what an artist sets first stays on top, the negative prompt beside the prompt
    assert rows[:3] == ["prompt", "negative-prompt", "preset"]


def test_the_dialog_shows_the_served_methods_settings_or_every_one_labelled(params):
    for method in ("pixel", "latent"):
        rows, folded = params.layout(method), params.advanced(method)
        shown = [r for r in rows if r != params.ADVANCED] + folded
        assert sorted(shown) == sorted(params.prop(settings.BY_NAME[n])
                                       for n in settings.shown(method))  # fmt: skip
    latent = params.layout("latent") + params.advanced("latent")
    assert "fast-guidance" not in latent and "refine" not in latent
    assert {"negative-prompt", "guidance", "scheduler"} <= set(latent)
    # before the engine answers every setting is shown: one method's say which models take it
    labels = {s.name: params.label(s) for s in settings.TABLE}
    assert labels["negative_prompt"] == "Negative prompt [Stable Diffusion models only]"
    assert labels["guidance"] == "Guidance (-1: scheduler's) [Stable Diffusion models only]"
    assert labels["guidance_weight"] == "Guidance (-1: model default) [ADM models only]"
    assert labels["steps"] == "Steps" and labels["seed"] == "Seed (-1: random)"


def test_the_arguments_hold_either_methods_settings(params):
    procedure, config = gimp_config(params)
    assert procedure.args["negative-prompt"]["kind"] == "string"
    assert procedure.args["scheduler"]["choices"] == ("dpmpp_2m_karras", "ddim", "lcm")
    assert (procedure.args["guidance"]["low"], procedure.args["guidance"]["high"]) == (-1, 30)
    assert config.get_property("guidance") == -1.0


@pytest.mark.parametrize("hello", [HELLO | {"method": "latent"}, HELLO, HELLO | {"method":
                                   "pixel"}])  # fmt: skip
def test_a_run_sends_what_the_engines_method_takes(hello):
    """GIMP's run makes its request before any engine is asked (the pixel method's); the flow
    makes it again for the method the engine's hello names (none: an older engine, pixel)."""
    values = settings.defaults() | TYPED | {"negative_prompt": "blurry", "guidance": 4.0,
                                            "scheduler": "ddim", "seed": 3}  # fmt: skip
    client = FakeClient([("result",)], info=hello)
    edit = flow.Edit(FakeHost(Rect(40, 30, 20, 12)), settings.request(values),
                     connect=lambda _: client)  # fmt: skip
    edit.start()
    until(lambda: not edit.tick(), 10, "the edit's end", every=0.002)
    assert edit.state == flow.DONE, edit.status.message
    method = hello.get("method", "pixel")
    assert client.submitted.settings == settings.request(values, None, method).settings
    assert set(client.submitted.settings) <= set(request.taken_by(method))
    if method == "latent":
        assert client.submitted.settings["negative_prompt"] == "blurry"
        assert "guidance_mode" not in client.submitted.settings
    else:
        assert client.submitted.settings["guidance_mode"] == "fast"


def test_the_values_of_a_run_are_kept_for_the_next(params, tmp_path):
    _, config = gimp_config(params)
    assert params.values(config) == settings.defaults()
    typed = settings.defaults() | TYPED
    params.set_values(config, typed)
    params.remember(str(tmp_path), params.values(config))
    _, fresh = gimp_config(params)
    params.set_values(fresh, params.recall(str(tmp_path)))
    assert params.values(fresh) == settings.effective(typed)
    # before any run the dialog shows the default preset's own values in its Advanced fields
    first = params.recall(str(tmp_path / "nowhere"))
    assert first["preset"] == "draft" and first | settings.PRESETS["draft"] == first
    assert first["variants"] != settings.defaults()["variants"]


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_adapter_the_progress_window_and_the_entry_touch_gimp():
    for path in GIMP_PLUGIN.glob("*.py"):
        ast.parse(path.read_text(), feature_version=(3, 10))  # GIMP's Python may be 3.10
        uses_gi = "gi" in imports(path)
        gimp = ("adapter.py", "progress.py", "blended_diffusion.py")
        assert uses_gi == (path.name in gimp), path.name
    entry = (GIMP_PLUGIN / "blended_diffusion.py").read_text()
    assert entry.startswith("#!/usr/bin/env python3\n")
    assert "Gegl.Rectangle" not in entry and "Layer.new" not in entry  # pixels: adapter only
