"""From a picture of any size to the model's square input and back.

A square context box around the selection (padded by a fraction of the selection's size, kept
inside the image where it fits, edge-extended where it cannot) is resized to the model's size.
The edited box is resized back and composited through the mask's own alpha, so every pixel the
mask leaves at 0 keeps its exact bytes.
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


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """The box's pixels; where the box overhangs the image, the image's edge is repeated."""
    height, width = array.shape[:2]
    pad = [
        (max(0, -box.y), max(0, box.y + box.h - height)),
        (max(0, -box.x), max(0, box.x + box.w - width)),
    ]
    pad += [(0, 0)] * (array.ndim - 2)
    padded = np.pad(array, pad, mode="edge")
    y0, x0 = box.y + pad[0][0], box.x + pad[1][0]
    return padded[y0 : y0 + box.h, x0 : x0 + box.w]


def to_model(
    image: np.ndarray, mask: np.ndarray, box: Box, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The context box as the model sees it: RGB float in [-1, 1] (HxWx3), mask in [0, 1] (HxW)."""
    rgb = Image.fromarray(np.ascontiguousarray(crop(image[..., :3], box)))
    m = Image.fromarray(np.ascontiguousarray(crop(mask, box)))
    rgb = np.asarray(rgb.resize((size, size), Image.Resampling.LANCZOS), np.float32)
    m = np.asarray(m.resize((size, size), Image.Resampling.BILINEAR), np.float32)
    return rgb / 127.5 - 1.0, m / 255.0


def from_model(result: np.ndarray, box: Box, sel: Box) -> np.ndarray:
    """An edited model-size result (HxWx3 in [-1, 1]) back at image scale, cut to `sel` (uint8)."""
    rgb = np.clip((result + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    back = np.asarray(Image.fromarray(rgb).resize((box.w, box.h), Image.Resampling.LANCZOS))
    y, x = sel.y - box.y, sel.x - box.x
    return back[y : y + sel.h, x : x + sel.w]


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
