"""Both plug-ins are built from the one core: the Krita docker's fields and the GIMP procedure's
arguments come from the settings table and agree; the same inputs send the same request; a
large selection gets the same capped window. Fakes of Qt, Krita, GIMP and the engine; the real
hosts run in tests/test_krita_real.py and tests/test_gimp_real.py."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import pytest

from engine.shared import settings
from engine.shared.client import Job
from engine.shared.geometry import Rect

ROOT = Path(__file__).resolve().parents[1]
KRITA = ROOT / "plugin_krita" / "blended_diffusion"
GIMP = ROOT / "plugin_gimp" / "blended_diffusion"


class FakeWidget:
    """The few calls the docker makes on a Qt input widget, with Qt's behaviour for them."""

    def __init__(self, *args) -> None:
        self.low = self.high = None
        self.special, self.tip, self.items, self.index, self.current = "", "", [], -1, None

    def setToolTip(self, tip):
        self.tip = tip

    def setRange(self, low, high):
        self.low, self.high = low, high

    def setSpecialValueText(self, text):
        self.special = text

    def setValue(self, value):  # a spin box clamps to its range
        ranged = self.low is not None
        self.current = min(max(value, self.low), self.high) if ranged else value

    def value(self):
        return self.current

    setText = setPlainText = setChecked = setValue

    def text(self):
        return self.current

    toPlainText = isChecked = text

    def addItem(self, label, data):
        self.items.append((label, data))

    def findData(self, data):
        return [d for _, d in self.items].index(data)

    def setCurrentIndex(self, index):
        self.index = index

    def currentData(self):
        return self.items[self.index][1]

    def __getattr__(self, name):  # setDecimals, setSingleStep, setPlaceholderText, ...
        return lambda *a: None


@pytest.fixture(scope="module")
def krita_plugin():
    """The Krita plug-in's docker and job modules on a fake Qt and a fake `krita`."""
    qt = types.ModuleType("blended_diffusion.qt")
    for name in ("QFormLayout", "QHBoxLayout", "QLabel", "QProgressBar", "QPushButton",
                 "QTimer", "QVBoxLayout", "QWidget", "QIcon", "QImage", "QPixmap", "QSize",
                 "QToolButton"):  # fmt: skip
        setattr(qt, name, object)
    qt.QSpinBox = qt.QDoubleSpinBox = qt.QComboBox = FakeWidget
    qt.QLineEdit = qt.QPlainTextEdit = qt.QCheckBox = FakeWidget
    krita = types.ModuleType("krita")
    krita.DockWidget = krita.Extension = object
    package = types.ModuleType("blended_diffusion")
    package.__path__ = [str(KRITA)]
    saved = {k: sys.modules.get(k) for k in ("krita", "blended_diffusion", "blended_diffusion.qt")}
    sys.modules.update({"krita": krita, "blended_diffusion": package, "blended_diffusion.qt": qt})
    for name in ("document", "job", "docker", "runs"):
        sys.modules.pop(f"blended_diffusion.{name}", None)
    import blended_diffusion.docker as docker
    import blended_diffusion.document as document
    import blended_diffusion.job as job

    yield types.SimpleNamespace(docker=docker, document=document, job=job, krita=krita)
    for name in ("document", "job", "docker", "runs"):
        sys.modules.pop(f"blended_diffusion.{name}", None)
    for key, module in saved.items():
        if module is None:
            sys.modules.pop(key, None)
        else:
            sys.modules[key] = module


@pytest.fixture(scope="module")
def gimp_plugin():
    sys.path.insert(0, str(GIMP))
    import flow
    import params

    yield types.SimpleNamespace(flow=flow, params=params)
    sys.path.remove(str(GIMP))


class Procedure:
    """GIMP's add_*_argument calls, recorded by argument name."""

    def __init__(self) -> None:
        self.args: dict[str, dict] = {}

    def _add(self, kind, name, label, blurb, *rest):
        *between, default, _flags = rest
        low, high = between if len(between) == 2 else (None, None)
        choices = between[0] if len(between) == 1 else ()
        self.args[name] = {"kind": kind, "default": default, "low": low, "high": high,
                           "choices": choices, "tooltip": blurb}  # fmt: skip

    def __getattr__(self, method):
        kind = method.removeprefix("add_").removesuffix("_argument")
        return lambda *a: self._add(kind, *a)


class Config:
    def __init__(self, args) -> None:
        self.props = {name: a["default"] for name, a in args.items()}

    def get_property(self, name):
        return self.props[name]

    def set_property(self, name, value):
        self.props[name] = value


def gimp_config(gimp_plugin):
    procedure = Procedure()
    gimp_plugin.params.add_arguments(procedure, lambda s: tuple(v for v, _ in s.choices), "RW")
    return procedure, Config(procedure.args)


def test_the_settings_table_drives_both_uis(krita_plugin, gimp_plugin):
    docker = krita_plugin.docker
    fields = {s.name: docker.make_field(s) for s in settings.TABLE}
    procedure, _ = gimp_config(gimp_plugin)
    gimp = {name.replace("-", "_"): arg for name, arg in procedure.args.items()}
    assert list(fields) == list(gimp) == [s.name for s in settings.TABLE]
    for s in settings.TABLE:
        widget, arg = fields[s.name], gimp[s.name]
        assert docker.read_field(widget, s) == arg["default"] == s.default, s.name
        assert widget.tip == arg["tooltip"] == s.tooltip
        if s.low is not None:
            assert (widget.low, widget.high) == (arg["low"], arg["high"]) == (s.low, s.high)
            assert widget.special == s.special
        if s.choices:
            assert [d for _, d in widget.items] == list(arg["choices"]) == [c for c, _ in s.choices]


def test_gimp_dialog_shows_every_setting_once_the_advanced_ones_in_their_expander(gimp_plugin):
    params = gimp_plugin.params
    rows, folded = params.layout(), params.advanced()
    assert rows.count(params.ADVANCED) == 1 and folded
    shown = [r for r in rows if r != params.ADVANCED] + folded
    assert sorted(shown) == sorted(params.prop(s) for s in settings.TABLE)
    assert rows[:2] == ["prompt", "preset"]  # what an artist sets first stays on top


def test_gimp_keeps_the_values_of_a_run_for_the_next(gimp_plugin, tmp_path):
    params = gimp_plugin.params
    _, config = gimp_config(gimp_plugin)
    assert params.values(config) == settings.defaults()
    typed = settings.defaults() | INPUTS[2]
    params.set_values(config, typed)
    params.remember(str(tmp_path), params.values(config))
    _, fresh = gimp_config(gimp_plugin)
    params.set_values(fresh, params.recall(str(tmp_path)))
    assert params.values(fresh) == settings.effective(typed)
    # before any run the dialog shows the default preset's own values in its Advanced fields
    first = params.recall(str(tmp_path / "nowhere"))
    assert first["preset"] == "draft" and first | settings.PRESETS["draft"] == first
    assert first["variants"] != settings.defaults()["variants"]


class Engine:
    """A client that accepts a job and remembers what it was sent."""

    def __init__(self) -> None:
        self.info, self.sent = {}, None

    def hello(self):
        self.info = {"models": "fake", "device": "cpu", "limits": {"max_side": 4096}}
        return self.info

    def submit(self, image, width, height, mask, prompt, settings_, **kw):
        self.sent = {"prompt": prompt, "settings": settings_, "size": (width, height)}
        self.job = Job("j1", state="done")
        return self.job

    def poll(self, timeout=0.0):
        return []

    def close(self):
        pass


INPUTS = [
    {"prompt": "  a stone\\nfountain ", "preset": "draft", "seed": 12},
    {"prompt": "a red ball", "preset": "paper"},
    {"prompt": "a cat", "preset": "custom", "variants": 3, "strength": 40, "steps": 60,
     "fast_guidance": True, "guidance_weight": 250.0, "seed": -1},  # fmt: skip
    {"prompt": "a moon", "preset": "draft", "grow": 3, "feather": 6, "layer_only": True},
]


class KritaDoc:
    """A canvas whose reads cost nothing: for large selections. `reads`: the windows read, of
    the visible picture (the document's projection) or of the active layer on its own."""

    def __init__(self, size, selection) -> None:
        self.size, self.sel, self.reads, self.sources = size, selection, [], []
        node = types.SimpleNamespace(type=lambda: "paintlayer", name=lambda: "Paint",
                                     colorModel=lambda: "RGBA", colorDepth=lambda: "U8",
                                     projectionPixelData=lambda *a: self.read(*a, source="layer"),
                                     parentNode=lambda: None)  # fmt: skip
        x, y, w, h = selection
        self.selection_ = types.SimpleNamespace(x=lambda: x, y=lambda: y, width=lambda: w,
                                                height=lambda: h,
                                                pixelData=lambda x, y, w, h: b"\xff" * (w * h))
        self.node = node

    def read(self, x, y, w, h, source="visible"):
        self.reads.append(Rect(x, y, w, h))
        self.sources.append(source)
        return bytes(w * h * 4)

    pixelData = read  # the document's: its projection

    def activeNode(self):
        return self.node

    def colorModel(self):
        return "RGBA"

    def colorDepth(self):
        return "U8"

    def selection(self):
        return self.selection_

    def width(self):
        return self.size[0]

    def height(self):
        return self.size[1]

    def waitForDone(self):
        pass


class GimpHost:
    name, offsets = "Paint", (0, 0)

    def __init__(self, size, selection) -> None:
        self.size, self.selected, self.reads = size, Rect(*selection), []

    def selection_bounds(self):
        return self.selected

    def read(self, window):
        self.reads.append(window)
        return bytes(window.width * window.height * 4), b"\xff" * (window.width * window.height)

    def progress(self, fraction, text):
        pass

    def cancelled(self):
        return False

    def remove_preview(self):
        pass


def krita_sends(krita_plugin, values, size=(64, 48), selection=(10, 10, 8, 8)):
    """What the Krita plug-in sends for these typed values: fields -> request -> client."""
    docker, job = krita_plugin.docker, krita_plugin.job
    fields = {s.name: docker.make_field(s) for s in settings.TABLE}
    for name, value in values.items():
        docker.write_field(fields[name], settings.BY_NAME[name], value)
    typed = {s.name: docker.read_field(fields[s.name], s) for s in settings.TABLE}
    doc = KritaDoc(size, selection)
    app = types.SimpleNamespace(activeDocument=lambda: doc)
    krita_plugin.krita.Krita = types.SimpleNamespace(instance=lambda: app)
    engine = Engine()
    controller = job.Controller(connect=lambda e: engine)
    request = settings.request(typed)
    export = krita_plugin.document.export_active(request)
    assert doc.sources == ["layer" if request.layer_only else "visible"]
    controller.start(request, export.pixels, lambda g, ls: "")
    deadline = time.monotonic() + 5
    while engine.sent is None and time.monotonic() < deadline:
        controller.tick()
        time.sleep(0.005)
    return engine.sent, doc.reads


def gimp_sends(gimp_plugin, values, size=(64, 48), selection=(10, 10, 8, 8)):
    """What the GIMP plug-in sends for these values: config -> flow -> client."""
    _, config = gimp_config(gimp_plugin)
    gimp_plugin.params.set_values(config, values)
    engine, host = Engine(), GimpHost(size, selection)
    engine.job = None
    flow = gimp_plugin.flow
    try:
        flow.run_edit(host, gimp_plugin.params.values(config), lambda e: engine)
    except flow.EditError as e:
        assert "no result" in str(e)  # the fake engine returns none: only the request matters
    return engine.sent, host.reads


@pytest.mark.parametrize("values", INPUTS)
def test_both_plugins_send_the_same_request(krita_plugin, gimp_plugin, values):
    krita, krita_reads = krita_sends(krita_plugin, values)
    gimp, gimp_reads = gimp_sends(gimp_plugin, values)
    assert krita == gimp and krita_reads == gimp_reads
    assert krita["settings"] == settings.request(values).settings


def test_grow_and_feather_reach_the_engine_and_widen_the_window_in_both(krita_plugin, gimp_plugin):
    size, selection = (400, 300), (100, 100, 20, 20)
    plain = gimp_sends(gimp_plugin, INPUTS[0], size, selection)[1][0]
    shaped = INPUTS[0] | {"grow": 10, "feather": 20}
    krita, krita_reads = krita_sends(krita_plugin, shaped, size, selection)
    gimp, gimp_reads = gimp_sends(gimp_plugin, shaped, size, selection)
    assert krita_reads == gimp_reads
    assert krita["settings"]["grow"] == 10 and krita["settings"]["feather"] == 20
    assert "grow" not in settings.request(INPUTS[0]).settings  # off: the selection as it is
    # the engine's grown and feathered selection reaches 10 + 30 + 1 px past the selection; the
    # window holds its context: wider than the plain selection's
    window = gimp_reads[0]
    assert window.width > plain.width and window.x < plain.x


def test_a_large_selection_gets_the_same_capped_window_in_both(krita_plugin, gimp_plugin):
    size, selection = (12000, 5000), (5000, 1000, 2500, 1800)
    krita, krita_reads = krita_sends(krita_plugin, INPUTS[0], size, selection)
    gimp, gimp_reads = gimp_sends(gimp_plugin, INPUTS[0], size, selection)
    assert krita_reads == gimp_reads and len(gimp_reads) == 1
    window = gimp_reads[0]
    assert (window.width, window.height) == (4096, 4096)  # the engine's limit, not 12000 x 5000
    assert window.x <= 5000 and 5000 + 2500 <= window.x + window.width
    assert krita["size"] == gimp["size"] == (4096, 4096)
