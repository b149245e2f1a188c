"""Which part of the picture goes to the engine, and where the results come back.

Coordinates: the host's image (both hosts' selections live there) and the source's (the pixels
the plug-in reads: Krita reads the canvas, so its source is the image; GIMP reads a layer, whose
top-left pixel sits at its offsets in the image). The window sent is the selection plus the
engine's whole context box around it (engine/region.py), so cropping changes no result, only
the bytes sent; and it is at most the engine's `max_side` a side, else the engine refuses it.
With `grow` or `feather` the engine widens the selection first: the window holds the widened one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.shared.settings import PADDING

MAX_SIDE = 4096  # the engine's default limit; its `hello` says its own
MIN_CONTEXT = 48  # engine/region.py's least context box side (tests check they agree)


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    width: int
    height: int

    @property
    def empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def grown(self, n: int) -> Rect:
        return Rect(self.x - n, self.y - n, self.width + 2 * n, self.height + 2 * n)

    def moved(self, dx: int, dy: int) -> Rect:
        return Rect(self.x + dx, self.y + dy, self.width, self.height)

    def intersect(self, other: Rect) -> Rect:
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1 = min(self.x + self.width, other.x + other.width)
        y1 = min(self.y + self.height, other.y + other.height)
        return Rect(x0, y0, max(0, x1 - x0), max(0, y1 - y0))


def selection_in_source(
    bounds: Rect | None, origin: tuple[int, int], size: tuple[int, int]
) -> Rect | None:
    """The selection's bounds (image coordinates; None: nothing selected), clipped to the source
    at `origin` of `size`, in the source's coordinates; None when they do not overlap. Krita
    reports bounds past the canvas for a feathered selection at its edge."""
    if bounds is None:
        return None
    clipped = bounds.moved(-origin[0], -origin[1]).intersect(Rect(0, 0, *size))
    return None if clipped.empty else clipped


def reach(settings: Mapping[str, Any]) -> int:
    """How far past the selection's bounds the engine's `grow` and `feather` may select
    (engine/region.py shape_selection: the grow, the blur kernel's half and one pixel)."""
    grow, feather = int(settings.get("grow", 0)), int(settings.get("feather", 0))
    if not grow and not feather:
        return 0
    return grow + math.ceil(3 * feather / 2) + 1


def context_window(
    selection: Rect,
    size: tuple[int, int],
    padding: float = PADDING,
    max_side: int = MAX_SIDE,
    widen: int = 0,
) -> Rect:
    """The part of the source to send: the selection widened by `widen` (`reach`), plus, on
    every side, the side of the engine's context box for it, on the source, shrunk to `max_side`
    around the selection's centre where larger. ValueError when the selection itself is larger
    than `max_side`."""
    if widen:
        selection = selection.grown(widen).intersect(Rect(0, 0, *size))
    if max(selection.width, selection.height) > max_side:
        raise ValueError(
            f"The selection is {selection.width}x{selection.height} pixels"
            + (" grown and feathered" if widen else "")
            + f"; the engine takes at most {max_side} a side. Select a smaller region (or start "
            "the engine with a larger --max-side)."
        )
    side = max(selection.width, selection.height)
    # the engine's box is at most this long a side, and holds the selection
    margin = max(side + 2 * round(padding * side), MIN_CONTEXT)
    window = selection.grown(margin).intersect(Rect(0, 0, *size))
    x, width = _fit(window.x, window.width, selection.x, selection.width, max_side)
    y, height = _fit(window.y, window.height, selection.y, selection.height, max_side)
    return Rect(x, y, width, height)


def window_for(
    selection: Rect, size: tuple[int, int], settings: Mapping[str, Any],
    limits: Mapping[str, Any] | None = None,
) -> Rect:  # fmt: skip
    """The window both plug-ins send for a request's `settings`: `context_window` with the
    engine's `max_side` (its hello's `limits`; the default before it answered) and widened by
    the `reach` of its grow and feather."""
    max_side = int((limits or {}).get("max_side", MAX_SIDE))
    padding = settings.get("padding", PADDING)
    return context_window(selection, size, padding, max_side, reach(settings))


def _fit(start: int, length: int, sel_start: int, sel_length: int, max_side: int):
    """[start, start + length) shrunk to `max_side` around the selection's centre, holding it."""
    if length <= max_side:
        return start, length
    centre = sel_start + sel_length // 2
    lo = min(max(centre - max_side // 2, start, sel_start + sel_length - max_side), sel_start)
    return min(lo, start + length - max_side), max_side


def is_blank(mask: bytes) -> bool:
    """No pixel of a Y8 mask selected (bytes.strip runs in C: fast on a large mask)."""
    return not mask.strip(b"\0")


def place(origin: tuple[int, int], window: Rect, x: int, y: int) -> tuple[int, int]:
    """Where a result goes in the image: the engine's x, y are in the window, the window in the
    source, the source at `origin` in the image."""
    return origin[0] + window.x + x, origin[1] + window.y + y
