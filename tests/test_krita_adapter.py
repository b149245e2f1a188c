"""The Krita plug-in on a fake `krita` and a fake Qt (tests/helpers/hosts.py): the document
adapter (what a Generate reads, the result group, Keep and Discard), the docker driving the
shared edit flow (queue, cancel, Again and Vary) against a fake client, the zip and the
plug-in's shape. The fakes mirror what tests/test_krita_real.py checks in real Krita (image
coordinates, BGRA, one undo step per `addChildNode`, none for `setChildNodes`); they never
replace that test."""

from __future__ import annotations

import ast
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from engine.shared import flow, request, settings, wording
from engine.shared.flow import EditError
from engine.shared.geometry import Rect
from engine.shared.wording import ResultLayer
from tests.helpers.client import HELLO, FakeClient
from tests.helpers.engine import until
from tests.helpers.hosts import (
    KRITA_PLUGIN,
    ROOT,
    FakeDocument,
    FakeKrita,
    FakeNode,
    FakeSelection,
    krita_plugin,
)

REQUEST = settings.request({"prompt": "a red ball"})  # the defaults: the visible picture
PLUGIN = ROOT / "plugin_krita"


@pytest.fixture
def krita(monkeypatch):
    """A fresh fake Krita (`krita.app`) and the plug-in's modules loaded against it."""
    return krita_plugin(monkeypatch)


def capture(document, request, limits=None):
    return document.capture(request, limits, lambda status: None, lambda: None)


@pytest.mark.parametrize(("model", "depth"), [("CMYKA", "U8"), ("RGBA", "U16"), ("GRAYA", "U8")])
def test_unsupported_color_says_what_and_how(krita, model, depth):
    document = krita.document
    text = document.unsupported_color(model, depth, "The layer")
    assert f"{model}/{depth}" in text and "Convert Image Color Space" in text
    assert document.unsupported_color("RGBA", "U8", "The layer") is None


# -- the document adapter -------------------------------------------------------------------


def test_capture_reads_the_window_around_the_clamped_selection(krita):
    document = krita.document
    doc = krita.app.open()
    doc.sel = FakeSelection(50, 10, 30, 20)  # reaches past the right edge
    host = capture(document, REQUEST)
    pixels = host.pixels
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
        (lambda app, doc: setattr(doc, "sel", None), "Nothing is selected"),
        (lambda app, doc: setattr(doc, "sel", FakeSelection(0, 0, 0, 0)), "empty"),
        (lambda app, doc: setattr(doc, "sel", FakeSelection(100, 0, 5, 5)), "outside"),
        (lambda app, doc: setattr(doc, "sel", FakeSelection(0, 0, 48, 9)), "at most 40 a side"),
    ],
)
def test_capture_refuses_with_a_clear_message(krita, setup, message):
    document = krita.document
    doc = krita.app.open()
    doc.sel = FakeSelection(10, 10, 8, 8)
    setup(krita.app, doc)
    with pytest.raises(EditError, match=message):
        capture(document, REQUEST, {"max_side": 40})


def test_the_flow_reads_the_pixels_of_the_press_or_the_document_for_another_window(krita):
    doc = krita.app.open()
    doc.sel = FakeSelection(10, 10, 8, 8)
    host = capture(krita.document, REQUEST)
    reads, window = doc.reads, host.pixels.window
    doc.sel = None  # the artist goes on: the edit is of what the press read
    assert host.read(window) == (host.pixels.image, host.pixels.mask) and doc.reads == reads
    smaller = Rect(window.x + 1, window.y + 1, 20, 20)  # the engine's limits changed since
    image, mask = host.read(smaller)
    assert image == doc.root.projectionPixelData(smaller.x, smaller.y, 20, 20)
    assert mask == bytes(400)


@pytest.mark.parametrize(("model", "depth"), [("CMYKA", "U8"), ("RGBA", "U16")])
def test_this_layer_only_needs_an_8_bit_rgb_layer_not_the_visible_picture(krita, model, depth):
    document = krita.document
    doc = krita.app.open()
    doc.sel = FakeSelection(10, 10, 8, 8)
    doc.active.model, doc.active.depth = model, depth  # the image itself is RGBA/U8
    with pytest.raises(EditError, match=f'layer "Background" is {model}/{depth}'):
        capture(document, replace(REQUEST, layer_only=True))
    assert capture(document, REQUEST).pixels.image


def layer(name: str, x: int, y: int, visible: bool, value: int = 7):
    return ResultLayer(name, x, y, 2, 1, bytes((0, 0, value, 255)) * 2, visible)  # RGBA


def test_results_are_one_filled_group_above_the_source_in_one_undo_step(krita):
    document = krita.document
    doc = krita.app.open()
    doc.sel = FakeSelection(10, 10, 8, 8)
    source = doc.active
    top = FakeNode(doc, "on top", "paintlayer")
    doc.root.setChildNodes([source, top])
    host = capture(document, REQUEST)
    before = source.pixelData(0, 0, doc.w, doc.h)
    layers = [layer("best", 10, 10, True, 1), layer("second", 10, 11, False, 2)]
    document.add_results(host, "Blended Diffusion: x", layers)
    assert doc.undo_steps == 1
    assert [n.name() for n in doc.root.children] == ["Background", "Blended Diffusion: x", "on top"]
    group = doc.root.children[1]
    assert [n.name() for n in group.children] == ["second", "best"]  # bottom first: best on top
    assert [n.visible() for n in group.children] == [False, True]
    assert group.children[1].pixelData(10, 10, 2, 1) == bytes((1, 0, 0, 255)) * 2  # BGRA
    assert group.children[0].pixelData(10, 10, 2, 1) == bytes(8)  # transparent elsewhere
    assert source.pixelData(0, 0, doc.w, doc.h) == before
    document.reactivate(host)
    assert doc.active is source


def test_results_when_the_source_or_the_image_went_away(krita):
    document = krita.document
    doc = krita.app.open()
    doc.sel = FakeSelection(10, 10, 8, 8)
    host = capture(document, REQUEST)
    doc.root.setChildNodes([])
    host.node.parent = None  # the user deleted the layer meanwhile: the result goes on top
    document.add_results(host, "g", [layer("best", 10, 10, True)])
    assert [n.name() for n in doc.root.children] == ["g"]
    krita.app.docs.clear()
    with pytest.raises(EditError, match="closed"):
        document.add_results(host, "g", [layer("best", 10, 10, True)])


def ink_over_background(app: FakeKrita) -> tuple[FakeDocument, FakeNode]:
    """A painted background and above it a transparent paint layer with one blue stroke."""
    doc = app.open()
    ink = FakeNode(doc, "Ink", "paintlayer")
    for x in range(20, 30):
        ink.pixels[(x, 12)] = bytes((220, 60, 30, 255))  # B, G, R, A: blue
    doc.root.setChildNodes([doc.active, ink])
    doc.active, doc.sel = ink, FakeSelection(10, 10, 30, 8)
    return doc, ink


def test_the_engine_gets_the_visible_picture_whatever_layer_is_active(krita):
    document = krita.document
    doc, ink = ink_over_background(krita.app)
    pixels = capture(document, REQUEST).pixels
    w = pixels.window
    visible = doc.root.projectionPixelData(w.x, w.y, w.width, w.height)
    assert pixels.image == visible
    at = 4 * ((12 - w.y) * w.width + 25 - w.x)
    assert pixels.image[at : at + 4] == bytes((220, 60, 30, 255))  # the stroke
    at = 4 * ((15 - w.y) * w.width + 25 - w.x)
    assert pixels.image[at : at + 4] == bytes((25, 15, 100, 255))  # the background, not black
    # "This layer only": the active layer as it shows on its own, transparent around the stroke
    alone = capture(document, replace(REQUEST, layer_only=True)).pixels.image
    assert alone == ink.pixelData(w.x, w.y, w.width, w.height) and alone[at : at + 4] == bytes(4)


@pytest.mark.parametrize("kind", ["grouplayer", "vectorlayer", "filllayer", "filelayer"])
def test_any_active_layer_works_and_the_results_go_right_above_it(krita, kind):
    document = krita.document
    doc, ink = ink_over_background(krita.app)
    active = FakeNode(doc, "Active", kind)
    if kind == "grouplayer":
        active.setChildNodes([ink])  # the stroke inside a group
        doc.root.setChildNodes([doc.root.children[0], active])
    else:
        doc.root.setChildNodes([*doc.root.children, active])
    doc.active = active
    host = capture(document, REQUEST)
    w = host.pixels.window
    assert host.pixels.image == doc.root.projectionPixelData(w.x, w.y, w.width, w.height)
    if kind == "grouplayer":  # alone, a group shows its children
        alone = capture(document, replace(REQUEST, layer_only=True)).pixels.image
        assert alone == ink.pixelData(w.x, w.y, w.width, w.height)
    document.add_results(host, "g", [layer("best", 10, 10, True)])
    # above the active layer, beside it: the result is seen as the engine made it, not through
    # a group's blending mode, opacity or masks, and the group's own layers stay its own
    assert [n.name() for n in doc.root.children][-2:] == ["Active", "g"]
    assert doc.undo_steps == 1


def test_an_active_mask_puts_the_results_above_its_layer(krita):
    document = krita.document
    doc, ink = ink_over_background(krita.app)
    mask = FakeNode(doc, "Mask", "transparencymask")
    ink.setChildNodes([mask])
    doc.active = mask
    host = capture(document, REQUEST)
    assert host.node is ink
    document.add_results(host, "g", [layer("best", 10, 10, True)])
    assert [n.name() for n in doc.root.children] == ["Background", "Ink", "g"]


def test_the_window_holds_the_grown_and_feathered_selection(krita):
    document = krita.document
    doc = krita.app.open(w=250, h=200)
    doc.sel = FakeSelection(140, 90, 10, 10)
    plain = capture(document, REQUEST).pixels.window
    shaped = settings.request({"prompt": "x", "grow": 20, "feather": 10})
    window = capture(document, shaped).pixels.window
    widen = 20 + 15 + 1  # engine/region.py shape_selection's reach
    assert window.x <= 140 - widen - 48 and window.x + window.width >= 150 + widen + 48
    assert window.width > plain.width


def test_a_runs_variant_shown_alone_kept_or_the_run_discarded_in_one_undo_step_each(krita):
    document = krita.document
    doc = krita.app.open()
    doc.sel = FakeSelection(10, 10, 8, 8)
    host = capture(document, REQUEST)
    layers = [layer("best", 10, 10, True, 1), layer("second", 10, 10, False, 2)]
    document.add_results(host, "run", layers)
    group = doc.root.children[1]
    document.show_only(host, "second")
    assert [(n.name(), n.visible()) for n in group.children] == [("second", True), ("best", False)]
    steps = doc.undo_steps
    document.keep(host, "second")
    assert doc.undo_steps == steps + 1
    assert [n.name() for n in doc.root.children] == ["Background", "second"]
    assert doc.root.children[1].pixelData(10, 10, 2, 1) == bytes((2, 0, 0, 255)) * 2
    with pytest.raises(EditError, match="no longer"):
        document.discard(host)  # kept: the group is gone
    again = capture(document, REQUEST)
    document.add_results(again, "run 2", layers)
    steps = doc.undo_steps
    document.discard(again)
    assert doc.undo_steps == steps + 1
    assert [n.name() for n in doc.root.children] == ["Background", "second"]


def test_settings_go_through_kritas_store(krita):
    document = krita.document
    document.write_setting("steps", 10)
    assert krita.app.settings[("blended_diffusion", "steps")] == "10"
    assert document.read_setting("steps", "100") == "10"
    assert document.read_setting("missing", "x") == "x"




# -- the docker, driving the shared flow ----------------------------------------------------


@pytest.fixture
def make_docker(krita, monkeypatch):
    """`make_docker(hello=None)`: the docker over an open document with a selection; its edits
    and its engine probes talk to fake clients, made on demand, answering `hello` (None: the
    fake client's own, an older engine's that names no method)."""

    def make(hello: dict | None = None):
        doc = krita.app.open()
        doc.sel = FakeSelection(10, 10, 8, 8)
        clients: list[FakeClient] = []

        def connect(endpoint: str) -> FakeClient:
            clients.append(FakeClient(info=hello))
            return clients[-1]

        monkeypatch.setattr(flow, "open_client", connect)
        widget = krita.docker.BlendedDiffusionDocker()
        widget.set_values({"prompt": "a red ball", "preset": "custom", "variants": 2, "steps": 4})
        widget.doc = doc
        widget.clients = lambda: [c for c in clients if c.idle is not None]  # the flow's
        return widget

    return make


@pytest.fixture
def docker(make_docker):
    return make_docker()


def tick_until(docker, condition, timeout: float = 10.0) -> None:
    """Tick the docker as its timer would until `condition()`."""
    until(lambda: docker._tick() or condition(), timeout, "the docker's state", every=0.002)


def running(docker, edits: int = 1) -> FakeClient:
    """The client of the docker's `edits`-th edit, once the engine accepted it."""
    tick_until(docker, lambda: len(docker.clients()) == edits and docker.edit.state == flow.RUNNING)
    return docker.clients()[-1]


def test_a_generate_adds_the_result_and_shows_it(docker, krita):
    docker.generate()
    client = running(docker)
    assert docker.cancel_button.isEnabled() and docker.status.text().startswith("Running on")
    client.push("progress", 2, 4)
    tick_until(docker, lambda: docker.progress_bar.value() == 2)
    client.push("result")
    tick_until(docker, lambda: not docker.busy)
    assert docker.edit.state == flow.DONE and not docker.cancel_button.isEnabled()
    group = wording.group_name("a red ball")
    assert docker.status.text() == wording.added(2, group)
    assert [n.name() for n in docker.doc.root.children] == ["Background", group]
    assert docker.doc.active.name() == "Background"  # active again for the next Generate
    assert docker.last_seed.text() == "last: 1"
    (run,) = krita.docker.HISTORY.runs(docker.doc)
    assert run.state == "done" and [s.rank for s in run.shots] == [1, 2]


def test_a_generate_pressed_while_one_runs_is_queued_with_the_pixels_of_its_press(docker):
    docker.generate()
    first = running(docker)
    reads = docker.doc.reads
    docker.doc.sel = FakeSelection(20, 20, 8, 8)
    docker.generate()
    assert docker.doc.reads == reads + 1 and docker.status.text().startswith("Queued")
    (queued, _, _), = docker._waiting
    docker.doc.sel = None  # changed after the press: the queued edit keeps what it read
    first.push("result")
    second = running(docker, 2)
    assert not docker._waiting
    assert queued.selection_bounds() == Rect(20, 20, 8, 8)
    second.push("result")
    tick_until(docker, lambda: not docker.busy)
    assert len(docker.doc.root.children) == 3 and docker.doc.reads == reads + 1


def test_cancel_stops_the_edit_and_drops_the_waiting_ones(docker, krita):
    docker.generate()
    client = running(docker)
    docker.generate()
    docker.cancel()
    assert client.cancelled == [client.job] and not docker._waiting
    client.push("cancelled", "client")
    tick_until(docker, lambda: not docker.busy)
    assert docker.edit.state == flow.CANCELLED and docker.status.text() == wording.CANCELLED
    assert len(docker.clients()) == 1 and [n.name() for n in docker.doc.root.children] == [
        "Background"]  # fmt: skip
    assert krita.docker.HISTORY.runs(docker.doc) == []  # nothing of it reached the document


def test_again_and_vary_run_on_the_pixels_the_run_read(docker, krita):
    docker.generate()
    running(docker).push("result")
    tick_until(docker, lambda: not docker.busy)
    (run,) = krita.docker.HISTORY.runs(docker.doc)
    reads, first = docker.doc.reads, docker.clients()[0].submitted
    docker._act("again", run, None)
    client = running(docker, 2)
    assert client.submitted.image == first.image and docker.doc.reads == reads
    assert client.submitted.settings == {**first.settings, "seed": None}
    client.push("result")
    tick_until(docker, lambda: not docker.busy)
    docker._act("vary", run, run.shots[1])
    client = running(docker, 3)
    assert client.submitted.settings == {**first.settings, "seed": 2, "variants": 1}
    assert client.submitted.image == first.image


def test_errors_at_the_press_are_shown_and_start_nothing(docker):
    docker.doc.sel = None
    docker.generate()
    assert docker.status.text() == wording.NOTHING_SELECTED and docker.edit is None
    docker.set_values({"prompt": " "})
    docker.generate()
    assert "Type a prompt first" in docker.status.text() and not docker.clients()


LATENT_HELLO = HELLO | {"method": "latent", "settings": list(request.taken_by("latent"))}


def hidden(docker) -> set[str]:
    """The settings whose fields the docker hides (with their labels)."""
    names = {name for name, field in docker.fields.items() if field.isHidden()}
    assert {n for n, label in docker.labels.items() if label.isHidden()} == names
    return names


def test_before_any_hello_and_for_an_older_engine_the_pixel_settings_show(docker):
    pixel_only = {s.name for s in settings.TABLE if s.methods == ("pixel",)}
    latent_only = {s.name for s in settings.TABLE if s.methods == ("latent",)}
    assert pixel_only == {"fast_guidance", "guidance_weight", "refine"}
    assert latent_only == {"negative_prompt", "scheduler", "guidance"}
    assert hidden(docker) == latent_only  # before the probe's answer
    tick_until(docker, lambda: docker.info)  # HELLO names no method: an older, pixel engine
    assert docker.method() == "pixel" and hidden(docker) == latent_only
    docker.generate()
    sent = running(docker).submitted.settings
    assert sent == settings.request(docker.values()).settings and "guidance_mode" in sent


def test_a_latent_engine_shows_its_settings_and_gets_its_request(make_docker):
    docker = make_docker(LATENT_HELLO)
    tick_until(docker, lambda: docker.info)
    assert docker.method() == "latent"
    assert hidden(docker) == {"fast_guidance", "guidance_weight", "refine"}
    assert docker.values()["preset"] == "custom" and docker.values()["steps"] == 4  # kept
    docker.set_values({"negative_prompt": "blurry", "guidance": 6.5, "scheduler": "ddim",
                       "fast_guidance": True, "guidance_weight": 300.0})  # fmt: skip
    docker.generate()
    sent = running(docker).submitted.settings
    assert sent == {"variants": 2, "steps": 4, "strength": 80, "negative_prompt": "blurry",
                    "guidance": 6.5, "scheduler": "ddim"}  # fmt: skip
    assert set(sent) <= set(request.taken_by("latent"))
    # a preset picked now shows the latent method's values: the scheduler's steps
    docker.set_values({"preset": "draft"})
    docker.follower.changed("preset")  # what the preset box's signals do in Krita
    docker._show_expected()
    assert (docker.values()["variants"], docker.values()["steps"]) == (2, 50)
    assert "2 variant(s) x 40 steps" in docker.expected.text()  # DDIM's 50 at 80%


def test_the_docker_follows_the_engine_it_asks(make_docker, monkeypatch):
    docker = make_docker(LATENT_HELLO)
    tick_until(docker, lambda: docker.info)
    docker.set_values({"preset": "paper"})
    docker.follower.changed("preset")
    assert docker.values()["steps"] == 25  # DPM++'s
    monkeypatch.setattr(flow, "open_client", lambda endpoint: FakeClient())  # now pixel
    docker.check_engine()
    tick_until(docker, lambda: docker._probe is None and docker.method() == "pixel")
    assert hidden(docker) == {"negative_prompt", "scheduler", "guidance"}
    assert docker.values()["steps"] == 100  # the pixel method's Paper
    monkeypatch.setattr(flow, "open_client", lambda endpoint: FakeClient(hello_error=OSError()))
    docker.check_engine()  # no answer: the last engine's settings stay shown
    tick_until(docker, lambda: docker._probe is None)
    assert docker.info == {} and docker.method() == "pixel"


# -- packaging and structure ------------------------------------------------------------------


def test_zip_for_kritas_importer(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN))
    import build_zip
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
    for path in KRITA_PLUGIN.glob("*.py"):
        found = imports(path)
        assert ("krita" in found) == (path.name == "document.py"), path.name
        assert not found & {"numpy", "torch", "PIL"}, path.name
