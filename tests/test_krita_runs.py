"""The Krita docker's runs panel (plugin_krita/blended_diffusion/runs.py) on a fake Qt: a rebuild
decodes only the thumbnails whose picture changed (previews arrive up to once a second, and the
panel is rebuilt for each). Real Krita shows the panel in tests/test_krita_real.py."""

from __future__ import annotations

import types

import pytest

from engine.shared.history import RUNNING, Run
from tests.helpers.hosts import FakeImage, krita_plugin


@pytest.fixture
def runs(monkeypatch):
    return krita_plugin(monkeypatch).runs


def preview(seed: int, png: bytes, distance: float):
    return types.SimpleNamespace(seed=seed, png=png, step=1, distance=distance)


def test_a_rebuild_decodes_only_the_pictures_that_changed(runs):
    panel = runs.RunsPanel(None, lambda *a: None)
    run = Run(1, "a red ball", {}, state=RUNNING)
    run.preview([preview(1, b"png 1a", 0.5), preview(2, b"png 2a", 0.4)])
    panel.show_runs([run])
    assert sorted(FakeImage.decoded) == [b"png 1a", b"png 2a"]
    panel.show_runs([run])  # a rebuild with nothing new: no decode
    assert len(FakeImage.decoded) == 2
    run.preview([preview(2, b"png 2b", 0.3)])  # one variant's next preview
    panel.show_runs([run])
    assert FakeImage.decoded[2:] == [b"png 2b"]
    other = Run(2, "a blue box", {}, state=RUNNING)
    other.preview([preview(7, b"png 7a", 0.6)])
    panel.show_runs([other, run])  # a new run above: only its picture is new
    assert FakeImage.decoded[3:] == [b"png 7a"]
    result = types.SimpleNamespace(rgba=b"\x01" * 16, width=2, height=2)
    run.shots[0].result = result  # a finished variant shows its result's own pixels
    panel.show_runs([other, run])
    assert FakeImage.decoded[4:] == [result.rgba]
