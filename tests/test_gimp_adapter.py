"""The GIMP plug-in outside GIMP: its arguments and remembered values (params.py, on a fake
procedure and config from tests/helpers/hosts.py) and its shape. The edit itself is the shared
flow (tests/test_flow.py); tests/test_gimp_real.py runs the whole plug-in inside real GIMP 3."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from engine.shared import settings
from tests.helpers.hosts import GIMP_PLUGIN, gimp_config, gimp_params

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
    assert rows[:2] == ["prompt", "preset"]  # what an artist sets first stays on top


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
