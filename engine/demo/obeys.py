"""Does an edit paint what the prompt asks, where training never put a shape, over backgrounds it
never saw? Measured for demo-latent (the latent method) and the pixel demo on the same cases.

    python -m engine demo-obeys --out docs/demo-latent-obeys.md

A case is one of the world's 18 colour x shape prompts ("a red circle") over a latent-world test
picture: a grainy gradient of photo-like colours (latent_world.unseen_background) with a square
selection in the quadrant training never centres a shape in (latent_world.test_box). Each edit
makes 4 variants; a variant obeys when both judges agree:
- the demo CLIP (ablation.Reader) reads the prompt's caption in the selection, among the 18;
- its pixels (`pixel_check`): enough of the selection within reach of the prompt's colour, and
  that region's fill of its bounding box is the shape's (a square fills it, a circle pi/4 of
  it, a triangle half, apex up).
The ablations: `no blend` generates the whole picture from the prompt (the model's text to
image: the selection everywhere, no background to blend) and pastes its selection's part; `swapped
prompt` asks for another colour and shape and is judged against the case's own.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.demo import latent_world
from engine.demo.ablation import Reader
from engine.demo.world import COLOURS, SHAPES
from engine.methods import Variant
from engine.region import composite
from engine.shared.request import LATENT, PIXEL, check

if TYPE_CHECKING:
    from engine.methods.latent import Latent
    from engine.models import Models

VARIANTS = 4
COLOUR_REACH = 80.0  # RGB distance within which a pixel counts as the prompt's colour
MIN_SHARE = 0.06  # of the selection the colour must cover (a 7 px triangle in 28 px: 0.1)
FILL = {"square": (0.84, 1.01), "circle": (0.62, 0.84), "triangle": (0.3, 0.62)}


@dataclass(frozen=True)
class Case:
    colour: str
    shape: str
    image: np.ndarray  # uint8 64x64x3
    mask: np.ndarray  # uint8 64x64, the square selection
    box: tuple[int, int, int]  # x, y, side of the selection
    seed: int

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def swapped(self) -> str:
        """Another colour and another shape."""
        colours, i, j = list(COLOURS), list(COLOURS).index(self.colour), SHAPES.index(self.shape)
        return f"a {colours[(i + 1) % len(colours)]} {SHAPES[(j + 1) % len(SHAPES)]}"


def case(colour: str, shape: str, seed: int = 0) -> Case:
    """The test picture and selection of one prompt; the same seed gives the same case."""
    index = list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)
    rng = np.random.default_rng([seed, index])
    image = np.rint(latent_world.unseen_background(rng, [colour])).astype(np.uint8)
    x, y, side = latent_world.test_box(rng)
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[y : y + side, x : x + side] = 255
    return Case(colour, shape, image, mask, (x, y, side), seed)


def cases(seed: int = 0) -> list[Case]:
    return [case(c, s, seed) for c in COLOURS for s in SHAPES]


def pixel_check(rgb: np.ndarray, colour: str, shape: str) -> bool:
    """Whether the selection's pixels (uint8 HxWx3) show the colour, in the shape."""
    near = np.linalg.norm(rgb.astype(np.float64) - COLOURS[colour], axis=-1) < COLOUR_REACH
    if near.mean() < MIN_SHARE:
        return False
    rows, cols = np.flatnonzero(near.sum(1) >= 2), np.flatnonzero(near.sum(0) >= 2)
    if not len(rows) or not len(cols):
        return False
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    blob = near[top:bottom, left:right]
    fill = blob.mean()
    low, high = FILL[shape]
    if not low <= fill < high or not 0.6 <= blob.shape[0] / blob.shape[1] <= 1.67:
        return False
    if shape == "triangle":  # apex up: its top half holds about a third of its bottom half's
        half = blob.shape[0] // 2
        return blob[:half].sum() < 0.6 * blob[half:].sum()
    return True


def judge(reader: Reader, rgb: np.ndarray, colour: str, shape: str) -> dict[str, bool]:
    read = reader.read(rgb)
    clip = read == f"a {colour} {shape}"
    pixels = pixel_check(rgb, colour, shape)
    return {"colour": read.split()[1] == colour, "clip": clip, "pixels": pixels,
            "both": clip and pixels}  # fmt: skip


def crop(c: Case, variant: Variant) -> np.ndarray:
    """The selection as the artist sees it: the variant's layer composited over the picture."""
    x, y, side = c.box
    return composite(c.image, variant.rgba, variant.box)[y : y + side, x : x + side]


# (picture, selection, prompt, settings away from the method's defaults) -> variants, best first
Editor = Callable[[np.ndarray, np.ndarray, str, dict], list[Variant]]


def measure(
    edit: Editor, reader: Reader, chosen: list[Case], ablation: str = "", **overrides: object
) -> dict:
    """One row: how many variants (and cases) obey, for `edit` over `chosen` cases, with
    `overrides` of the default settings."""
    verdicts, per_case, start = [], [], time.perf_counter()
    for c in chosen:
        prompt = c.swapped if ablation == "swapped prompt" else c.prompt
        settings = {"seed": c.seed * 1000 + 7, "variants": VARIANTS, **overrides}
        if ablation == "no blend":  # the whole picture from the prompt, at full strength
            full = np.full_like(c.mask, 255)
            result = edit(c.image, full, prompt, settings | {"strength": 100})
        else:
            result = edit(c.image, c.mask, prompt, settings)
        ones = [judge(reader, crop(c, v), c.colour, c.shape) for v in result]  # rank order
        verdicts += ones
        per_case.append(ones)
    n, cases_n = len(verdicts), len(per_case)
    return {
        "cases": cases_n,
        "variants": n,
        "colour": sum(v["colour"] for v in verdicts) / n,
        "clip": sum(v["clip"] for v in verdicts) / n,
        "pixels": sum(v["pixels"] for v in verdicts) / n,
        "every_variant": sum(v["both"] for v in verdicts) / n,
        "all_4": sum(all(v["both"] for v in one) for one in per_case) / cases_n,
        "rank_1": sum(one[0]["both"] for one in per_case) / cases_n,
        "best_of_4": sum(any(v["both"] for v in one) for one in per_case) / cases_n,
        "seconds_per_edit": round((time.perf_counter() - start) / cases_n, 1),
    }


def latent_editor(method: Latent) -> Editor:
    from engine.methods.latent import run_edit

    def edit(image: np.ndarray, mask: np.ndarray, prompt: str, values: dict) -> list[Variant]:
        return run_edit(method, image, mask, prompt, check(values, method=LATENT))

    return edit


def pixel_editor(models: Models) -> Editor:
    from engine.methods.pixel import run_edit

    def edit(image: np.ndarray, mask: np.ndarray, prompt: str, values: dict) -> list[Variant]:
        return run_edit(models, image, mask, prompt, check(values, method=PIXEL))

    return edit


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))  # fmt: skip
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    import torch

    return f"{name}, {torch.get_num_threads()} torch threads"


COLUMNS = ("rank_1", "best_of_4", "all_4", "every_variant", "clip", "pixels", "colour")


def table(rows: list[tuple[str, dict]]) -> str:
    head = "| model, setting | rank 1 | best of 4 | all 4 | every variant | CLIP | pixels |"
    lines = [head + " colour | s/edit |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        cells = " | ".join(f"{r[k]:.0%}" for k in COLUMNS)
        lines.append(f"| {name} | {cells} | {r['seconds_per_edit']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine demo-obeys", description=__doc__)
    p.add_argument("--seed", type=int, default=0, help="draws the cases")
    p.add_argument("--strength", type=int, default=75, help="the latent method's")
    p.add_argument("--limit", type=int, default=None, help="the first N cases only")
    p.add_argument("--method", choices=("both", "latent", "pixel"), default="both")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", help="also write the table (markdown) to this file")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    chosen = cases(args.seed)[: args.limit]
    rows, labels = [], []
    if args.method != "pixel":
        from engine.methods import latent

        method = latent.load("demo-latent", device="cpu")
        edit, reader = latent_editor(method), Reader(method)
        labels.append(method.label)
        for ablation in ("", "no blend", "swapped prompt"):
            name = f"demo-latent{', ' + ablation if ablation else ''}"
            rows.append((name, measure(edit, reader, chosen, ablation, strength=args.strength)))
            print(table(rows[-1:]), flush=True)
    if args.method != "latent":
        from engine.models import load_models

        models = load_models("demo", device="cpu")
        pixel_edit, reader = pixel_editor(models), Reader(models)  # the same demo CLIP judges
        labels.append(models.label)
        for ablation in ("", "no blend", "swapped prompt"):
            name = f"demo (pixel method){', ' + ablation if ablation else ''}"
            rows.append((name, measure(pixel_edit, reader, chosen, ablation)))
            print(table(rows[-1:]), flush=True)
    label = "; ".join(labels)
    text = (
        f"{len(chosen)} cases (seed {args.seed}) x {VARIANTS} variants; latent strength "
        f"{args.strength}%, both methods' other settings their defaults.\n"
        f"Models: {label}. Machine: {machine()}.\n\n{table(rows)}\n"
    )
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
