"""From a picture of any size to the model's square input and back.

A square context box around the selection (padded by a fraction of the selection's size, kept
inside the image where it fits, edge-extended where it cannot) is resized to the model's size.
The edited box is resized back and composited through the mask's own alpha, so every pixel the
mask leaves at 0 keeps its exact bytes. Neither way materialises the box at image scale where it
overhangs the image: the overhang is edge-extended at model scale, and only the selection's part
of the result is resized back, so image-scale memory stays bounded by the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


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


def context_box(mask: np.ndarray, padding: float = 0.25) -> Box:
    """A square box around the selection with `padding` x its size of context on each side."""
    sel = selection_bounds(mask)
    height, width = mask.shape
    side = max(sel.w, sel.h)
    side = side + 2 * round(padding * side)

    def place(start: int, length: int, limit: int) -> int:
        lo = start + length // 2 - side // 2
        if side >= limit:  # larger than the image: centre it, the overhang is edge-extended
            return (limit - side) // 2
        return min(max(lo, 0), limit - side)

    return Box(place(sel.x, sel.w, width), place(sel.y, sel.h, height), side, side)


def _inside(box: Box, height: int, width: int) -> Box:
    """The part of `box` inside a `width` x `height` image."""
    x0, y0 = max(box.x, 0), max(box.y, 0)
    return Box(x0, y0, min(box.x + box.w, width) - x0, min(box.y + box.h, height) - y0)


def to_model(
    image: np.ndarray, mask: np.ndarray, box: Box, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The context box as the model sees it: RGB float in [-1, 1] (HxWx3), mask in [0, 1] (HxW).
    Only the box's part inside the image is read; an overhang repeats the edge at model scale."""
    part = _inside(box, *mask.shape)
    scale = size / box.w
    x0, y0 = round((part.x - box.x) * scale), round((part.y - box.y) * scale)
    x1 = max(round((part.x + part.w - box.x) * scale), x0 + 1)
    y1 = max(round((part.y + part.h - box.y) * scale), y0 + 1)
    pad = ((y0, size - y1), (x0, size - x1))

    def model_scale(a: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        a = np.ascontiguousarray(a[part.y : part.y + part.h, part.x : part.x + part.w])
        a = np.asarray(Image.fromarray(a).resize((x1 - x0, y1 - y0), resample), np.float32)
        return np.pad(a, pad + ((0, 0),) * (a.ndim - 2), mode="edge")

    rgb = model_scale(image[..., :3], Image.Resampling.LANCZOS)
    m = model_scale(mask, Image.Resampling.BILINEAR)
    return rgb / 127.5 - 1.0, m / 255.0


def from_model(result: np.ndarray, box: Box, sel: Box) -> np.ndarray:
    """An edited model-size result (HxWx3 in [-1, 1]) back at image scale, cut to `sel` (uint8):
    only `sel`'s part of the box is resampled, never the whole box."""
    rgb = np.clip((result + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    scale = rgb.shape[1] / box.w
    x, y = (sel.x - box.x) * scale, (sel.y - box.y) * scale
    source = (x, y, x + sel.w * scale, y + sel.h * scale)
    resized = Image.fromarray(rgb).resize((sel.w, sel.h), Image.Resampling.LANCZOS, box=source)
    return np.asarray(resized)


def layer_pixels(edited: np.ndarray, mask: np.ndarray, sel: Box) -> np.ndarray:
    """RGBA for a new layer over `sel`: the edit, with the selection's own alpha."""
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
