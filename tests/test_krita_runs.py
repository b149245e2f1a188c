"""The Krita docker's runs panel (plugin_krita/blended_diffusion/runs.py) on a fake Qt: a rebuild
decodes only the thumbnails whose picture changed (previews arrive up to once a second, and the
panel is rebuilt for each). Real Krita shows the panel in tests/test_krita_real.py."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from engine.shared.history import RUNNING, Run

KRITA = Path(__file__).resolve().parents[1] / "plugin_krita" / "blended_diffusion"


class Anything:
    """Any Qt widget, layout, enum or signal: every attribute and call answers, doing nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name: str) -> Anything:
        return Anything()

    def __call__(self, *args, **kwargs) -> Anything:
        return Anything()


class FakeImage(Anything):
    """QImage: counts the pictures decoded, from a preview's PNG or a result's pixels."""

    decoded: list[bytes] = []
    Format = Anything()

    def __init__(self, data: bytes = b"", *args) -> None:
        if data:
            FakeImage.decoded.append(bytes(data))

    def loadFromData(self, data: bytes, _format: str) -> bool:
        FakeImage.decoded.append(data)
        return True

    def copy(self) -> FakeImage:
        return self

    def isNull(self) -> bool:
        return False


@pytest.fixture
def runs(monkeypatch):
    qt = types.ModuleType("blended_diffusion.qt")
    for name in ("QHBoxLayout", "QIcon", "QLabel", "QPixmap", "QPushButton", "QSize",
                 "QToolButton", "QVBoxLayout"):  # fmt: skip
        setattr(qt, name, Anything())
    qt.QWidget, qt.QImage = Anything, FakeImage
    package = types.ModuleType("blended_diffusion")
    package.__path__ = [str(KRITA)]
    monkeypatch.setitem(sys.modules, "blended_diffusion", package)
    monkeypatch.setitem(sys.modules, "blended_diffusion.qt", qt)
    monkeypatch.delitem(sys.modules, "blended_diffusion.runs", raising=False)
    FakeImage.decoded = []
    import blended_diffusion.runs as module

    yield module
    sys.modules.pop("blended_diffusion.runs", None)


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
