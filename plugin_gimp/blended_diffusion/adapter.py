"""The only code that calls Gimp and Gegl for pixels and layers: `GimpHost`, GIMP's side of the
edit flow (engine/shared/flow.py Host), and the keep-visible-variant procedure's work.

Everything runs on the plug-in's main thread: libgimp is not thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp  # noqa: E402

from engine.shared import wording  # noqa: E402
from engine.shared.flow import EditError, Status, closest_preview  # noqa: E402
from engine.shared.geometry import Rect  # noqa: E402
from engine.shared.wording import GROUP_PREFIX, ResultLayer  # noqa: E402

if TYPE_CHECKING:
    from progress import ProgressWindow

PIXELS = "R'G'B'A u8"  # what the engine takes (RGBA8); babl converts from any precision
MASK = "Y u8"  # the selection's coverage: 0 keep, 255 edit, linear like the channel itself
MODES = {Gimp.ImageBaseType.GRAY: "grayscale", Gimp.ImageBaseType.INDEXED: "indexed"}
PREVIEW = "Blended Diffusion preview (temporary)"


class GimpHost:
    """One image and its active layer, as flow.Host: the source read is the visible picture
    (the image's composite, its origin the image's) or, with `layer_only`, the layer itself.
    The edit shows in `window` (the plug-in's progress window) when there is one, else on
    GIMP's status bar; its previews in a temporary layer over the selection."""

    pixel_format = "RGBA8"

    def __init__(
        self, image: Gimp.Image, drawables: Sequence[Gimp.Drawable], layer_only: bool = False
    ) -> None:
        if len(drawables) != 1:
            raise EditError(
                f"Select exactly one layer to edit ({len(drawables)} are selected)."
                if drawables
                else "Select the layer to edit."
            )
        drawable = drawables[0]
        if not isinstance(drawable, Gimp.Layer):  # a channel or a layer mask
            raise EditError(
                f"'{drawable.get_name()}' is a channel or a mask: select a layer to edit."
            )
        mode = image.get_base_type()
        if mode != Gimp.ImageBaseType.RGB:
            # results in a gray or indexed image would silently lose their colours
            raise EditError(
                f"This image is {MODES.get(mode, 'not RGB')}: Blended Diffusion edits RGB images. "
                "Convert it with Image > Mode > RGB, then run it again."
            )
        self.image, self.drawable, self.layer_only = image, drawable, layer_only
        self.source = wording.source_name(drawable.get_name() if layer_only else None)
        if layer_only:  # a group layer's buffer is its composite: what it shows on its own
            _, x, y = drawable.get_offsets()
            self.offsets = (x, y)
            self.size = (drawable.get_width(), drawable.get_height())
        else:  # any layer will do, a group or a text layer too: the results go above it
            self.offsets = (0, 0)
            self.size = (image.get_width(), image.get_height())
        self.window: ProgressWindow | None = None  # a run with a UI: its progress and Cancel
        self._preview: Gimp.Layer | None = None
        self._was_clean = False  # the image before the first preview
        remove_leftover_previews(image)

    def selection_bounds(self) -> Rect | None:
        _, selected, x1, y1, x2, y2 = Gimp.Selection.bounds(self.image)
        return Rect(x1, y1, x2 - x1, y2 - y1) if selected else None

    def read(self, window: Rect) -> tuple[bytes, bytes]:
        w, h = window.width, window.height
        rect = Gegl.Rectangle.new(window.x, window.y, w, h)
        if self.layer_only:
            rgba = self.drawable.get_buffer().get(rect, 1.0, PIXELS, Gegl.AbyssPolicy.NONE)
        else:
            rgba = visible_pixels(self.image, rect)
        x, y = self.offsets  # the selection lives in image coordinates
        sel_rect = Gegl.Rectangle.new(window.x + x, window.y + y, w, h)
        # outside the canvas the abyss reads as 0: not selected
        selection = self.image.get_selection().get_buffer()
        mask = selection.get(sel_rect, 1.0, MASK, Gegl.AbyssPolicy.NONE)
        return bytes(rgba), bytes(mask)

    def show(self, status: Status) -> None:
        text = GROUP_PREFIX + status.message  # the status bar: which plug-in says it
        if self.window is not None:
            self.window.show(status.fraction, text)
        else:
            Gimp.progress_set_text(text)
            Gimp.progress_update(status.fraction)

    def show_previews(self, window: Rect, previews: list) -> None:
        """The closest variant so far, stretched over its box (source coordinates), in one
        layer above the source, changed with the image's undo frozen: none of it enters the
        undo history. Frozen only while it changes, so a plug-in killed meanwhile leaves the
        undo working."""
        box, width, height, rgba = closest_preview(window, previews)
        image = self.image
        image.undo_freeze()
        try:
            layer = self._preview
            if layer is None:
                self._was_clean = not image.is_dirty()
                layer = Gimp.Layer.new(image, PREVIEW, width, height, Gimp.ImageType.RGBA_IMAGE,
                                       100.0, Gimp.LayerMode.NORMAL)  # fmt: skip
                position = image.get_item_position(self.drawable)
                image.insert_layer(layer, self.drawable.get_parent(), position)
                self._preview = layer
                image.set_selected_layers([self.drawable])  # the source stays the active layer
            else:
                layer.scale(width, height, False)  # back to the picture's own size
            buffer = layer.get_buffer()
            buffer.set(Gegl.Rectangle.new(0, 0, width, height), PIXELS, rgba)
            buffer.flush()
            layer.scale(box.width, box.height, False)
            layer.set_offsets(box.x + self.offsets[0], box.y + self.offsets[1])
            layer.update(0, 0, box.width, box.height)
        finally:
            image.undo_thaw()
        Gimp.displays_flush()

    def end_previews(self) -> None:
        if self._preview is None:
            return
        self.image.undo_freeze()
        try:
            self.image.remove_layer(self._preview)
        finally:
            self.image.undo_thaw()
        if self._was_clean:  # changes under a frozen undo dirty the image: it was not changed
            self.image.clean_all()
        self._preview = None
        Gimp.displays_flush()

    def add_layers(self, group_name: str, layers: Sequence[ResultLayer]) -> None:
        """The results in a layer group just above the source layer, best on top, as one undo
        step."""
        self.image.undo_group_start()
        try:
            group = Gimp.GroupLayer.new(self.image, group_name)
            self.image.insert_layer(group, self.drawable.get_parent(),
                                    self.image.get_item_position(self.drawable))  # fmt: skip
            parent, position = group, 0
            # each insert at the top pushes the earlier ones down: worst first leaves the best
            # on top, and active as the last one inserted
            for result in reversed(layers):
                layer = Gimp.Layer.new(
                    self.image,
                    result.name,
                    result.width,
                    result.height,
                    Gimp.ImageType.RGBA_IMAGE,
                    100.0,
                    Gimp.LayerMode.NORMAL,
                )
                self.image.insert_layer(layer, parent, position)
                layer.set_offsets(result.x, result.y)
                buffer = layer.get_buffer()
                buffer.set(Gegl.Rectangle.new(0, 0, result.width, result.height), PIXELS,
                           result.rgba)  # fmt: skip
                buffer.flush()
                layer.update(0, 0, result.width, result.height)
                layer.set_visible(result.visible)
        finally:
            self.image.undo_group_end()
        Gimp.displays_flush()


def visible_pixels(image: Gimp.Image, rect: Gegl.Rectangle) -> bytes:
    """The image's visible composite in `rect`, made in a scratch image with no undo history
    and no display: the artist's image and its undo steps are not touched."""
    scratch = Gimp.Image.new(image.get_width(), image.get_height(), Gimp.ImageBaseType.RGB)
    try:
        scratch.undo_disable()
        layer = Gimp.Layer.new_from_visible(image, scratch, "visible")
        scratch.insert_layer(layer, None, 0)
        return layer.get_buffer().get(rect, 1.0, PIXELS, Gegl.AbyssPolicy.NONE)
    finally:
        scratch.delete()


def remove_leftover_previews(image: Gimp.Image) -> None:
    """A preview layer a killed run left (GIMP's Cancel on its status bar, in a run without a
    window of its own, kills the plug-in before it can remove it; so does GIMP quitting):
    removed, outside the undo history, when the next run starts."""
    leftovers = [la for la in image.get_layers() if la.get_name() == PREVIEW]
    if not leftovers:
        return
    image.undo_freeze()
    try:
        for layer in leftovers:
            image.remove_layer(layer)
    finally:
        image.undo_thaw()


def keep_visible_variant(image: Gimp.Image, drawables: Sequence[Gimp.Drawable]) -> str:
    """Of the run the active layer belongs to (its result group), only the visible variant
    stays, in one undo group; returns its name."""
    layer = drawables[0] if len(drawables) == 1 else None
    group = layer if isinstance(layer, Gimp.GroupLayer) else layer and layer.get_parent()
    if group is None or not group.get_name().startswith(GROUP_PREFIX):
        raise EditError("Select a layer of a Blended Diffusion run (or its group) first.")
    children = group.get_children()
    visible = [c for c in children if c.get_visible()]
    if len(visible) != 1:
        raise EditError(
            f"{len(visible)} variants of this run are visible: show only the one to keep."
        )
    image.undo_group_start()
    try:
        for child in children:
            if child != visible[0]:
                image.remove_layer(child)
    finally:
        image.undo_group_end()
    Gimp.displays_flush()
    return visible[0].get_name()
