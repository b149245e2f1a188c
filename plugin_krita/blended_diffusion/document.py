"""The Krita adapter: the only module that imports `krita`.

It reads the visible picture (or the active layer alone) and the selection, adds the result
layers, and hands the other modules what they need from Krita (base classes, settings, the active
window) so that they stay testable without it. Facts about Krita 5.2 this relies on (checked in
real Krita, see tests/test_krita_real.py): `Document.pixelData` is the projection (what the artist
sees), `Node.projectionPixelData` a node as it shows on its own; both, and `pixelData`/
`setPixelData`, take image coordinates, also for a moved layer; RGBA/U8 bytes are B, G, R, A;
`selection()` is None without a selection and 0x0 when empty, its bounds may reach past the
canvas; each `addChildNode` is one undo step while `setChildNodes` on a group not yet in the image
adds none, so a filled group attached once is one undo step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import krita

from engine.shared import geometry
from engine.shared.geometry import Rect
from engine.shared.settings import Request
from engine.shared.wording import ResultLayer

from .job import Pixels

DockWidget = krita.DockWidget
Extension = krita.Extension
SETTINGS_GROUP = "blended_diffusion"
SUPPORTED = ("RGBA", "U8")  # Krita's colour model and depth ids for 8-bit RGB with alpha
MASKS = ("transparencymask", "filtermask", "transformmask", "selectionmask", "colorizemask")


class UserError(Exception):
    """Something the user can fix (no selection, wrong layer type): shown in the docker."""


def host():
    return krita.Krita.instance()


def active_document():
    return host().activeDocument()


def read_setting(key: str, default: str) -> str:
    return host().readSetting(SETTINGS_GROUP, key, default)


def write_setting(key: str, value: object) -> None:
    host().writeSetting(SETTINGS_GROUP, key, str(value))


def register(extension_class: type, docker_id: str, title: str, docker_class: type) -> None:
    app = host()
    app.addExtension(extension_class(app))
    position = krita.DockWidgetFactoryBase.DockRight
    app.addDockWidgetFactory(krita.DockWidgetFactory(docker_id, position, docker_class))


def active_window_docker(docker_id: str):
    """The plug-in's docker in the active window (None before a window exists)."""
    window = host().activeWindow()
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


@dataclass
class Export:
    """The pixels of one Generate and where they came from, to put the result back."""

    document: object  # krita.Document
    source: object  # krita.Node: the layer the results go above
    pixels: Pixels
    group: object = None  # krita.Node: the result group, once added


def export_active(request: Request, limits: Mapping[str, Any] | None = None) -> Export:
    """What the artist sees (the document's projection) or, with `request.layer_only`, the
    active layer on its own, and the document's selection, around the selection, in a window of
    at most the engine's `max_side` (its hello's `limits`) a side.

    With the visible picture any active layer will do, a group or a vector layer too: it only
    says where the results go (above it; above its layer for a mask)."""
    doc = host().activeDocument()
    if doc is None:
        raise UserError("Open an image first.")
    node = doc.activeNode()
    if node is not None and node.type() in MASKS:
        node = node.parentNode()
    if node is None:
        raise UserError("Select the layer to put the results above (no layer is active).")
    checks = [("The image", doc.colorModel(), doc.colorDepth())]
    if request.layer_only:
        checks.insert(0, (f'The layer "{node.name()}"', node.colorModel(), node.colorDepth()))
    for what, model, depth in checks:
        problem = unsupported_color(model, depth, what)
        if problem:
            raise UserError(problem)
    selection = doc.selection()
    if selection is None:
        raise UserError("Select the region to edit first (no selection).")
    bounds = Rect(selection.x(), selection.y(), selection.width(), selection.height())
    canvas = (doc.width(), doc.height())
    bounds = geometry.selection_in_source(bounds, (0, 0), canvas)
    if bounds is None:
        raise UserError("The selection is empty or outside the canvas: select a region to edit.")
    try:
        window = geometry.window_for(bounds, canvas, request.settings, limits)
    except ValueError as e:
        raise UserError(str(e)) from None
    doc.waitForDone()  # strokes still being applied would be half in the pixels read
    area = (window.x, window.y, window.width, window.height)
    mask = bytes(selection.pixelData(*area))
    if geometry.is_blank(mask):
        raise UserError("The selection is empty: select a region to edit.")
    # the node's projection: the layer as it shows on its own (a group's children, a vector
    # layer's shapes, a paint layer through its own masks)
    read = node.projectionPixelData if request.layer_only else doc.pixelData
    return Export(doc, node, Pixels(window, bytes(read(*area)), mask))


def add_results(export: Export, group_name: str, layers: list[ResultLayer]) -> str:
    """A group of filled layers above the source layer, attached in one step (one undo)."""
    app, doc, source = host(), export.document, export.source
    if doc not in app.documents():
        raise UserError("the image was closed while the engine worked")
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
    export.group = group
    doc.refreshProjection()
    return f"{len(nodes)} variant(s) added in the group {group_name}; the best one is visible."


def reactivate(export: Export) -> None:
    """Make the source layer active again, so a second Generate edits it again (Krita itself
    activates a newly added layer a moment after it is added: call this from a later event)."""
    doc, source = export.document, export.source
    if doc in host().documents() and source.parentNode() is not None:
        doc.setActiveNode(source)


# -- a run's variants, from the docker's history ---------------------------------------------


def _result_group(export: Export):
    """The run's group if it is still in its open document, else UserError."""
    group = export.group
    if export.document not in host().documents() or group is None or group.parentNode() is None:
        raise UserError("That run is no longer in the image (its group was deleted).")
    return group


def show_only(export: Export, layer: str) -> None:
    """Only the variant `layer` of the run visible (visibility is not an undo step)."""
    for child in _result_group(export).childNodes():
        child.setVisible(child.name() == layer)
    export.document.refreshProjection()


def keep(export: Export, layer: str) -> None:
    """Only the variant `layer` remains, as one undo step: with the others hidden, Krita's
    Flatten Layer turns the group into one layer holding just that variant (one command; each
    libkis remove() would be one more)."""
    group, doc = _result_group(export), export.document
    parent, name = group.parentNode(), group.name()
    show_only(export, layer)
    doc.setActiveNode(group)
    host().action("flatten_layer").trigger()
    doc.waitForDone()
    for node in parent.childNodes():  # Krita names the flattened layer "<group> Merged"
        if node.type() == "paintlayer" and node.name().startswith(name):
            node.setName(layer)
    export.group = None
    doc.refreshProjection()


def discard(export: Export) -> None:
    """The run's group removed, one undo step."""
    group = _result_group(export)
    group.remove()
    export.group = None
    export.document.refreshProjection()
