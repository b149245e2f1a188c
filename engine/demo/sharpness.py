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
import sys
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
    `save`: where the edited pictures go (PNG, the path's name + the picture's). The edited
    pictures are in the result too (`pictures`, not measures)."""
    out: dict = {"pictures": {}}
    for name, (image, mask) in (("plain", picture()), ("textured", textured())):
        start = time.perf_counter()
        best = run_edit(models, image, mask, PROMPT, settings)[0]
        seen = composite(image, best.rgba, best.box)
        out["pictures"][name] = seen
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


def figure(rows: list[list[tuple[str, np.ndarray]]], path: Path, zoom: int = 2) -> None:
    """Rows of pictures side by side, each enlarged `zoom` x (nearest: the pixels as they are)
    under its caption: the README's before/after."""
    from PIL import ImageDraw

    h, w = rows[0][0][1].shape[:2]
    cell_w, cell_h = w * zoom + 8, h * zoom + 26
    sheet = Image.new("RGB", (max(map(len, rows)) * cell_w - 8, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, panels in enumerate(rows):
        for i, (caption, rgb) in enumerate(panels):
            x, y = i * cell_w, r * cell_h
            big = Image.fromarray(rgb.astype(np.uint8)).resize((w * zoom, h * zoom), Image.NEAREST)
            sheet.paste(big, (x, y + 18))
            draw.text((x + 2, y + 3), caption, fill="black")
    sheet.save(path)


def summary(runs: list[dict], without: list[dict]) -> dict:
    """One row's figures over its seeds, against the same seeds' edits `without` the pass."""
    plain = [r["plain"] for r in runs]
    red = [c[0] - max(c[1:]) > 120 for c in (p["colour"] for p in plain)]
    same = [p["blobs"] == w["plain"]["blobs"] for p, w in zip(plain, without, strict=True)]
    return {
        "edge_width_px": float(np.nanmedian([p["edge_width_px"] for p in plain])),
        "blobs": [p["blobs"] for p in plain],
        "blobs_unchanged": f"{sum(same)}/{len(same)}",
        "red": f"{sum(red)}/{len(red)}",
        "hf_ratio": float(np.median([r["textured"]["hf_ratio"] for r in runs])),
        "seconds": float(np.median([r["plain"]["seconds"] for r in runs])),
    }


def _settings(item: str) -> dict:
    """`NAME=VALUE[,NAME=VALUE...]` as EditSettings keywords (values in JSON)."""
    pairs = (pair.partition("=") for pair in item.split(","))
    return {name: json.loads(value) for name, _, value in pairs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine demo-sharpness", description=__doc__)
    p.add_argument("--variants", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--seeds", type=int, default=4, help="edits per row, seeds 0, 1, ...")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="settings of a row to compare, e.g. refine_strength=0.2,refine_guidance=1 "
        "(repeatable, the pass on; the rows without the pass and at its defaults always run)",
    )
    p.add_argument("--save", type=Path, help="a folder for the edited pictures")
    p.add_argument(
        "--figure",
        type=Path,
        help="a PNG of seed 0's red circle without the pass, with the last row's settings and "
        "drawn at that size",
    )
    args = p.parse_args(argv)
    models = load_models("demo", device="cpu")
    base = dict(variants=args.variants, steps=args.steps, skip=args.skip)
    rows = {"without the pass": {"refine": False}, "the pass at its defaults": {"refine": True}}
    rows |= {item: {"refine": True} | _settings(item) for item in args.setting}
    image, mask = picture()
    reference = drawn_circle(image, mask)
    result = {
        "models": models.label,
        "settings": base | {"seeds": args.seeds},
        "drawn_edge_width_px": edge_width(redness(reference)),
        "rows": {},
    }
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        Image.fromarray(reference.astype(np.uint8)).save(args.save / "drawn.png")
    runs = {}
    for i, (name, row) in enumerate(rows.items()):
        runs[name] = [
            measure(
                models,
                EditSettings(**base, **row, seed=seed),
                args.save and args.save / f"row{i}-seed{seed}",
            )
            for seed in range(args.seeds)
        ]
        result["rows"][name] = summary(runs[name], runs["without the pass"])
        print(name, json.dumps(result["rows"][name]), file=sys.stderr, flush=True)
    if args.figure:
        last = list(rows)[-1]
        before, after = runs["without the pass"][0]["pictures"], runs[last][0]["pictures"]
        figure(
            [
                [
                    ("without the pass", before["plain"]),
                    (f"with the pass ({last})", after["plain"]),
                    ("drawn at this size", reference),
                ],
                [
                    ("without the pass", before["textured"]),
                    (f"with the pass ({last})", after["textured"]),
                    ("the picture", textured()[0]),
                ],
            ],
            args.figure,
        )
    print(json.dumps(result, indent=1))
    return 0
