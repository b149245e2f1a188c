"""Rectangles between GIMP's image coordinates, the drawable's, and what is sent to the engine.

No gi import. Coordinates: the image's (GIMP's selection lives there), the drawable's (its
top-left pixel is 0, 0; the drawable sits at its offsets in the image) and the crop's (the
rectangle of the drawable sent to the engine; result variants come back in it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    @property
    def empty(self) -> bool:
        return self.w <= 0 or self.h <= 0

    def moved(self, dx: int, dy: int) -> Box:
        return Box(self.x + dx, self.y + dy, self.w, self.h)

    def intersect(self, other: Box) -> Box:
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1 = min(self.x + self.w, other.x + other.w)
        y1 = min(self.y + self.h, other.y + other.h)
        return Box(x0, y0, max(0, x1 - x0), max(0, y1 - y0))


def selection_in_drawable(bounds: Box | None, offsets: tuple[int, int], size: tuple[int, int]):
    """The selection's bounds (image coordinates, None: nothing selected) clipped to the
    drawable, in the drawable's coordinates; None when they do not overlap."""
    if bounds is None:
        return None
    clipped = bounds.moved(-offsets[0], -offsets[1]).intersect(Box(0, 0, *size))
    return None if clipped.empty else clipped


def context_crop(selection: Box, size: tuple[int, int], padding: float) -> Box:
    """The part of the drawable to send: the selection plus, on every side, the side of the
    engine's square context box (engine/region.py: max(w, h) padded by `padding` on each side),
    clipped to the drawable. Within it the engine places its context box exactly as it would in
    the whole drawable, so cropping changes no result, only the bytes sent."""
    side = max(selection.w, selection.h)
    margin = side + 2 * round(padding * side)
    grown = Box(selection.x - margin, selection.y - margin, selection.w + 2 * margin,
                selection.h + 2 * margin)  # fmt: skip
    return grown.intersect(Box(0, 0, *size))


def is_blank(mask: bytes) -> bool:
    """True when no pixel of a Y8 mask is selected (all zero)."""
    return not mask.strip(b"\0")


def layer_offsets(
    drawable_offsets: tuple[int, int], crop: Box, variant_xy: tuple[int, int]
) -> tuple[int, int]:
    """Where a result layer goes in the image: the variant's x, y are in the crop's
    coordinates, the crop in the drawable's, the drawable at its offsets in the image."""
    return (
        drawable_offsets[0] + crop.x + variant_xy[0],
        drawable_offsets[1] + crop.y + variant_xy[1],
    )
