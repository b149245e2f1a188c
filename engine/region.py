"""From a picture of any size to the model's canvas and back.

A context box around the selection, shaped like it and always inside the picture, is scaled to a
canvas of about the model's pixel count (ADM is convolutional: any sides that are multiples of its
downsampling factor). The model edits under a hard mask (every canvas pixel the selection touches,
as the official code's nearest-and-nonzero mask); the edit comes back at the box's scale and is
composited through the selection's own alpha, once. Every pixel the selection leaves at 0 keeps its
exact bytes.

`box_around` is pure Python over rectangles (no numpy) so the plug-ins can compute the same box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from PIL import Image

MIN_CONTEXT = 48  # image pixels per side: a tiny selection still gets surroundings
MAX_ASPECT = 4  # a longer box gets more context across it: the model learned on squares
BACKGROUND = 127.5  # what transparent pixels show the model: mid-grey, the model's 0


class RegionError(ValueError):
    """Bad input from the user: the message says what is wrong."""


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int


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


def selection_bounds(mask: np.ndarray) -> Box:
    """The tight bounding box of the mask's non-zero pixels."""
    ys, xs = np.nonzero(mask)
    return Box(
        int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
    )


def box_around(sel: Box, width: int, height: int, padding: float = 0.25) -> Box:
    """The context box for selection bounds `sel` in a `width` x `height` picture.

    The selection plus `padding` x its width (height) on the left and right (top and bottom), at
    least MIN_CONTEXT a side, clamped to the picture, then widened across to at most MAX_ASPECT:1
    where the picture allows; centred on the selection and shifted to lie inside the picture.
    Depends only on `sel` and the picture's size, and computed again inside its own box it gives
    that box: a client may send just the box.
    """
    w = min(max(sel.w + 2 * round(padding * sel.w), MIN_CONTEXT), width)
    h = min(max(sel.h + 2 * round(padding * sel.h), MIN_CONTEXT), height)
    if w > MAX_ASPECT * h:
        h = min(math.ceil(w / MAX_ASPECT), height)
    elif h > MAX_ASPECT * w:
        w = min(math.ceil(h / MAX_ASPECT), width)

    def place(start: int, length: int, side: int, limit: int) -> int:
        return min(max(start + length // 2 - side // 2, 0), limit - side)

    return Box(place(sel.x, sel.w, w, width), place(sel.y, sel.h, h, height), w, h)


def context_box(mask: np.ndarray, padding: float = 0.25, grow: int = 0, feather: int = 0) -> Box:
    """The context box around the mask's selection as `grow` and `feather` will shape it
    (box_around the whole mask's `shaped_bounds`): the edit's box, and the memory budget's."""
    height, width = mask.shape
    return box_around(shaped_bounds(mask, grow, feather), width, height, padding)


def canvas_size(box: Box, native: int, factor: int) -> tuple[int, int]:
    """The model canvas (width, height) for `box`: its shape, about native x native pixels, sides
    multiples of the UNet's downsampling `factor`."""
    scale = native / math.sqrt(box.w * box.h)
    width = max(factor, round(box.w * scale / factor) * factor)
    height = max(factor, round(box.h * scale / factor) * factor)
    # a box too thin for one factor across (a picture a few pixels wide) loses its shape rather
    # than the memory: never much more than the model's own pixel count
    cap = native * native * 5 // 4
    if width * height > cap:
        if width > height:
            width = max(factor, cap // height // factor * factor)
        else:
            height = max(factor, cap // width // factor * factor)
    return width, height


def _hard(mask: np.ndarray) -> np.ndarray:
    """What grow and feather start from: the at-least-half-selected part (any part if none)."""
    return mask >= 128 if (mask >= 128).any() else mask > 0


def _blur_kernel(feather: int) -> tuple[float, int]:
    """The feather's Gaussian: its sigma and kernel side."""
    sigma = feather / 2
    return sigma, 2 * math.ceil(3 * sigma) + 1


def _widened(sel: Box, n: int, width: int, height: int) -> Box:
    """`sel` widened by `n` pixels a side, inside the `width` x `height` picture."""
    x0, y0 = max(sel.x - n, 0), max(sel.y - n, 0)
    x1, y1 = min(sel.x + sel.w + n, width), min(sel.y + sel.h + n, height)
    return Box(x0, y0, x1 - x0, y1 - y0)


def shaped_bounds(mask: np.ndarray, grow: int = 0, feather: int = 0) -> Box:
    """Where `shape_selection(mask, grow, feather)` can select, without shaping it (a grow of
    1000 px takes seconds): the selection's bounds widened by the grow and the blur's half
    kernel, inside the picture. Exact for a grow alone; a feather's faint tail may stop a few
    pixels short of its kernel."""
    if not grow and not feather:
        return selection_bounds(mask)
    (height, width), reach = mask.shape, grow + _blur_kernel(feather)[1] // 2
    return _widened(selection_bounds(_hard(mask)), reach, width, height)


def shape_selection(mask: np.ndarray, grow: int = 0, feather: int = 0) -> np.ndarray:
    """The selection grown by `grow` pixels, then feathered over about `feather` pixels on each
    side of its edge (a Gaussian of sigma feather / 2). Meant for hard selections: a soft one is
    taken as its at-least-half-selected part. Work stays in the selection's neighbourhood."""
    if not grow and not feather:
        return mask
    hard = _hard(mask)
    sigma, k = _blur_kernel(feather)
    sel, (height, width) = selection_bounds(hard), mask.shape
    # all it can reach and one pixel more: the blur's replicated border there is unselected
    area = _widened(sel, grow + k // 2 + 1, width, height)
    x0, y0, x1, y1 = area.x, area.y, area.x + area.w, area.y + area.h
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
            f"feathered by {feather} px, a selection this small ({sel.w}x{sel.h} px) fades away "
            "entirely: lower feather, or grow it first"
        )
    return out


def to_model(
    image: np.ndarray, mask: np.ndarray, box: Box, canvas: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The context box on the model's canvas (width, height): RGB float in [-1, 1] (HxWx3), and
    the hard mask (HxW, 1 wherever a selected pixel falls in the canvas pixel, else 0).

    Transparent pixels show the model what lies under them, BACKGROUND: a neutral grey.
    """
    patch = image[box.y : box.y + box.h, box.x : box.x + box.w]
    if patch.shape[2] == 4:
        a = patch[..., 3:].astype(np.float32) / 255.0
        rgb = patch[..., :3] * a + BACKGROUND * (1 - a)
        patch = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    rgb = Image.fromarray(np.ascontiguousarray(patch[..., :3]))  # the only copy at image scale
    rgb = np.asarray(rgb.resize(canvas, Image.Resampling.LANCZOS), np.float32)
    touched = torch.from_numpy(mask[box.y : box.y + box.h, box.x : box.x + box.w] > 0)
    hard = F.adaptive_max_pool2d(touched.float()[None, None], canvas[::-1])[0, 0].numpy()
    return rgb / 127.5 - 1.0, hard


def seen_on_canvas(mask: np.ndarray, box: Box, canvas: tuple[int, int]) -> np.ndarray:
    """The selection's alpha on the canvas (HxW in [0, 1], area-averaged): how much of each
    canvas pixel the artist will see. CLIP judges the edit through it, so a feathered edge,
    editable in full under the hard mask, counts as faintly as it will show."""
    alpha = torch.from_numpy(mask[box.y : box.y + box.h, box.x : box.x + box.w]).float() / 255
    return F.adaptive_avg_pool2d(alpha[None, None], canvas[::-1])[0, 0].numpy()


def from_model(
    result: np.ndarray, box: Box, sel: Box, size: tuple[int, int] | None = None
) -> np.ndarray:
    """An edited canvas (HxWx3 in [-1, 1]) back at image scale, cut to `sel` (uint8); at
    `size` (width, height) instead of the image's scale when given (previews)."""
    rgb = np.clip((result + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    # only the selection's part of the canvas is resampled: memory bounded by the selection
    sx, sy = rgb.shape[1] / box.w, rgb.shape[0] / box.h
    x, y = (sel.x - box.x) * sx, (sel.y - box.y) * sy
    source = (x, y, x + sel.w * sx, y + sel.h * sy)
    size = size or (sel.w, sel.h)
    resized = Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS, box=source)
    return np.asarray(resized)


def layer_pixels(edited: np.ndarray, mask: np.ndarray, sel: Box) -> np.ndarray:
    """RGBA for a new layer over `sel`: the edit, with the selection's own alpha (applied once)."""
    alpha = mask[sel.y : sel.y + sel.h, sel.x : sel.x + sel.w]
    rgba = np.concatenate([edited, alpha[..., None]], axis=2)
    rgba[alpha == 0, :3] = 0
    return rgba


def composite(image: np.ndarray, rgba: np.ndarray, at: Box) -> np.ndarray:
    """`image` with the RGBA layer pasted at `at` through its alpha; alpha 0 keeps exact bytes."""
    out = image.copy()
    region = out[at.y : at.y + at.h, at.x : at.x + at.w]
    a = rgba[..., 3:4].astype(np.uint16)
    mixed = (region[..., :3].astype(np.uint16) * (255 - a) + rgba[..., :3] * a + 127) // 255
    region[..., :3] = mixed.astype(np.uint8)
    return out
