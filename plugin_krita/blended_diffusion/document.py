"""The Krita adapter: the only module that imports `krita`.

`KritaHost` is Krita's side of the edit flow (engine/shared/flow.py Host): it reads the visible
picture (or the active layer alone) and the selection, and adds the result layers; the module
also does a run's Keep and Discard and hands the others what they need from Krita (base classes,
settings, the active window), so that they stay testable without it. Facts about Krita 5.2 this
relies on (checked in real Krita, see tests/test_krita_real.py): `Document.pixelData` is the
projection (what the artist sees), `Node.projectionPixelData` a node as it shows on its own;
both, and `pixelData`/`setPixelData`, take image coordinates, also for a moved layer; RGBA/U8
bytes are B, G, R, A; `selection()` is None without a selection and 0x0 when empty, its bounds
may reach past the canvas; each `addChildNode` is one undo step while `setChildNodes` on a group
not yet in the image adds none, so a filled group attached once is one undo step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import krita

from engine.shared import flow, geometry, wording
from engine.shared.flow import EditError, Status
from engine.shared.geometry import Rect
from engine.shared.settings import Request
from engine.shared.wording import ResultLayer

DockWidget = krita.DockWidget
Extension = krita.Extension
SETTINGS_GROUP = "blended_diffusion"
SUPPORTED = ("RGBA", "U8")  # Krita's colour model and depth ids for 8-bit RGB with alpha
MASKS = ("transparencymask", "filtermask", "transformmask", "selectionmask", "colorizemask")


def app():
    return krita.Krita.instance()


def active_document():
    return app().activeDocument()


def read_setting(key: str, default: str) -> str:
    return app().readSetting(SETTINGS_GROUP, key, default)


def write_setting(key: str, value: object) -> None:
    app().writeSetting(SETTINGS_GROUP, key, str(value))


def register(extension_class: type, docker_id: str, title: str, docker_class: type) -> None:
    krita_app = app()
    krita_app.addExtension(extension_class(krita_app))
    position = krita.DockWidgetFactoryBase.DockRight
    krita_app.addDockWidgetFactory(krita.DockWidgetFactory(docker_id, position, docker_class))


def active_window_docker(docker_id: str):
    """The plug-in's docker in the active window (None before a window exists)."""
    window = app().activeWindow()
    if window is None:
        return None
    return next((d for d in window.dockers() if d.objectName() == docker_id), None)


def unsupported_color(model: str, depth: str, what: str) -> str | None:
    """Why `what` cannot be edited, or None for 8-bit RGBA (the only layout the engine reads)."""
    if (model, depth) == SUPPORTED:
        return None
    return (
        f"{what} is {model}/{depth}: Blended Diffusion edits 8-bit RGB images only. Convert it "
        "with Image > Convert Image Color Space (RGB/Alpha, 8-bit integer/channel), or work on "
        "an 8-bit RGB copy."
    )


@dataclass(frozen=True)
class Pixels:
    """A window of the source as read, in Krita's BGRA order, and the selection in it."""

    window: Rect  # image coordinates
    image: bytes  # BGRA8, rows of width * 4 bytes
    mask: bytes  # Y8, one byte a pixel: 0 keep, 255 edit


@dataclass(eq=False)
class KritaHost:
    """One Generate's picture, as flow.Host: the document, the layer the results go above, the
    selection and the pixels read when Generate was pressed (so that a queued Generate, Again
    and Vary edit what the artist saw then). The docker shows the edit: `on_status` at every
    change, `on_previews` once the run's previews changed (its runs panel)."""

    document: Any  # krita.Document
    node: Any  # krita.Node: the layer the results go above
    layer_only: bool  # its pixels alone, not the visible picture
    size: tuple[int, int]  # the canvas
    bounds: Rect | None  # the selection's, image coordinates
    on_status: Callable[[Status], None]
    on_previews: Callable[[], None]
    pixels: Pixels | None = None
    group: Any = None  # krita.Node: the result group, once added
    offsets: ClassVar[tuple[int, int]] = (0, 0)  # the source is the canvas
    pixel_format: ClassVar[str] = "BGRA8"

    @property
    def source(self) -> str:
        return wording.source_name(self.node.name() if self.layer_only else None)

    def selection_bounds(self) -> Rect | None:
        return self.bounds

    def read(self, window: Rect) -> tuple[bytes, bytes]:
        """The pixels read at the press; the document's own if the engine's limits since ask
        for another window."""
        if self.pixels is not None and self.pixels.window == window:
            return self.pixels.image, self.pixels.mask
        self.document.waitForDone()  # strokes still being applied would be half in the pixels
        area = (window.x, window.y, window.width, window.height)
        selection = self.document.selection()  # None: deselected since, a blank mask
        mask = bytes(selection.pixelData(*area)) if selection else bytes(area[2] * area[3])
        # the node's projection: the layer as it shows on its own (a group's children, a vector
        # layer's shapes, a paint layer through its own masks); the document's: what is seen
        read = self.node.projectionPixelData if self.layer_only else self.document.pixelData
        return bytes(read(*area)), mask

    def show(self, status: Status) -> None:
        self.on_status(status)

    def show_previews(self, window: Rect, previews: list) -> None:
        self.on_previews()  # the flow gave them to the run: its thumbnails in the docker

    def end_previews(self) -> None:
        pass  # thumbnails are no part of the document; they become the results'

    def add_layers(self, group: str, layers: list[ResultLayer]) -> None:
        add_results(self, group, layers)


def capture(
    request: Request,
    limits: Mapping[str, Any] | None,
    on_status: Callable[[Status], None],
    on_previews: Callable[[], None],
) -> KritaHost:
    """The active document's Generate: what the artist sees (the document's projection) or,
    with `request.layer_only`, the active layer on its own, around the selection, in the window
    the engine's `limits` (its hello's, as known now) allow; EditError says what to fix.

    With the visible picture any active layer will do, a group or a vector layer too: it only
    says where the results go (above it; above its layer for a mask)."""
    doc = app().activeDocument()
    if doc is None:
        raise EditError("Open an image first.")
    node = doc.activeNode()
    if node is not None and node.type() in MASKS:
        node = node.parentNode()
    if node is None:
        raise EditError("Select the layer to put the results above (no layer is active).")
    checks = [("The image", doc.colorModel(), doc.colorDepth())]
    if request.layer_only:
        checks.insert(0, (f'The layer "{node.name()}"', node.colorModel(), node.colorDepth()))
    for what, model, depth in checks:
        problem = unsupported_color(model, depth, what)
        if problem:
            raise EditError(problem)
    selection = doc.selection()
    bounds = None
    if selection is not None:
        bounds = Rect(selection.x(), selection.y(), selection.width(), selection.height())
    size = (doc.width(), doc.height())
    edit = KritaHost(doc, node, request.layer_only, size, bounds, on_status, on_previews)
    try:
        window = geometry.window_for(flow.selection(edit), size, request.settings, limits)
    except ValueError as e:
        raise EditError(str(e)) from None
    edit.pixels = Pixels(window, *edit.read(window))
    return edit


def add_results(host: KritaHost, group_name: str, layers: list[ResultLayer]) -> None:
    """A group of filled layers above the source layer, attached in one step (one undo)."""
    doc, source = host.document, host.node
    if doc not in app().documents():
        raise EditError("the image was closed while the engine worked")
    group = doc.createGroupLayer(group_name)
    nodes = []
    from engine.shared.client import rgba_to_bgra  # Krita's pixelData is B, G, R, A

    for spec in layers:
        node = doc.createNode(spec.name, "paintlayer")
        node.setPixelData(rgba_to_bgra(spec.rgba), spec.x, spec.y, spec.width, spec.height)
        node.setVisible(spec.visible)
        nodes.append(node)
    group.setChildNodes(nodes[::-1])  # bottom first: the best ends on top
    parent = source.parentNode()
    if parent is None:  # the source layer was deleted meanwhile: put the result on top
        doc.rootNode().addChildNode(group, None)
    else:
        parent.addChildNode(group, source)
    host.group = group
    doc.refreshProjection()


def reactivate(host: KritaHost) -> None:
    """Make the source layer active again, so a second Generate edits it again (Krita itself
    activates a newly added layer a moment after it is added: call this from a later event)."""
    doc, source = host.document, host.node
    if doc in app().documents() and source.parentNode() is not None:
        doc.setActiveNode(source)


# -- a run's variants, from the docker's history ---------------------------------------------


def _result_group(host: KritaHost):
    """The run's group if it is still in its open document, else EditError."""
    group = host.group
    if host.document not in app().documents() or group is None or group.parentNode() is None:
        raise EditError("That run is no longer in the image (its group was deleted).")
    return group


def show_only(host: KritaHost, layer: str) -> None:
    """Only the variant `layer` of the run visible (visibility is not an undo step)."""
    for child in _result_group(host).childNodes():
        child.setVisible(child.name() == layer)
    host.document.refreshProjection()


def keep(host: KritaHost, layer: str) -> None:
    """Only the variant `layer` remains, as one undo step: with the others hidden, Krita's
    Flatten Layer turns the group into one layer holding just that variant (one command; each
    libkis remove() would be one more)."""
    group, doc = _result_group(host), host.document
    parent, name = group.parentNode(), group.name()
    show_only(host, layer)
    doc.setActiveNode(group)
    app().action("flatten_layer").trigger()
    doc.waitForDone()
    for node in parent.childNodes():  # Krita names the flattened layer "<group> Merged"
        if node.type() == "paintlayer" and node.name().startswith(name):
            node.setName(layer)
    host.group = None
    doc.refreshProjection()


def discard(host: KritaHost) -> None:
    """The run's group removed, one undo step."""
    group = _result_group(host)
    group.remove()
    host.group = None
    host.document.refreshProjection()
