"""Every geometric figure of an edit, once: the part of the picture the plug-ins send, the
context box around the selection, the model canvas at one scale, the refinement canvas and its
tiles, and where the results come back. Pure Python (no numpy): the plug-ins ship it.

The model canvas holds the box at ONE scale across and down: its sides are the box's scaled
and rounded up to the model's multiple, the few extra pixels padding on the right and bottom,
never a stretch of one side (an object keeps its aspect). The refinement canvas is the same at
the box's own resolution (up to a cap); the pass runs only the tiles that touch the selection.

Coordinates: the host's image (both hosts' selections live there) and the source's (the pixels
the plug-in reads: Krita reads the canvas, so its source is the image; GIMP reads a layer, whose
top-left pixel sits at its offsets in the image). The window sent is the selection plus the
engine's whole context box around it (engine/region.py), so cropping changes no result, only
the bytes sent; and it is at most the engine's `max_side` a side, else the engine refuses it.
With `grow` or `feather` the engine widens the selection first: the window holds the widened one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.shared.request import BY_NAME

PADDING: float = BY_NAME["padding"].default
MAX_SIDE = 4096  # the engine's default limit; its `hello` says its own
MIN_CONTEXT = 48  # image pixels per side: a tiny selection still gets surroundings
MAX_ASPECT = 4  # a longer box gets more context across it: the model learned on squares
MIN_GAIN = 1.5  # refine when the refinement canvas's side is at least this x the base canvas's


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

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)

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


def blur_kernel(feather: int) -> tuple[float, int]:
    """The feather's Gaussian: its sigma and kernel side."""
    sigma = feather / 2
    return sigma, 2 * math.ceil(3 * sigma) + 1


def shaping_reach(grow: int, feather: int) -> int:
    """How far past the hard selection `grow` and `feather` may select: the grow and the blur
    kernel's half (engine/region.py shape_selection)."""
    return grow + blur_kernel(feather)[1] // 2 if grow or feather else 0


def reach(settings: Mapping[str, Any]) -> int:
    """How far past the selection's bounds a request's grow and feather may select, and one
    pixel more (the blur's border there is unselected)."""
    grow, feather = int(settings.get("grow", 0)), int(settings.get("feather", 0))
    return shaping_reach(grow, feather) + 1 if grow or feather else 0


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


# -- the engine's side: context box, model canvas, refinement -----------------------------------


def box_around(sel: Rect, width: int, height: int, padding: float = PADDING) -> Rect:
    """The context box for selection bounds `sel` in a `width` x `height` picture.

    The selection plus `padding` x its width (height) on the left and right (top and bottom), at
    least MIN_CONTEXT a side, clamped to the picture, then widened across to at most MAX_ASPECT:1
    where the picture allows; centred on the selection and shifted to lie inside the picture.
    Depends only on `sel` and the picture's size, and computed again inside its own box it gives
    that box: a client may send just the box.
    """
    w = min(max(sel.width + 2 * round(padding * sel.width), MIN_CONTEXT), width)
    h = min(max(sel.height + 2 * round(padding * sel.height), MIN_CONTEXT), height)
    if w > MAX_ASPECT * h:
        h = min(math.ceil(w / MAX_ASPECT), height)
    elif h > MAX_ASPECT * w:
        w = min(math.ceil(h / MAX_ASPECT), width)

    def place(start: int, length: int, side: int, limit: int) -> int:
        return min(max(start + length // 2 - side // 2, 0), limit - side)

    return Rect(place(sel.x, sel.width, w, width), place(sel.y, sel.height, h, height), w, h)


@dataclass(frozen=True)
class Canvas:
    """A context box on a model canvas: the box scaled by one factor fills `content` (width,
    height) at the canvas's top-left; the rest, up to sides that are multiples of the model's
    downsampling, is padding the edit never changes."""

    box: Rect  # in the picture
    width: int
    height: int
    content: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def scale(self) -> tuple[float, float]:
        """Model pixels per picture pixel, across and down (equal but for rounding)."""
        return self.content[0] / self.box.width, self.content[1] / self.box.height

    def in_picture(self, r: Rect) -> Rect:
        """A canvas rectangle in the picture's coordinates (covering every pixel it touches)."""
        sx, sy = self.scale
        x0, y0 = math.floor(r.x / sx), math.floor(r.y / sy)
        x1, y1 = math.ceil((r.x + r.width) / sx), math.ceil((r.y + r.height) / sy)
        inside = Rect(x0, y0, x1 - x0, y1 - y0).intersect(Rect(0, 0, self.box.width,
                                                                self.box.height))  # fmt: skip
        return inside.moved(self.box.x, self.box.y)

    def to_json(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "content": list(self.content)}


def canvas_for(box: Rect, side: float, factor: int) -> Canvas:
    """The canvas for `box` of about `side` x `side` pixels (the model's native side for the
    edit), its sides multiples of the UNet's downsampling `factor`. A box too thin for one factor
    across (a picture a few pixels wide) is scaled down rather than costing more memory: never
    much more than side x side pixels."""
    scale = side / math.sqrt(box.width * box.height)
    cap = side * side * 5 / 4
    while True:
        content = max(1, round(box.width * scale)), max(1, round(box.height * scale))
        width, height = (math.ceil(c / factor) * factor for c in content)
        if width * height <= cap or content == (1, 1):
            return Canvas(box, width, height, content)
        scale *= 0.97


def starts(length: int, tile: int, overlap: float) -> list[int]:
    """Where tiles of `tile` pixels start to cover `length`, evenly spread, neighbours sharing at
    least `overlap` x tile pixels."""
    if length <= tile:
        return [0]
    stride = max(1, tile - math.ceil(overlap * tile))
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_grid(canvas: Canvas, tile: int, overlap: float) -> list[Rect]:
    """Every tile of at most `tile` x `tile` over the canvas, row by row."""
    tw, th = min(tile, canvas.width), min(tile, canvas.height)
    return [
        Rect(x, y, tw, th)
        for y in starts(canvas.height, th, overlap)
        for x in starts(canvas.width, tw, overlap)
    ]


@dataclass(frozen=True)
class Refinement:
    """The refinement pass's plan: its canvas and the tiles it runs (those touching the
    selection) of all that cover it."""

    canvas: Canvas
    tiles: tuple[Rect, ...]
    tiles_total: int

    def work(self, steps: int) -> int:
        """UNet pixels the pass runs: tiles x steps x tile area."""
        return steps * sum(t.area for t in self.tiles)

    def to_json(self) -> dict[str, Any]:
        return {"canvas": [self.canvas.width, self.canvas.height],
                "tiles_run": len(self.tiles), "tiles_total": self.tiles_total}  # fmt: skip


def refinement(
    base: Canvas,
    native: int,
    factor: int,
    *,
    cap: float | None,
    overlap: float,
    steps: int,
    base_steps: int,
    touches: Callable[[Rect], bool],
) -> Refinement | None:
    """The refinement pass over the base canvas's box at its own resolution, its side at most
    `cap` model sides (0: no cap; None: the largest whose work, over `steps`, is within the base
    edit's over `base_steps`), tiles of the model's `native` side; only tiles whose picture
    rectangle `touches` the selection run. None when the canvas would not be MIN_GAIN x the base
    canvas's side (the base edit is then already about as sharp) or no pass fits."""
    box, full = base.box, math.sqrt(base.box.width * base.box.height)
    if cap:
        full = min(full, cap * native)
    budget = base_steps * base.width * base.height

    def at(side: float) -> Refinement | None:
        canvas = canvas_for(box, side, factor)
        if canvas.width * canvas.height < MIN_GAIN**2 * base.width * base.height:
            return None
        grid = tile_grid(canvas, native, overlap)
        run = tuple(t for t in grid if touches(canvas.in_picture(t)))
        return Refinement(canvas, run, len(grid))

    def fits(plan: Refinement | None) -> bool:
        return plan is not None and plan.work(steps) <= budget

    top = at(full)
    if top is None or cap is not None or fits(top):
        return top
    # the largest side that fits, by bisection (the work grows with the side but for rounding
    # to tiles: what it finds fits, within a model multiple of the largest that does)
    low = MIN_GAIN * math.sqrt(base.width * base.height)
    best = at(low)
    if not fits(best):
        return None
    high = full
    while high - low > factor:
        mid = (low + high) / 2
        plan = at(mid)
        if fits(plan):
            best, low = plan, mid
        else:
            high = mid
    return best
