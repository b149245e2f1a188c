"""Detail at any size, measured in the demo world: a large selection with and without the
refinement pass (engine/tiles.py).

"a red circle" in a selection 4x the demo model's side: the width of the shape's edge (10-90%
rise along rays from its centre, in image pixels) against a circle drawn at that size by the
world's own renderer; the count of distinct coloured blobs in the selection (the pass must not
add shapes); the blob's colour (it must stay the prompt's). And a textured picture: the
high-frequency energy inside the selection relative to just outside it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.demo import world
from engine.edit import EditSettings, run_edit
from engine.models import Models, load_models
from engine.region import composite

BACKGROUND = (110, 130, 110)  # a grey-green far from every colour of the world
PROMPT = "a red circle"


def picture(side: int = 86, margin: int = 43) -> tuple[np.ndarray, np.ndarray]:
    """A plain picture and a square selection of `side` px with `margin` px around it."""
    size = side + 2 * margin
    image = np.zeros((size, size, 3), np.uint8)
    image[...] = BACKGROUND
    mask = np.zeros((size, size), np.uint8)
    mask[margin : margin + side, margin : margin + side] = 255
    return image, mask


def textured(side: int = 86, margin: int = 43, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`picture`'s selection over a procedural texture with detail down to 2 px (a photo-like
    mix of a smooth gradient, fine random ripples and pixel grain)."""
    image, mask = picture(side, margin)
    rng = np.random.default_rng(seed)
    size = image.shape[0]
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    tone = 60 * (xx + yy) / (2 * size)
    for _ in range(12):  # ripples of 2 to 8 px periods in random directions
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(2, 8), rng.uniform(0, 2 * np.pi)
        tone += 12 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    tone = tone[..., None] + rng.normal(0, 10, (size, size, 3))
    image = np.clip(np.asarray(BACKGROUND, np.float64) + tone, 0, 255).astype(np.uint8)
    return image, mask


def redness(rgb: np.ndarray, colour: str = "red") -> np.ndarray:
    """How far each pixel has moved from the background towards `colour` (0 = background,
    1 = the colour), by projection on the line between them."""
    bg = np.asarray(BACKGROUND, np.float64)
    d = np.asarray(world.COLOURS[colour], np.float64) - bg
    return (rgb.astype(np.float64) - bg) @ d / (d @ d)


def edge_width(f: np.ndarray, rays: int = 64, step: float = 0.25) -> float:
    """The median over rays from the shape's centre of the distance over which `f` (1 inside,
    0 outside) falls from 90% to 10% of its level inside, in pixels."""
    inside = f > 0.5
    if not inside.any():
        return float("nan")
    level = float(np.median(f[inside]))
    ys, xs = np.nonzero(inside)
    cy, cx = ys.mean(), xs.mean()
    h, w = f.shape
    r = np.arange(0, max(h, w), step)
    a = np.linspace(0, 2 * np.pi, rays, endpoint=False)
    px, py = cx + np.cos(a)[:, None] * r, cy + np.sin(a)[:, None] * r
    grid = torch.from_numpy(np.stack([px / (w - 1) * 2 - 1, py / (h - 1) * 2 - 1], -1))[None]
    field = torch.from_numpy(f / level)[None, None]
    prof = F.grid_sample(field, grid, align_corners=True, padding_mode="border")[0, 0].numpy()
    widths = []
    for p in prof:
        low = np.nonzero(p < 0.1)[0]
        if not len(low):
            continue
        high = np.nonzero(p[: low[0]] > 0.9)[0]
        if len(high):
            widths.append((low[0] - high[-1]) * step)
    return float(np.median(widths)) if widths else float("nan")


def blobs(rgb: np.ndarray, min_area: int = 8, threshold: float = 60.0) -> int:
    """Distinct coloured blobs: 4-connected groups of at least `min_area` pixels further than
    `threshold` (RGB distance) from the background."""
    far = np.linalg.norm(rgb.astype(np.float64) - BACKGROUND, axis=-1) > threshold
    seen = np.zeros_like(far)
    count = 0
    h, w = far.shape
    for y, x in zip(*np.nonzero(far), strict=True):
        if seen[y, x]:
            continue
        seen[y, x], queue, area = True, deque([(y, x)]), 0
        while queue:
            cy, cx = queue.popleft()
            area += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and far[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        count += area >= min_area
    return count


def blob_colour(rgb: np.ndarray) -> tuple[float, float, float]:
    """The mean colour of the pixels more than half way to red."""
    inside = redness(rgb) > 0.5
    if not inside.any():
        return (float("nan"),) * 3
    return tuple(float(c) for c in rgb[inside].mean(axis=0))


def hf_ratio(rgb: np.ndarray, mask: np.ndarray, ring: int = 16) -> float:
    """High-frequency energy (the mean square of the picture minus its 3x3 box blur) inside the
    selection relative to a `ring` px band just outside it."""
    x = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
    hf = (x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1))[0].square().sum(0)
    m = torch.from_numpy(mask > 0)[None, None].float()
    inner = F.max_pool2d(-F.max_pool2d(-m, 3, 1, 1), 3, 1, 1)[0, 0] > 0  # off the edge itself
    band = (F.max_pool2d(m, 2 * ring + 1, 1, ring)[0, 0] > 0) & ~(m[0, 0] > 0)
    return float(hf[inner].mean() / hf[band].mean())


def drawn_circle(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reference: a red circle filling most of the selection, drawn by the world's renderer
    at the picture's own resolution (its anti-aliased edge is about a pixel wide)."""
    ys, xs = np.nonzero(mask)
    side = ys.max() - ys.min() + 1
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    shape = world.Shape("circle", "red", cx, cy, 0.35 * side)
    a = world.coverage(shape, image.shape[0])[..., None]
    return np.clip(np.rint(image * (1 - a) + np.asarray(world.COLOURS["red"]) * a), 0, 255)


def measure(models: Models, settings: EditSettings, save: Path | None = None) -> dict:
    """The measures above for the best variant of one edit of each picture with `settings`;
    `save`: where the edited pictures go (PNG, the path's name + the picture's)."""
    out = {}
    for name, (image, mask) in (("plain", picture()), ("textured", textured())):
        start = time.perf_counter()
        best = run_edit(models, image, mask, PROMPT, settings)[0]
        seen = composite(image, best.rgba, best.box)
        if save:
            Image.fromarray(seen).save(save.with_name(f"{save.name}-{name}.png"))
        sel = seen[best.box.y : best.box.y + best.box.h, best.box.x : best.box.x + best.box.w]
        out[name] = {"seconds": round(time.perf_counter() - start, 1)}
        if name == "plain":
            out[name] |= {
                "edge_width_px": edge_width(redness(sel)),
                "blobs": blobs(sel),
                "colour": blob_colour(sel),
            }
        out[name]["hf_ratio"] = hf_ratio(seen, mask)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine demo-sharpness", description=__doc__)
    p.add_argument("--variants", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a refinement setting to compare, e.g. refine_strength=0.5 (repeatable)",
    )
    p.add_argument("--save", type=Path, help="a folder for the edited pictures")
    args = p.parse_args(argv)
    models = load_models("demo", device="cpu")
    base = dict(variants=args.variants, steps=args.steps, skip=args.skip, seed=args.seed)
    rows = {
        "without the pass": EditSettings(refine=False, **base),
        "with the pass": EditSettings(**base),
    }
    for item in args.setting:
        name, _, value = item.partition("=")
        rows[item] = EditSettings(**base, **{name: json.loads(value)})
    image, mask = picture()
    reference = drawn_circle(image, mask)
    result = {
        "models": models.label,
        "drawn_edge_width_px": edge_width(redness(reference)),
        "rows": {},
    }
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        Image.fromarray(reference.astype(np.uint8)).save(args.save / "drawn.png")
    for i, (name, s) in enumerate(rows.items()):
        result["rows"][name] = measure(models, s, args.save and args.save / f"row{i}")
    print(json.dumps(result, indent=1))
    return 0
