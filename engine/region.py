"""From a picture of any size to the model's canvas and back.

A context box around the selection, shaped like it and always inside the picture, is scaled at one
scale to a canvas of about the model's pixel count (ADM is convolutional: any sides that are
multiples of its downsampling factor; engine/shared/geometry.py), the rounding padded with the
box's edge pixels, which the edit never changes. The model edits under a hard mask (every canvas
pixel the selection touches, as the official code's nearest-and-nonzero mask); the edit comes back
at the box's scale and is composited through the selection's own alpha, once. Every pixel the
selection leaves at 0 keeps its exact bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from PIL import Image

from engine.shared.geometry import Canvas, Rect, blur_kernel, box_around, shaping_reach

BACKGROUND = 127.5  # what transparent pixels show the model: mid-grey, the model's 0


class RegionError(ValueError):
    """Bad input from the user: the message says what is wrong."""


def check_inputs(image: np.ndarray, mask: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise RegionError(
            f"the image must be 8-bit RGB or RGBA, got {image.dtype} with shape {image.shape}"
        )
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise RegionError(f"the mask must be one 8-bit channel, got {mask.dtype} {mask.shape}")
    if mask.shape != image.shape[:2]:
        raise RegionError(
            f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{image.shape[1]}x{image.shape[0]}: they must be the same size"
        )
    if not mask.any():
        raise RegionError("the selection is empty: select the region to edit first")


def selection_bounds(mask: np.ndarray) -> Rect:
    """The tight bounding box of the mask's non-zero pixels."""
    ys, xs = np.nonzero(mask)
    return Rect(
        int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
    )


def context_box(
    mask: np.ndarray, padding: float = 0.25, grow: int = 0, feather: int = 0
) -> Rect:
    """The context box around the mask's selection as `grow` and `feather` will shape it
    (box_around the whole mask's `shaped_bounds`): the edit's box, and the memory budget's."""
    height, width = mask.shape
    return box_around(shaped_bounds(mask, grow, feather), width, height, padding)


def _hard(mask: np.ndarray) -> np.ndarray:
    """What grow and feather start from: the at-least-half-selected part (any part if none)."""
    return mask >= 128 if (mask >= 128).any() else mask > 0


def shaped_bounds(mask: np.ndarray, grow: int = 0, feather: int = 0) -> Rect:
    """Where `shape_selection(mask, grow, feather)` can select, without shaping it (a grow of
    1000 px takes seconds): the selection's bounds widened by the grow and the blur's half
    kernel, inside the picture. Exact for a grow alone; a feather's faint tail may stop a few
    pixels short of its kernel."""
    if not grow and not feather:
        return selection_bounds(mask)
    height, width = mask.shape
    reach = shaping_reach(grow, feather)
    return selection_bounds(_hard(mask)).grown(reach).intersect(Rect(0, 0, width, height))


def shape_selection(mask: np.ndarray, grow: int = 0, feather: int = 0) -> np.ndarray:
    """The selection grown by `grow` pixels, then feathered over about `feather` pixels on each
    side of its edge (a Gaussian of sigma feather / 2). Meant for hard selections: a soft one is
    taken as its at-least-half-selected part. Work stays in the selection's neighbourhood."""
    if not grow and not feather:
        return mask
    hard = _hard(mask)
    sigma, k = blur_kernel(feather)
    sel, (height, width) = selection_bounds(hard), mask.shape
    # all it can reach and one pixel more: the blur's replicated border there is unselected
    area = sel.grown(shaping_reach(grow, feather) + 1).intersect(Rect(0, 0, width, height))
    x0, y0, x1, y1 = area.x, area.y, area.x + area.width, area.y + area.height
    m = torch.from_numpy(hard[y0:y1, x0:x1]).float()[None, None]
    for i in range(grow):  # square and cross steps in turn: an octagon, close to a disc
        if i % 2:
            m = torch.maximum(
                F.max_pool2d(m, (3, 1), 1, (1, 0)), F.max_pool2d(m, (1, 3), 1, (0, 1))
            )
        else:
            m = F.max_pool2d(m, 3, 1, 1)
    if feather:  # replicate: a selection touching the picture's edge stays whole there
        m = gaussian_blur2d(m, (k, k), (sigma, sigma), border_type="replicate")
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = (m[0, 0] * 255).round().clamp(0, 255).byte().numpy()
    if not out.any():  # a selection a few pixels wide, feathered far wider, fades to nothing
        raise RegionError(
            f"feathered by {feather} px, a selection this small ({sel.width}x{sel.height} px) "
            "fades away "
            "entirely: lower feather, or grow it first"
        )
    return out


def _box(a: np.ndarray, box: Rect) -> np.ndarray:
    return a[box.y : box.y + box.height, box.x : box.x + box.width]


def _padded(a: np.ndarray, canvas: Canvas, mode: str) -> np.ndarray:
    """`a` (content-sized, HxW[xC]) on the canvas: its right and bottom padded."""
    pad = [(0, canvas.height - a.shape[0]), (0, canvas.width - a.shape[1])]
    return np.pad(a, pad + [(0, 0)] * (a.ndim - 2), mode=mode)


def to_model(
    image: np.ndarray, mask: np.ndarray, canvas: Canvas
) -> tuple[np.ndarray, np.ndarray]:
    """The canvas's context box as the model takes it: RGB float in [-1, 1] (HxWx3), the padding
    its edge pixels repeated, and the hard mask (HxW, 1 wherever a selected pixel falls in the
    canvas pixel, else 0; 0 in the padding).

    Transparent pixels show the model what lies under them, BACKGROUND: a neutral grey.
    """
    patch = _box(image, canvas.box)
    if patch.shape[2] == 4:
        a = patch[..., 3:].astype(np.float32) / 255.0
        rgb = patch[..., :3] * a + BACKGROUND * (1 - a)
        patch = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    rgb = Image.fromarray(np.ascontiguousarray(patch[..., :3]))  # the only copy at image scale
    rgb = np.asarray(rgb.resize(canvas.content, Image.Resampling.LANCZOS), np.float32)
    touched = torch.from_numpy(_box(mask, canvas.box) > 0)
    hard = F.adaptive_max_pool2d(touched.float()[None, None], canvas.content[::-1])[0, 0]
    rgb = _padded(rgb, canvas, "edge")
    return rgb / 127.5 - 1.0, _padded(hard.numpy(), canvas, "constant")


def seen_on_canvas(mask: np.ndarray, canvas: Canvas) -> np.ndarray:
    """The selection's alpha on the canvas (HxW in [0, 1], area-averaged): how much of each
    canvas pixel the artist will see. CLIP judges the edit through it, so a feathered edge,
    editable in full under the hard mask, counts as faintly as it will show."""
    alpha = torch.from_numpy(_box(mask, canvas.box)).float() / 255
    seen = F.adaptive_avg_pool2d(alpha[None, None], canvas.content[::-1])[0, 0].numpy()
    return _padded(seen, canvas, "constant")


def from_model(
    result: np.ndarray, canvas: Canvas, sel: Rect, size: tuple[int, int] | None = None
) -> np.ndarray:
    """An edited canvas (HxWx3 in [-1, 1]) back at image scale, cut to `sel` (uint8); at
    `size` (width, height) instead of the image's scale when given (previews)."""
    rgb = np.clip((result + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    # only the selection's part of the canvas is resampled: memory bounded by the selection
    (sx, sy), box = canvas.scale, canvas.box
    x, y = (sel.x - box.x) * sx, (sel.y - box.y) * sy
    source = (x, y, x + sel.width * sx, y + sel.height * sy)
    size = size or (sel.width, sel.height)
    resized = Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS, box=source)
    return np.asarray(resized)


def selected_within(mask: np.ndarray, reach: int) -> Callable[[Rect], bool]:
    """Whether a picture rectangle holds a selected pixel, or one within `reach` of it (grow and
    feather still to come): a summed-area table answers each rectangle at once."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    table[1:, 1:] = (mask > 0).cumsum(0).cumsum(1)
    height, width = mask.shape

    def touches(r: Rect) -> bool:
        r = r.grown(reach).intersect(Rect(0, 0, width, height))
        if r.empty:
            return False
        x0, y0, x1, y1 = r.x, r.y, r.x + r.width, r.y + r.height
        return bool(table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0])

    return touches


def layer_pixels(edited: np.ndarray, mask: np.ndarray, sel: Rect) -> np.ndarray:
    """RGBA for a new layer over `sel`: the edit, with the selection's own alpha (applied once)."""
    alpha = _box(mask, sel)
    rgba = np.concatenate([edited, alpha[..., None]], axis=2)
    rgba[alpha == 0, :3] = 0
    return rgba


def composite(image: np.ndarray, rgba: np.ndarray, at: Rect) -> np.ndarray:
    """`image` with the RGBA layer pasted at `at` through its alpha; alpha 0 keeps exact bytes."""
    out = image.copy()
    region = _box(out, at)
    a = rgba[..., 3:4].astype(np.uint16)
    mixed = (region[..., :3].astype(np.uint16) * (255 - a) + rgba[..., :3] * a + 127) // 255
    region[..., :3] = mixed.astype(np.uint8)
    return out
