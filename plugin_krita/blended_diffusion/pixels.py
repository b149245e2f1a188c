"""Rectangles, masks and pixel layouts: the plug-in's pure logic about pixels (no Krita, no Qt).

Krita reports a selection's bounds as they are, which may reach past the canvas (a feathered
selection at an edge); pixel reads and writes take image coordinates, also for a layer that was
moved. So everything here is in image coordinates, clamped to the canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SIDE = 4096  # the engine's default `max_side`: a larger window is refused by the engine
CONTEXT = 1.0  # context sent around the selection, as a fraction of its size on each side
SUPPORTED = ("RGBA", "U8")  # Krita's colour model and depth ids for 8-bit RGB with alpha


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    width: int
    height: int

    @property
    def empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def intersect(self, other: Rect) -> Rect:
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1 = min(self.x + self.width, other.x + other.width)
        y1 = min(self.y + self.height, other.y + other.height)
        return Rect(x0, y0, max(0, x1 - x0), max(0, y1 - y0))

    def grow(self, dx: int, dy: int) -> Rect:
        return Rect(self.x - dx, self.y - dy, self.width + 2 * dx, self.height + 2 * dy)


def clamp_selection(bounds: Rect, canvas_width: int, canvas_height: int) -> Rect:
    """The part of a selection's bounds on the canvas (empty when it lies wholly outside)."""
    return bounds.intersect(Rect(0, 0, canvas_width, canvas_height))


def context_window(
    selection: Rect, canvas_width: int, canvas_height: int, max_side: int = MAX_SIDE
) -> Rect:
    """The part of the image sent with a selection: the selection plus CONTEXT of its size on
    every side (the engine picks its own context box inside), on the canvas, at most `max_side`
    a side while that still holds the selection."""
    side = max(selection.width, selection.height)
    margin = round(CONTEXT * side)
    window = selection.grow(margin, margin).intersect(Rect(0, 0, canvas_width, canvas_height))
    x, width = _fit(window.x, window.width, selection.x, selection.width, max_side)
    y, height = _fit(window.y, window.height, selection.y, selection.height, max_side)
    return Rect(x, y, width, height)


def _fit(
    start: int, length: int, sel_start: int, sel_length: int, max_side: int
) -> tuple[int, int]:
    """Shrink [start, start + length) to `max_side` around the selection's centre, inside it."""
    if length <= max_side or sel_length >= max_side:
        return start, length
    centre = sel_start + sel_length // 2
    lo = min(max(centre - max_side // 2, start), start + length - max_side)
    return lo, max_side


def mask_is_empty(mask: bytes) -> bool:
    """No pixel selected at all (bytes.count runs in C: fast on a large mask)."""
    return mask.count(0) == len(mask)


def unsupported_color(model: str, depth: str, what: str) -> str | None:
    """Why `what` cannot be edited, or None for 8-bit RGBA (the only layout the engine reads)."""
    if (model, depth) == SUPPORTED:
        return None
    return (
        f"{what} is {model}/{depth}: Blended Diffusion edits 8-bit RGB images only. Convert it "
        "with Image > Convert Image Color Space (RGB/Alpha, 8-bit integer/channel), or work on "
        "an 8-bit RGB copy."
    )
