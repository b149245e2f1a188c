"""Detail at any size, measured in the demo world: a large selection with and without the
refinement pass (engine/tiles.py).

"a red circle" in a selection whose context box is 4x the demo model's side: the width of the
shape's edge (10-90% rise along rays from its centre, in image pixels) against a circle drawn at
that size by the world's own renderer; the count of distinct coloured blobs in the selection
(the pass must not add shapes); the blob's colour (it must stay the prompt's). And a textured
picture: the high-frequency energy inside the selection relative to just outside it.

The clean-disc setting (CLEAN, the default): a round selection and guidance weight 50. At the
demo model's default full-guidance weight (300) a selection this large comes back as a patchwork
of colours: unguided, the demo UNet draws one clean shape over the background at this size, and
from about 100 on CLIP's gradient outweighs it (README). `--shape square --guidance-weight 300`
is the setting measured before.
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
from engine.methods.pixel import run_edit
from engine.models import Models, load_models
from engine.region import composite
from engine.shared.request import Settings

BACKGROUND = (110, 130, 110)  # a grey-green far from every colour of the world
PROMPT = "a red circle"
SHAPES = ("disc", "square")
# where the demo model's base edit is a clean disc (README): 86 px round selection, its context
# box 130 px (4x the demo model's 32 px canvas), guidance 50, 50 steps skipping 10
CLEAN = dict(shape="disc", guidance_weight=50.0, steps=50, skip=10)


def picture(side: int = 86, margin: int = 43, shape: str = "disc") -> tuple[np.ndarray, np.ndarray]:
    """A plain picture and a selection of `side` px across (a disc with an anti-aliased edge,
    or a square) with `margin` px around it."""
    size = side + 2 * margin
    image = np.zeros((size, size, 3), np.uint8)
    image[...] = BACKGROUND
    if shape == "disc":
        yy, xx = np.mgrid[:size, :size] + 0.5
        r = np.hypot(xx - size / 2, yy - size / 2)
        mask = np.rint(np.clip(side / 2 - r + 0.5, 0, 1) * 255).astype(np.uint8)
    elif shape == "square":
        mask = np.zeros((size, size), np.uint8)
        mask[margin : margin + side, margin : margin + side] = 255
    else:
        raise ValueError(f"shape must be one of {SHAPES}")
    return image, mask


def textured(
    side: int = 86, margin: int = 43, seed: int = 0, shape: str = "disc"
) -> tuple[np.ndarray, np.ndarray]:
    """`picture`'s selection over a procedural texture with detail down to 2 px (a photo-like
    mix of a smooth gradient, fine random ripples and pixel grain)."""
    image, mask = picture(side, margin, shape)
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


def blobs(rgb: np.ndarray, min_area: int = 8, threshold: float = 30.0) -> int:
    """Distinct coloured blobs: 4-connected groups of at least `min_area` pixels further than
    `threshold` (RGB distance) from the background. 30: the demo model's regenerated
    background strays about 20 from the picture's (specks of 7-11 px further than 15, none
    further than 30, at seed 3), a shape a third of the way to green is about 35 from it (60
    missed such shapes). Shapes that touch count as one: splitting them by hue split pale and
    shaded shapes into pieces."""
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


def measure(
    models: Models, settings: Settings, save: Path | None = None, shape: str = "disc"
) -> dict:
    """The measures above for the best variant of one edit of each picture with `settings`
    and a selection of `shape`; `save`: where the edited pictures go (PNG, the path's name +
    the picture's). The edited pictures are in the result too (`pictures`, not measures)."""
    out: dict = {"pictures": {}}
    pictures = (("plain", picture(shape=shape)), ("textured", textured(shape=shape)))
    for name, (image, mask) in pictures:
        start = time.perf_counter()
        best = run_edit(models, image, mask, PROMPT, settings)[0]
        seen = composite(image, best.rgba, best.box)
        out["pictures"][name] = seen
        if save:
            Image.fromarray(seen).save(save.with_name(f"{save.name}-{name}.png"))
        b = best.box
        sel = seen[b.y : b.y + b.height, b.x : b.x + b.width]
        out[name] = {"seconds": round(time.perf_counter() - start, 1)}
        if name == "plain":
            out[name] |= {
                "edge_width_px": edge_width(redness(sel)),
                "blobs": int(blobs(sel)),
                "colour": blob_colour(sel),
            }
            out[name]["clean_disc"] = clean_disc(out[name])
        out[name]["hf_ratio"] = hf_ratio(seen, mask)
    return out


def is_red(colour: tuple[float, float, float]) -> bool:
    """The prompt's colour kept: red well above green and blue."""
    return bool(colour[0] - max(colour[1:]) > 120)


def clean_disc(plain: dict) -> bool:
    """One blob, red, with a readable edge: the base edit the sharpness measure needs."""
    return bool(
        plain["blobs"] == 1 and is_red(plain["colour"]) and np.isfinite(plain["edge_width_px"])
    )


def spread(values: list[float]) -> dict:
    """Mean, standard deviation (n - 1), min and max over the finite values, and how many."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if not len(v):
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0}  # fmt: skip
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    r = {"mean": v.mean(), "sd": sd, "min": v.min(), "max": v.max()}
    return {k: round(float(x), 3) for k, x in r.items()} | {"n": len(v)}


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


def per_seed(run: dict, without: dict) -> dict:
    """One seed's figures, against the same seed's edit `without` the pass."""
    p, w = run["plain"], without["plain"]
    return {
        "edge_width_px": p["edge_width_px"],
        "narrower_by_px": w["edge_width_px"] - p["edge_width_px"],
        "blobs": p["blobs"],
        "blobs_unchanged": bool(p["blobs"] == w["blobs"]),
        "red": is_red(p["colour"]),
        "clean_disc_without": w["clean_disc"],
        "hf_ratio": run["textured"]["hf_ratio"],
        "seconds": p["seconds"],
    }


def summary(runs: list[dict], without: list[dict]) -> dict:
    """One row's figures over its seeds, against the same seeds' edits `without` the pass: the
    edge width and how much narrower over the seeds whose base edit is a clean disc, the
    others over all seeds."""
    seeds = [per_seed(r, w) for r, w in zip(runs, without, strict=True)]
    clean = [s for s in seeds if s["clean_disc_without"]]
    return {
        "edge_width_px": spread([s["edge_width_px"] for s in clean]),
        "narrower_by_px": spread([s["narrower_by_px"] for s in clean]),
        "clean_disc_without": f"{len(clean)}/{len(seeds)}",
        "blobs_unchanged": f"{sum(s['blobs_unchanged'] for s in seeds)}/{len(seeds)}",
        "red": f"{sum(s['red'] for s in seeds)}/{len(seeds)}",
        "hf_ratio": spread([s["hf_ratio"] for s in seeds]),
        "seconds": spread([s["seconds"] for s in seeds]),
        "seeds": seeds,
    }


def _settings(item: str) -> dict:
    """`NAME=VALUE[,NAME=VALUE...]` as Settings keywords (values in JSON)."""
    pairs = (pair.partition("=") for pair in item.split(","))
    return {name: json.loads(value) for name, _, value in pairs}


def _table(result: dict) -> str:
    """The rows' means and spreads as text, a seed's figures per line below each."""
    lines = [f"drawn at this size: edge {result['drawn_edge_width_px']:.2f} px"]
    for name, row in result["rows"].items():
        e, n, hf = row["edge_width_px"], row["narrower_by_px"], row["hf_ratio"]
        lines.append(
            f"{name}: edge {e['mean']:.2f} +- {e['sd']:.2f} px (n {e['n']}), narrower by "
            f"{n['mean']:.2f} +- {n['sd']:.2f}, clean disc without {row['clean_disc_without']}, "
            f"blobs unchanged {row['blobs_unchanged']}, red {row['red']}, "
            f"HF {hf['mean']:.3f} +- {hf['sd']:.3f}"
        )
        for seed, f in enumerate(row["seeds"]):
            lines.append(
                f"  seed {seed}: edge {f['edge_width_px']:.2f} px, blobs {f['blobs']}, "
                f"red {f['red']}, clean without {f['clean_disc_without']}, "
                f"HF {f['hf_ratio']:.3f}, {f['seconds']} s"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine demo-sharpness", description=__doc__)
    p.add_argument("--variants", type=int, default=1)
    p.add_argument("--steps", type=int, default=CLEAN["steps"])
    p.add_argument("--skip", type=int, default=CLEAN["skip"])
    p.add_argument(
        "--guidance-weight",
        type=float,
        default=CLEAN["guidance_weight"],
        help="the edit's CLIP weight (default %(default)s: the clean-disc setting; 300 is the "
        "demo model's default in full guidance)",
    )
    p.add_argument("--shape", choices=SHAPES, default=CLEAN["shape"], help="the selection's")
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
        help="a PNG of seed --figure-seed's red circle and texture without the pass, at its "
        "defaults, with each --setting row's and drawn at that size",
    )
    p.add_argument("--figure-seed", type=int, default=0)
    args = p.parse_args(argv)
    models = load_models("demo", device="cpu")
    base = dict(
        variants=args.variants,
        steps=args.steps,
        skip=args.skip,
        guidance_weight=args.guidance_weight,
    )
    rows = {"without the pass": {"refine": False}, "the pass at its defaults": {"refine": True}}
    rows |= {item: {"refine": True} | _settings(item) for item in args.setting}
    image, mask = picture(shape=args.shape)
    reference = drawn_circle(image, mask)
    result = {
        "models": models.label,
        "settings": base | {"seeds": args.seeds, "shape": args.shape},
        "drawn_edge_width_px": edge_width(redness(reference)),
        "rows": {},
    }
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        Image.fromarray(reference.astype(np.uint8)).save(args.save / "drawn.png")
    runs = {}
    for i, (name, row) in enumerate(rows.items()):
        runs[name] = []
        for seed in range(args.seeds):
            runs[name].append(
                measure(
                    models,
                    Settings(**base | row, seed=seed),
                    args.save and args.save / f"row{i}-seed{seed}",
                    args.shape,
                )
            )
            f = per_seed(runs[name][-1], runs["without the pass"][seed])
            print(name, "seed", seed, json.dumps(f), file=sys.stderr, flush=True)
        result["rows"][name] = summary(runs[name], runs["without the pass"])
    if args.figure:
        seed = args.figure_seed
        shown = list(rows)  # without the pass, at its defaults, each --setting
        pics = [(name, runs[name][seed]["pictures"]) for name in shown]
        figure(
            [
                [(name, p["plain"]) for name, p in pics] + [("drawn at this size", reference)],
                [(name, p["textured"]) for name, p in pics]
                + [("the picture", textured(shape=args.shape)[0])],
            ],
            args.figure,
        )
    print(_table(result), file=sys.stderr)
    print(json.dumps(result, indent=1))
    return 0
