"""The Krita plug-in's own logic, fast: pixels, the document adapter on a fake `krita` module, the
job state machine on a fake client (and the real client against a dead and a live engine), the
zip. The fake mirrors what tests/test_krita_real.py checks in real Krita (image coordinates, BGRA,
one undo step per `addChildNode`, none for `setChildNodes`); it never replaces that test."""

from __future__ import annotations

import ast
import sys
import threading
import time
import types
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port, host_picture

from engine.shared import settings
from engine.shared.geometry import Rect
from engine.shared.wording import ResultLayer

ROOT = Path(__file__).resolve().parent.parent
REQUEST = settings.request({"prompt": "a red ball"})  # the defaults: the visible picture
PLUGIN = ROOT / "plugin_krita"
PACKAGE = PLUGIN / "blended_diffusion"


# -- a fake `krita`: just what document.py uses, with Krita's observed behaviour --------------


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
    def __init__(self, w: int = 64, h: int = 48, model: str = "RGBA", depth: str = "U8") -> None:
        self.w, self.h, self.model, self.depth = w, h, model, depth
        self.undo_steps = 0
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


@pytest.fixture
def krita(monkeypatch):
    """A fresh fake Krita, and the plug-in's modules loaded against it."""
    app = FakeKrita()
    module = types.ModuleType("krita")
    module.Krita = types.SimpleNamespace(instance=lambda: app)
    module.DockWidget = module.Extension = object
    monkeypatch.setitem(sys.modules, "krita", module)
    monkeypatch.delitem(sys.modules, "blended_diffusion.document", raising=False)
    return app


def plugin_module(name: str):
    """A module of the plug-in, loaded without its package __init__ (that one registers with
    Krita and imports Qt, neither of which exists here)."""
    if "blended_diffusion" not in sys.modules:
        package = types.ModuleType("blended_diffusion")
        package.__path__ = [str(PACKAGE)]
        sys.modules["blended_diffusion"] = package
    __import__(f"blended_diffusion.{name}")
    return sys.modules[f"blended_diffusion.{name}"]


job_mod = plugin_module("job")


@pytest.mark.parametrize(("model", "depth"), [("CMYKA", "U8"), ("RGBA", "U16"), ("GRAYA", "U8")])
def test_unsupported_color_says_what_and_how(krita, model, depth):
    document = plugin_module("document")
    text = document.unsupported_color(model, depth, "The layer")
    assert f"{model}/{depth}" in text and "Convert Image Color Space" in text
    assert document.unsupported_color("RGBA", "U8", "The layer") is None


# -- the document adapter -------------------------------------------------------------------


def opened(app: FakeKrita, **kw) -> FakeDocument:
    doc = FakeDocument(**kw)
    app.docs.append(doc)
    for y in range(doc.h):
        for x in range(doc.w):
            doc.active.pixels[(x, y)] = bytes((x, y, 100, 255))  # B, G, R, A
    return doc


def test_export_reads_the_window_around_the_clamped_selection(krita):
    document = plugin_module("document")
    doc = opened(krita)
    doc.sel = FakeSelection(50, 10, 30, 20)  # reaches past the right edge
    export = document.export_active(REQUEST)
    pixels = export.pixels
    w = pixels.window
    # the clamped selection (50, 10, 14, 20) and the engine's least context (48) each side
    assert w == Rect(2, 0, 62, 48)
    assert len(pixels.image) == w.width * w.height * 4 and len(pixels.mask) == w.width * w.height
    assert pixels.image[:4] == bytes((2, 0, 100, 255))  # BGRA from image coordinates
    row = pixels.mask[10 * w.width : 11 * w.width]
    assert row == bytes(48) + b"\xff" * 14


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda app, doc: app.docs.clear(), "Open an image"),
        (lambda app, doc: setattr(doc, "active", None), "no layer is active"),
        (lambda app, doc: setattr(doc, "model", "CMYKA"), "The image is CMYKA/U8"),
        (lambda app, doc: setattr(doc, "depth", "U16"), "The image is RGBA/U16"),
        (lambda app, doc: setattr(doc, "sel", None), "no selection"),
        (lambda app, doc: setattr(doc, "sel", FakeSelection(0, 0, 0, 0)), "empty"),
        (lambda app, doc: setattr(doc, "sel", FakeSelection(100, 0, 5, 5)), "outside"),
        (lambda app, doc: setattr(doc, "sel", FakeSelection(0, 0, 9, 9, value=0)), "empty"),
        (lambda app, doc: setattr(doc, "sel", FakeSelection(0, 0, 48, 9)), "at most 40 a side"),
    ],
)
def test_export_refuses_with_a_clear_message(krita, setup, message):
    document = plugin_module("document")
    doc = opened(krita)
    doc.sel = FakeSelection(10, 10, 8, 8)
    setup(krita, doc)
    with pytest.raises(document.UserError, match=message):
        document.export_active(REQUEST, {"max_side": 40})


@pytest.mark.parametrize(("model", "depth"), [("CMYKA", "U8"), ("RGBA", "U16")])
def test_this_layer_only_needs_an_8_bit_rgb_layer_not_the_visible_picture(krita, model, depth):
    document = plugin_module("document")
    doc = opened(krita)
    doc.sel = FakeSelection(10, 10, 8, 8)
    doc.active.model, doc.active.depth = model, depth  # the image itself is RGBA/U8
    with pytest.raises(document.UserError, match=f'layer "Background" is {model}/{depth}'):
        document.export_active(replace(REQUEST, layer_only=True))
    assert document.export_active(REQUEST).pixels.image


def layer(name: str, x: int, y: int, visible: bool, value: int = 7):
    return ResultLayer(name, x, y, 2, 1, bytes((0, 0, value, 255)) * 2, visible)  # RGBA


def test_results_are_one_filled_group_above_the_source_in_one_undo_step(krita):
    document = plugin_module("document")
    doc = opened(krita)
    doc.sel = FakeSelection(10, 10, 8, 8)
    source = doc.active
    top = FakeNode(doc, "on top", "paintlayer")
    doc.root.setChildNodes([source, top])
    export = document.export_active(REQUEST)
    before = source.pixelData(0, 0, doc.w, doc.h)
    layers = [layer("best", 10, 10, True, 1), layer("second", 10, 11, False, 2)]
    summary = document.add_results(export, "Blended Diffusion: x", layers)
    assert doc.undo_steps == 1
    assert [n.name() for n in doc.root.children] == ["Background", "Blended Diffusion: x", "on top"]
    group = doc.root.children[1]
    assert [n.name() for n in group.children] == ["second", "best"]  # bottom first: best on top
    assert [n.visible() for n in group.children] == [False, True]
    assert group.children[1].pixelData(10, 10, 2, 1) == bytes((1, 0, 0, 255)) * 2  # BGRA
    assert group.children[0].pixelData(10, 10, 2, 1) == bytes(8)  # transparent elsewhere
    assert source.pixelData(0, 0, doc.w, doc.h) == before
    assert "2 variant(s)" in summary
    document.reactivate(export)
    assert doc.active is source


def test_results_when_the_source_or_the_image_went_away(krita):
    document = plugin_module("document")
    doc = opened(krita)
    doc.sel = FakeSelection(10, 10, 8, 8)
    export = document.export_active(REQUEST)
    doc.root.setChildNodes([])
    export.source.parent = None  # the user deleted the layer meanwhile: the result goes on top
    document.add_results(export, "g", [layer("best", 10, 10, True)])
    assert [n.name() for n in doc.root.children] == ["g"]
    krita.docs.clear()
    with pytest.raises(document.UserError, match="closed"):
        document.add_results(export, "g", [layer("best", 10, 10, True)])


def ink_over_background(app: FakeKrita) -> tuple[FakeDocument, FakeNode]:
    """A painted background and above it a transparent paint layer with one blue stroke."""
    doc = opened(app)
    ink = FakeNode(doc, "Ink", "paintlayer")
    for x in range(20, 30):
        ink.pixels[(x, 12)] = bytes((220, 60, 30, 255))  # B, G, R, A: blue
    doc.root.setChildNodes([doc.active, ink])
    doc.active, doc.sel = ink, FakeSelection(10, 10, 30, 8)
    return doc, ink


def test_the_engine_gets_the_visible_picture_whatever_layer_is_active(krita):
    document = plugin_module("document")
    doc, ink = ink_over_background(krita)
    pixels = document.export_active(REQUEST).pixels
    w = pixels.window
    visible = doc.root.projectionPixelData(w.x, w.y, w.width, w.height)
    assert pixels.image == visible
    at = 4 * ((12 - w.y) * w.width + 25 - w.x)
    assert pixels.image[at : at + 4] == bytes((220, 60, 30, 255))  # the stroke
    at = 4 * ((15 - w.y) * w.width + 25 - w.x)
    assert pixels.image[at : at + 4] == bytes((25, 15, 100, 255))  # the background, not black
    # "This layer only": the active layer as it shows on its own, transparent around the stroke
    alone = document.export_active(replace(REQUEST, layer_only=True)).pixels.image
    assert alone == ink.pixelData(w.x, w.y, w.width, w.height) and alone[at : at + 4] == bytes(4)


@pytest.mark.parametrize("kind", ["grouplayer", "vectorlayer", "filllayer", "filelayer"])
def test_any_active_layer_works_and_the_results_go_right_above_it(krita, kind):
    document = plugin_module("document")
    doc, ink = ink_over_background(krita)
    active = FakeNode(doc, "Active", kind)
    if kind == "grouplayer":
        active.setChildNodes([ink])  # the stroke inside a group
        doc.root.setChildNodes([doc.root.children[0], active])
    else:
        doc.root.setChildNodes([*doc.root.children, active])
    doc.active = active
    export = document.export_active(REQUEST)
    w = export.pixels.window
    assert export.pixels.image == doc.root.projectionPixelData(w.x, w.y, w.width, w.height)
    if kind == "grouplayer":  # alone, a group shows its children
        alone = document.export_active(replace(REQUEST, layer_only=True)).pixels.image
        assert alone == ink.pixelData(w.x, w.y, w.width, w.height)
    document.add_results(export, "g", [layer("best", 10, 10, True)])
    # above the active layer, beside it: the result is seen as the engine made it, not through
    # a group's blending mode, opacity or masks, and the group's own layers stay its own
    assert [n.name() for n in doc.root.children][-2:] == ["Active", "g"]
    assert doc.undo_steps == 1


def test_an_active_mask_puts_the_results_above_its_layer(krita):
    document = plugin_module("document")
    doc, ink = ink_over_background(krita)
    mask = FakeNode(doc, "Mask", "transparencymask")
    ink.setChildNodes([mask])
    doc.active = mask
    export = document.export_active(REQUEST)
    assert export.source is ink
    document.add_results(export, "g", [layer("best", 10, 10, True)])
    assert [n.name() for n in doc.root.children] == ["Background", "Ink", "g"]


def test_the_window_holds_the_grown_and_feathered_selection(krita):
    document = plugin_module("document")
    doc = opened(krita, w=250, h=200)
    doc.sel = FakeSelection(140, 90, 10, 10)
    plain = document.export_active(REQUEST).pixels.window
    shaped = settings.request({"prompt": "x", "grow": 20, "feather": 10})
    window = document.export_active(shaped).pixels.window
    widen = 20 + 15 + 1  # engine/region.py shape_selection's reach
    assert window.x <= 140 - widen - 48 and window.x + window.width >= 150 + widen + 48
    assert window.width > plain.width


def test_a_runs_variant_shown_alone_kept_or_the_run_discarded_in_one_undo_step_each(krita):
    document = plugin_module("document")
    doc = opened(krita)
    doc.sel = FakeSelection(10, 10, 8, 8)
    export = document.export_active(REQUEST)
    layers = [layer("best", 10, 10, True, 1), layer("second", 10, 10, False, 2)]
    document.add_results(export, "run", layers)
    group = doc.root.children[1]
    document.show_only(export, "second")
    assert [(n.name(), n.visible()) for n in group.children] == [("second", True), ("best", False)]
    steps = doc.undo_steps
    document.keep(export, "second")
    assert doc.undo_steps == steps + 1
    assert [n.name() for n in doc.root.children] == ["Background", "second"]
    assert doc.root.children[1].pixelData(10, 10, 2, 1) == bytes((2, 0, 0, 255)) * 2
    with pytest.raises(document.UserError, match="no longer"):
        document.discard(export)  # kept: the group is gone
    again = document.export_active(REQUEST)
    document.add_results(again, "run 2", layers)
    steps = doc.undo_steps
    document.discard(again)
    assert doc.undo_steps == steps + 1
    assert [n.name() for n in doc.root.children] == ["Background", "second"]


def test_settings_go_through_kritas_store(krita):
    document = plugin_module("document")
    document.write_setting("steps", 10)
    assert krita.settings[("blended_diffusion", "steps")] == "10"
    assert document.read_setting("steps", "100") == "10"
    assert document.read_setting("missing", "x") == "x"


# -- the job state machine --------------------------------------------------------------------


class FakeClient:
    """The client's interface (engine/shared/client.py) with scripted events."""

    def __init__(self, error: Exception | None = None, block: threading.Event | None = None):
        from engine.shared.client import Job

        self.info: dict = {}
        self.job = Job("job1")
        self.error, self.block = error, block
        self.events: list = []
        self.cancelled: list = []
        self.closed = False

    def hello(self) -> dict:
        self.hellos = getattr(self, "hellos", 0) + 1
        seconds = {"full": {"1": 2.0}} if self.hellos > 1 else {}  # measured on the first job
        self.info = {"models": "tiny random model", "step_seconds": seconds}
        return self.info

    def submit(
        self, image, width, height, mask, prompt, settings, *, image_format, stride=0, previews
    ):
        assert image_format == "BGRA8" and len(image) == width * height * 4
        assert previews == {"every": 1}  # the docker shows the variants' estimates
        if self.block is not None:
            self.block.wait(5)
        if self.error is not None:
            raise self.error
        return self.job

    def poll(self) -> list:
        events, self.events = self.events, []
        return events

    def cancel(self, job) -> None:
        self.cancelled.append(job)

    def close(self) -> None:
        self.closed = True

    def event(self, kind: str, **fields):
        from engine.shared.client import Event

        # as the client's poll does: the job is updated before its event is returned
        state = {"result": "done", "error": "failed", "cancelled": "cancelled"}
        self.job.state = state.get(kind, self.job.state)
        self.job.error = fields.get("error", self.job.error)
        self.events.append(Event(kind, self.job.id, self.job, **fields))


def request(endpoint: str = "tcp://x", **change) -> settings.Request:
    sent = settings.request({"prompt": "a red ball", "variants": 1}).settings
    return settings.Request("a red ball", endpoint, sent | change)


def pixels() -> job_mod.Pixels:
    return job_mod.Pixels(Rect(5, 6, 2, 2), bytes(16), bytes(4))


def run_until(controller, states, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while controller.state not in states:
        assert time.monotonic() < deadline, controller.progress
        controller.tick()
        time.sleep(0.005)


def test_a_second_run_on_the_same_client_is_estimated_from_the_engines_latest_step_times():
    client = FakeClient()
    controller = job_mod.Controller(connect=lambda e: client)
    for expected in ("the time is known after the engine's first edit", "Expected: about"):
        client.job.state = "queued"
        controller.start(request(), pixels(), lambda g, ls: "ok")
        run_until(controller, [job_mod.RUNNING])
        assert expected in controller.progress.message, controller.progress.message
        client.event("result")
        controller.tick()


def test_job_runs_through_its_states():
    from engine.shared.client import Variant

    client = FakeClient()
    seen, applied = [], []
    controller = job_mod.Controller(lambda p: seen.append(p.state), connect=lambda e: client)
    controller.start(request(), pixels(), lambda g, ls: applied.append((g, ls)) or "ok")
    assert controller.state == job_mod.SUBMITTING and controller.active
    run_until(controller, [job_mod.RUNNING])
    assert controller.progress.message.startswith("Running on ")  # the shared wording's
    client.event("progress", step=3, total=8)
    controller.tick()
    assert (controller.progress.step, controller.progress.total) == (3, 8)
    client.job.variants = [Variant(1, 0, 0, 1, 1, bytes((9, 8, 7, 255)), 0.4, 1234)]
    client.job.models = "tiny random model"
    client.event("result")
    assert controller.tick() is False
    assert controller.state == job_mod.DONE and controller.progress.message == "ok"
    assert controller.progress.seed == 1234 and not controller.progress.error
    group, layers = applied[0]
    assert group == 'Blended Diffusion: "a red ball"' and (layers[0].x, layers[0].y) == (5, 6)
    assert seen[0] == job_mod.SUBMITTING and seen[-1] == job_mod.DONE


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("unreachable", "Engine unreachable at"),
        ("refused", "refused the edit (limit): too big"),
        ("version", "from the same version"),
    ],
)
def test_submit_errors_become_messages(error, message):
    from engine.shared.client import EngineError, EngineUnreachable, VersionMismatch

    exc = {
        "unreachable": EngineUnreachable("engine unreachable at tcp://x: no connection"),
        "refused": EngineError("limit", "too big"),
        "version": VersionMismatch("engine speaks 2"),
    }[error]
    client = FakeClient(error=exc)
    controller = job_mod.Controller(connect=lambda e: client)
    controller.start(request(), pixels(), lambda g, ls: "")
    run_until(controller, [job_mod.FAILED])
    assert message in controller.progress.message and controller.progress.error
    assert client.closed  # a fresh socket for the next try


def test_engine_errors_and_lost_engine_while_running():
    from engine.shared.client import EngineError

    for code, message in (("internal", "refused the edit (internal)"), ("timeout", "Lost")):
        client = FakeClient()
        controller = job_mod.Controller(connect=lambda e, c=client: c)
        controller.start(request(), pixels(), lambda g, ls: "")
        run_until(controller, [job_mod.RUNNING])
        client.event("error", error=EngineError(code, "boom"))
        controller.tick()
        assert controller.state == job_mod.FAILED and message in controller.progress.message


def test_cancel_while_running_and_a_result_that_crosses_it():
    client = FakeClient()
    controller = job_mod.Controller(connect=lambda e: client)
    controller.start(request(), pixels(), lambda g, ls: pytest.fail("nothing to add"))
    run_until(controller, [job_mod.RUNNING])
    controller.cancel()
    assert client.cancelled == [client.job] and "Cancelling" in controller.progress.message
    client.event("result")  # the cancel crossed a finished job: still nothing is added
    controller.tick()
    assert controller.state == job_mod.CANCELLED


def test_cancel_while_submitting_never_blocks():
    gate = threading.Event()
    client = FakeClient(block=gate)
    controller = job_mod.Controller(connect=lambda e: client)
    controller.start(request(), pixels(), lambda g, ls: "")
    started = time.monotonic()
    for _ in range(10):
        assert controller.tick() is True  # the submit is stuck; the UI is not
    controller.cancel()
    assert time.monotonic() - started < 0.5
    gate.set()
    run_until(controller, [job_mod.RUNNING])
    assert client.cancelled == [client.job]  # cancelled as soon as the engine took it
    client.event("cancelled")
    controller.tick()
    assert controller.state == job_mod.CANCELLED


def test_missing_pyzmq_is_a_message():
    def connect(endpoint):
        raise ImportError("No module named 'zmq'")

    controller = job_mod.Controller(connect=connect)
    controller.start(request(), pixels(), lambda g, ls: "")
    assert controller.state == job_mod.FAILED and "install.py" in controller.progress.message


def test_a_failing_apply_is_a_message():
    from engine.shared.client import Variant

    client = FakeClient()
    controller = job_mod.Controller(connect=lambda e: client)

    def apply(group, layers):
        raise RuntimeError("the image was closed")

    controller.start(request(), pixels(), apply)
    run_until(controller, [job_mod.RUNNING])
    client.job.variants = [Variant(1, 0, 0, 1, 1, bytes(4), 0.4, 1)]
    client.event("result")
    controller.tick()
    assert controller.state == job_mod.FAILED and "closed" in controller.progress.message


# -- with the real client ---------------------------------------------------------------------


def test_dead_engine_fails_within_the_timeout_without_blocking(monkeypatch):
    monkeypatch.setattr(job_mod, "TIMEOUT", 1.0)
    controller = job_mod.Controller()
    controller.start(request(f"tcp://127.0.0.1:{free_port()}"), pixels(), lambda g, ls: "")
    started, slowest = time.monotonic(), 0.0
    while controller.active:
        t = time.monotonic()
        controller.tick()
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(0.02)
    assert controller.state == job_mod.FAILED
    assert "unreachable" in controller.progress.message
    assert time.monotonic() - started < 3.0 and slowest < 0.1


def test_a_live_engine_edits_a_bgra_window(start_engine):
    server = start_engine()
    rgba, mask = host_picture(32, 32, box=(8, 8, 12, 10))
    bgra = bytearray(rgba)
    bgra[0::4], bgra[2::4] = rgba[2::4], rgba[0::4]
    req = request(server.endpoint, variants=2, steps=4, skip=1, seed=3)
    window = Rect(100, 50, 32, 32)  # the window's place in a larger image
    applied = []
    controller = job_mod.Controller()
    pixels = job_mod.Pixels(window, bytes(bgra), mask)
    controller.start(req, pixels, lambda g, ls: applied.append(ls) or "ok")
    run_until(controller, [job_mod.DONE, job_mod.FAILED], timeout=120)
    assert controller.state == job_mod.DONE, controller.progress.message
    layers = applied[0]
    assert len(layers) == 2 and [spec.visible for spec in layers] == [True, False]
    assert (layers[0].x, layers[0].y, layers[0].width, layers[0].height) == (108, 58, 12, 10)
    assert layers[0].rgba[3::4] == b"\xff" * (12 * 10)  # the selection's alpha
    assert "#1" in layers[0].name and "[random model]" in layers[0].name


# -- packaging and structure ------------------------------------------------------------------


def test_zip_for_kritas_importer(tmp_path):
    sys.path.insert(0, str(PLUGIN))
    try:
        import build_zip
    finally:
        sys.path.remove(str(PLUGIN))
    wheel = tmp_path / "pyzmq-27.0.0-cp313-cp313-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("zmq/__init__.py", "")
        z.writestr("pyzmq.libs/libzmq.so", "x")
        z.writestr("pyzmq-27.0.0.dist-info/RECORD", "")
    out = build_zip.build(tmp_path / "bd.zip", wheel)
    names = set(zipfile.ZipFile(out).namelist())
    for name in (
        "blended_diffusion.desktop",
        "blended_diffusion/",  # Krita's importer looks for the folder's own entry
        "blended_diffusion/__init__.py",
        "blended_diffusion/blended_diffusion.action",
        "blended_diffusion/_lib/engine/shared/client.py",
        "blended_diffusion/_lib/engine/shared/protocol.py",
        "blended_diffusion/_lib/zmq/__init__.py",
        "blended_diffusion/_lib/pyzmq.libs/libzmq.so",
    ):
        assert name in names
    assert not any("__pycache__" in n or "dist-info" in n for n in names)


def test_desktop_file_declares_the_python_plugin():
    text = (PLUGIN / "blended_diffusion.desktop").read_text()
    for line in (
        "ServiceTypes=Krita/PythonPlugin",
        "X-KDE-Library=blended_diffusion",
        "X-Python-2-Compatible=false",
    ):
        assert line in text


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_document_adapter_imports_krita_and_nothing_heavy():
    for path in PACKAGE.glob("*.py"):
        found = imports(path)
        assert ("krita" in found) == (path.name == "document.py"), path.name
        assert not found & {"numpy", "torch", "PIL"}, path.name
