"""The fake hosts the plug-ins' tests share: a flow.Host (engine/shared/flow.py) over a test
picture; a fake `krita` module with Krita 5.2's observed behaviour and a fake Qt, with a loader
of the Krita plug-in's modules against them; GIMP's procedure and config as the GIMP plug-in's
params use them. tests/test_krita_real.py and tests/test_gimp_real.py check the real hosts."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

from engine.shared import wording
from engine.shared.flow import Status
from engine.shared.geometry import Rect
from engine.shared.wording import ResultLayer

ROOT = Path(__file__).resolve().parents[2]
KRITA_PLUGIN = ROOT / "plugin_krita" / "blended_diffusion"
GIMP_PLUGIN = ROOT / "plugin_gimp" / "blended_diffusion"


# -- a flow.Host ------------------------------------------------------------------------------


class FakeHost:
    """A source of `size` at `offsets` in the image (GIMP's layer; Krita's canvas sits at 0, 0),
    painted R = 4x, G = 4y, B = 160, with the rectangle `selected` (image coordinates; None:
    nothing selected) selected at `coverage`; records what the flow read and showed."""

    def __init__(
        self,
        selected: Rect | None,
        offsets: tuple[int, int] = (10, 8),
        size: tuple[int, int] = (64, 56),
        *,
        coverage: int = 255,
        pixel_format: str = "RGBA8",
    ) -> None:
        self.selected, self.offsets, self.size, self.coverage = selected, offsets, size, coverage
        self.pixel_format, self.source = pixel_format, wording.source_name("source")
        self.reads: list[Rect] = []
        self.statuses: list[Status] = []
        self.previews: list[Any] = []  # (window, previews) as shown, "ended" when they end
        self.added: list[tuple[str, list[ResultLayer]]] = []
        self.add_error: Exception | None = None
        self._row = bytes(v for i in range(size[0]) for v in (i * 4 % 256, 0, 160, 255))

    @property
    def messages(self) -> list[str]:
        return [s.message for s in self.statuses]

    def selection_bounds(self) -> Rect | None:
        return self.selected

    def read(self, window: Rect) -> tuple[bytes, bytes]:
        """Row by row (a window may be 4096 px a side)."""
        self.reads.append(window)
        w, (ox, oy) = window.width, self.offsets
        rgba, mask = bytearray(), bytearray()
        inside = self.selected.moved(-ox, -oy) if self.selected else Rect(0, 0, 0, 0)
        left = min(max(inside.x - window.x, 0), w)
        right = min(max(inside.x + inside.width - window.x, 0), w)
        for j in range(window.y, window.y + window.height):
            row = bytearray(self._row[window.x * 4 : (window.x + w) * 4])
            row[1::4] = bytes([j * 4 % 256]) * w
            rgba += row
            covered = inside.y <= j < inside.y + inside.height
            mask += bytes(left) + bytes([self.coverage]) * (right - left) * covered
            mask += bytes(w - left - (right - left) * covered)
        return bytes(rgba), bytes(mask)

    def show(self, status: Status) -> None:
        self.statuses.append(status)

    def show_previews(self, window: Rect, previews: list) -> None:
        self.previews.append((window, previews))

    def end_previews(self) -> None:
        self.previews.append("ended")

    def add_layers(self, group: str, layers: list[ResultLayer]) -> None:
        if self.add_error is not None:
            raise self.add_error
        self.added.append((group, layers))


# -- a fake Qt --------------------------------------------------------------------------------


class Anything:
    """Any Qt object, layout, enum or signal: every attribute and call answers, doing nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Anything:
        return Anything()

    def __call__(self, *args: Any, **kwargs: Any) -> Anything:
        return Anything()


class FakeWidget(Anything):
    """The calls the docker makes on a Qt widget, with Qt's behaviour for them: text, value (a
    spin box clamps to its range), check state, a combo box's items, enabled, hidden."""

    def __init__(self, *args: Any) -> None:
        self.low = self.high = None
        self.special, self.tip, self.items, self.index = "", "", [], -1
        self.current: Any = args[0] if args and isinstance(args[0], str) else None
        self.enabled, self.hidden = True, False

    def setToolTip(self, tip: str) -> None:
        self.tip = tip

    def setRange(self, low, high) -> None:
        self.low, self.high = low, high

    def setMaximum(self, high) -> None:
        self.high = high

    def maximum(self):
        return self.high

    def setSpecialValueText(self, text: str) -> None:
        self.special = text

    def setValue(self, value) -> None:
        ranged = self.low is not None and self.high is not None and isinstance(value, int | float)
        self.current = min(max(value, self.low), self.high) if ranged else value

    def value(self):
        return self.current

    setText = setPlainText = setChecked = setValue

    def text(self):
        return self.current

    toPlainText = isChecked = text

    def addItem(self, label: str, data) -> None:
        self.items.append((label, data))

    def findData(self, data) -> int:
        return [d for _, d in self.items].index(data)

    def setCurrentIndex(self, index: int) -> None:
        self.index = index

    def currentData(self):
        return self.items[self.index][1]

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def isEnabled(self) -> bool:
        return self.enabled

    def setVisible(self, visible: bool) -> None:
        self.hidden = not visible

    def isHidden(self) -> bool:
        return self.hidden


class FakeImage(Anything):
    """QImage: records the pictures decoded, from a preview's PNG or a result's pixels."""

    decoded: list[bytes] = []
    Format = Anything()

    def __init__(self, data: bytes = b"", *args: Any) -> None:
        if data:
            FakeImage.decoded.append(bytes(data))

    def loadFromData(self, data: bytes, _format: str) -> bool:
        FakeImage.decoded.append(data)
        return True

    def copy(self) -> FakeImage:
        return self

    def isNull(self) -> bool:
        return False


class FakeTimer(FakeWidget):
    """QTimer, started and stopped by hand; a single shot runs at once."""

    active = False

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    @staticmethod
    def singleShot(_ms: int, call) -> None:
        call()


def fake_qt() -> types.ModuleType:
    qt = types.ModuleType("blended_diffusion.qt")
    for name in ("QFormLayout", "QHBoxLayout", "QVBoxLayout", "QIcon", "QPixmap", "QSize",
                 "QToolButton", "QKeySequence", "QObject", "Qt"):  # fmt: skip
        setattr(qt, name, Anything())  # an instance: class attributes (QPixmap.fromImage) too
    qt.QWidget = Anything  # subclassed
    for name in ("QCheckBox", "QComboBox", "QDoubleSpinBox", "QLabel", "QLineEdit",
                 "QPlainTextEdit", "QProgressBar", "QPushButton", "QSpinBox"):  # fmt: skip
        setattr(qt, name, FakeWidget)
    qt.QImage, qt.QTimer = FakeImage, FakeTimer
    return qt


# -- a fake `krita`: what document.py uses, with Krita 5.2's observed behaviour ----------------


class FakeSelection:
    def __init__(self, x: int, y: int, w: int, h: int, value: int = 255) -> None:
        self.box, self.value = (x, y, w, h), value

    def x(self) -> int:
        return self.box[0]

    def y(self) -> int:
        return self.box[1]

    def width(self) -> int:
        return self.box[2]

    def height(self) -> int:
        return self.box[3]

    def pixelData(self, x: int, y: int, w: int, h: int) -> bytes:
        sx, sy, sw, sh = self.box
        return bytes(
            self.value if sx <= i < sx + sw and sy <= j < sy + sh else 0
            for j in range(y, y + h)
            for i in range(x, x + w)
        )


class FakeNode:
    def __init__(self, doc: FakeDocument, name: str, kind: str, model: str = "RGBA") -> None:
        self.doc, self._name, self.kind = doc, name, kind
        self.model, self.depth = model, doc.depth
        self.pixels: dict[tuple[int, int], bytes] = {}  # image coordinates -> BGRA
        self.children: list[FakeNode] = []  # bottom first, like Krita's childNodes
        self.parent: FakeNode | None = None
        self._visible = True

    def name(self) -> str:
        return self._name

    def type(self) -> str:
        return self.kind

    def colorModel(self) -> str:
        return self.model

    def colorDepth(self) -> str:
        return self.depth

    def visible(self) -> bool:
        return self._visible

    def setVisible(self, value: bool) -> None:
        self._visible = value

    def pixelData(self, x: int, y: int, w: int, h: int) -> bytes:
        empty = b"\0\0\0\0"
        return b"".join(
            self.pixels.get((i, j), empty) for j in range(y, y + h) for i in range(x, x + w)
        )

    def projectionPixelData(self, x: int, y: int, w: int, h: int) -> bytes:
        """The node as it shows: a group's visible children over each other (alpha 0 or 255
        only: a pixel of the topmost child that covers it)."""
        if self.kind != "grouplayer":
            return self.pixelData(x, y, w, h)
        out = bytearray(w * h * 4)
        for child in self.children:  # bottom first
            if not child.visible():
                continue
            data = child.projectionPixelData(x, y, w, h)
            for k in range(0, len(data), 4):
                if data[k + 3]:
                    out[k : k + 4] = data[k : k + 4]
        return bytes(out)

    def setPixelData(self, data: bytes, x: int, y: int, w: int, h: int) -> bool:
        assert len(data) == w * h * 4
        for j in range(h):
            for i in range(w):
                k = 4 * (j * w + i)
                self.pixels[(x + i, y + j)] = bytes(data[k : k + 4])
        return True

    def parentNode(self):
        return self.parent

    def childNodes(self) -> list[FakeNode]:
        return list(self.children)

    def addChildNode(self, child: FakeNode, above: FakeNode | None) -> bool:
        self.doc.undo_steps += 1  # one undo command each, attached or not (seen in Krita 5.2)
        index = self.children.index(above) + 1 if above is not None else len(self.children)
        self.children.insert(index, child)
        child.parent = self
        return True

    def setChildNodes(self, nodes: list[FakeNode]) -> None:
        self.children = list(nodes)  # no undo command (seen in Krita 5.2)
        for n in nodes:
            n.parent = self

    def setName(self, name: str) -> None:
        self._name = name

    def remove(self) -> bool:
        self.doc.undo_steps += 1  # one undo command
        self.parent.children.remove(self)
        self.parent = None
        return True


class FakeDocument:
    """A canvas with a "Background" paint layer, active; `reads` counts the projection reads."""

    def __init__(self, w: int = 64, h: int = 48, model: str = "RGBA", depth: str = "U8") -> None:
        self.w, self.h, self.model, self.depth = w, h, model, depth
        self.undo_steps = self.reads = 0
        self.root = FakeNode(self, "root", "grouplayer")
        self.active: FakeNode | None = FakeNode(self, "Background", "paintlayer", model)
        self.root.setChildNodes([self.active])
        self.sel: FakeSelection | None = None

    def width(self) -> int:
        return self.w

    def height(self) -> int:
        return self.h

    def colorModel(self) -> str:
        return self.model

    def colorDepth(self) -> str:
        return self.depth

    def activeNode(self):
        return self.active

    def setActiveNode(self, node) -> None:
        self.active = node

    def selection(self):
        return self.sel

    def rootNode(self):
        return self.root

    def waitForDone(self) -> None:
        pass

    def pixelData(self, x: int, y: int, w: int, h: int) -> bytes:
        self.reads += 1
        return self.root.projectionPixelData(x, y, w, h)  # the projection: what the artist sees

    def refreshProjection(self) -> None:
        pass

    def createGroupLayer(self, name: str) -> FakeNode:
        return FakeNode(self, name, "grouplayer")

    def createNode(self, name: str, kind: str) -> FakeNode:
        return FakeNode(self, name, kind, self.model)


class FakeKrita:
    def __init__(self) -> None:
        self.docs: list[FakeDocument] = []
        self.settings: dict[tuple[str, str], str] = {}

    def open(self, **kw: Any) -> FakeDocument:
        """A new active document, its Background painted B = x, G = y, R = 100."""
        doc = FakeDocument(**kw)
        self.docs.append(doc)
        for y in range(doc.h):
            for x in range(doc.w):
                doc.active.pixels[(x, y)] = bytes((x, y, 100, 255))
        return doc

    def activeDocument(self):
        return self.docs[-1] if self.docs else None

    def documents(self) -> list[FakeDocument]:
        return list(self.docs)

    def readSetting(self, group: str, key: str, default: str) -> str:
        return self.settings.get((group, key), default)

    def writeSetting(self, group: str, key: str, value: str) -> None:
        self.settings[(group, key)] = value

    def action(self, name: str):
        assert name == "flatten_layer"
        return types.SimpleNamespace(trigger=self.flatten_active)

    def flatten_active(self) -> None:
        """Krita's Flatten Layer on the active group: one command, a paint layer "<group>
        Merged" holding what its visible children show (as seen in real Krita 5.2.9)."""
        doc = self.activeDocument()
        group = doc.active
        flat = FakeNode(doc, f"{group.name()} Merged", "paintlayer")
        for child in group.children:  # bottom first: the upper ones cover
            if child.visible():
                flat.pixels.update(child.pixels)
        parent = group.parent
        parent.children[parent.children.index(group)] = flat
        flat.parent, group.parent = parent, None
        doc.active = flat
        doc.undo_steps += 1


MODULES = ("document", "docker", "runs", "extension")


def krita_plugin(monkeypatch) -> types.SimpleNamespace:
    """A fresh fake Krita (`app`) and the plug-in's modules loaded against it and a fake Qt,
    without the package's __init__ (that one registers with Krita)."""
    app = FakeKrita()
    krita = types.ModuleType("krita")
    krita.Krita = types.SimpleNamespace(instance=lambda: app)
    krita.DockWidget = krita.Extension = Anything
    package = types.ModuleType("blended_diffusion")
    package.__path__ = [str(KRITA_PLUGIN)]
    for name, module in (("krita", krita), ("blended_diffusion", package),
                         ("blended_diffusion.qt", fake_qt())):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    for name in MODULES:
        monkeypatch.delitem(sys.modules, f"blended_diffusion.{name}", raising=False)
    FakeImage.decoded = []
    loaded = {name: importlib.import_module(f"blended_diffusion.{name}") for name in MODULES[:3]}
    return types.SimpleNamespace(app=app, **loaded)


# -- GIMP: the procedure and config the GIMP plug-in's params work on -------------------------


class Procedure:
    """GIMP's add_*_argument calls, recorded by argument name."""

    def __init__(self) -> None:
        self.args: dict[str, dict] = {}

    def _add(self, kind, name, label, blurb, *rest) -> None:
        *between, default, _flags = rest
        low, high = between if len(between) == 2 else (None, None)
        choices = between[0] if len(between) == 1 else ()
        self.args[name] = {"kind": kind, "default": default, "low": low, "high": high,
                           "choices": choices, "tooltip": blurb}  # fmt: skip

    def __getattr__(self, method: str):
        kind = method.removeprefix("add_").removesuffix("_argument")
        return lambda *a: self._add(kind, *a)


class Config:
    """A procedure's config: its arguments' properties, at their defaults."""

    def __init__(self, args: dict[str, dict]) -> None:
        self.props = {name: a["default"] for name, a in args.items()}

    def get_property(self, name: str):
        return self.props[name]

    def set_property(self, name: str, value) -> None:
        self.props[name] = value


def gimp_params(monkeypatch) -> types.ModuleType:
    """The GIMP plug-in's params module (no gi: GIMP registers the procedure from it)."""
    monkeypatch.syspath_prepend(str(GIMP_PLUGIN))
    monkeypatch.delitem(sys.modules, "params", raising=False)
    return importlib.import_module("params")


def gimp_config(params) -> tuple[Procedure, Config]:
    """The procedure's arguments as params adds them, and a config holding their defaults."""
    procedure = Procedure()
    params.add_arguments(procedure, lambda s: tuple(v for v, _ in s.choices), "RW")
    return procedure, Config(procedure.args)
