"""The Blended Latent Diffusion paper's applications as latent demo world cases, and the thin
selection that progressive mask shrinking is for.

    python -m engine.demo.applications   # writes engine/examples/latent-*.png, docs pictures

Each application is a picture and a selection (written to engine/examples/ for the command line,
commands in docs/demo-latent.md), a prompt, and what a viewer checks in the result:
- background: select all but an object, ask for another background;
- scribble: a rough red stroke inside the selection as the source, low strength: a red circle;
- extend: the canvas grown on its right, the new strip selected, the background asked for;
- remove (the latent method only): the object's box selected, the background as the prompt and
  the object as the negative prompt.
The pixel demo runs the first three beside demo-latent (its CLIP knows the 18 object captions
and no background words, and guidance has no negative prompt: see docs/demo-latent.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
from PIL import Image

from engine.demo import latent_world
from engine.demo.world import Shape, coverage, render
from engine.methods import Variant
from engine.region import composite

EXAMPLES = Path(__file__).parent.parent / "examples"
DOCS = Path(__file__).parent.parent.parent / "docs"
SIZE = latent_world.SIZE


@dataclass(frozen=True)
class Application:
    name: str
    prompt: str
    strength: int  # %
    negative_prompt: str = ""
    pixel: bool = True  # the pixel method can do it too

    @property
    def image_path(self) -> Path:
        return EXAMPLES / f"latent-{self.name}.png"

    @property
    def mask_path(self) -> Path:
        return EXAMPLES / f"latent-{self.name}-mask.png"

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """The example's picture (RGB) and selection, as the command line reads them."""
        return np.asarray(Image.open(self.image_path).convert("RGB")), np.asarray(
            Image.open(self.mask_path).convert("L")
        )


BACKGROUND = Application("background", "a yellow square on a teal background", 100)
SCRIBBLE = Application("scribble", "a red circle", 60)
EXTEND = Application("extend", "a purple background", 100)
REMOVE = Application("remove", "a grey background", 100, "a red circle", pixel=False)
APPLICATIONS = (BACKGROUND, SCRIBBLE, EXTEND, REMOVE)
EXTEND_BY = 24  # pixels the canvas grows by on its right

# the objects in the pictures
SQUARE = Shape("square", "yellow", 24.0, 26.0, 12.0)
CIRCLE = Shape("circle", "red", 40.0, 36.0, 11.0)
TRIANGLE = Shape("triangle", "white", 26.0, 30.0, 13.0)


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def build(app: Application, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The application's picture and selection, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    if app is BACKGROUND:  # a yellow square on a grainy sky-to-sand gradient, all else selected
        image = render([SQUARE], latent_world.unseen_background(rng, ["yellow"]), SIZE)
        return image, _uint8((coverage(SQUARE, SIZE) == 0) * 255)
    if app is SCRIBBLE:  # a blue square, and a rough red scribble in the selected box
        square = Shape("square", "blue", 18.0, 20.0, 9.0)
        background = latent_world.unseen_background(rng, ["red", "blue"])
        image = render([square], background, SIZE).astype(np.float64)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[30:60, 30:60] = 255
        yy, xx = np.mgrid[:SIZE, :SIZE]
        for _ in range(7):  # overlapping wobbly strokes, roughly a disc
            cx, cy = rng.uniform(40, 50, 2)
            angle, length = rng.uniform(0, np.pi), rng.uniform(8, 14)
            along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            stroke = (np.abs(along) < length / 2) & (np.abs(across) < rng.uniform(1.5, 3))
            image[stroke] = np.asarray((215, 40, 35)) + rng.normal(0, 12, 3)
        return _uint8(image), mask
    if app is EXTEND:  # a white triangle on purple, 24 px more canvas on the right, selected
        picture = render([TRIANGLE], latent_world.training_background(rng, "purple"), SIZE)
        image = np.concatenate([picture, np.repeat(picture[:, -1:], EXTEND_BY, axis=1)], axis=1)
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[:, SIZE:] = 255
        return image, mask
    # remove: a red circle on a grainy grey gradient (darker and lighter than training's grey)
    image = render([CIRCLE], latent_world.grainy(rng, (105, 105, 110), (165, 162, 155)), SIZE)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    lo, hi = int(CIRCLE.cy - CIRCLE.r - 3), int(CIRCLE.cy + CIRCLE.r + 4)
    left, right = int(CIRCLE.cx - CIRCLE.r - 3), int(CIRCLE.cx + CIRCLE.r + 4)
    mask[lo:hi, left:right] = 255
    return image, mask


def write_examples() -> None:
    for app in APPLICATIONS:
        image, mask = build(app)
        Image.fromarray(image).save(app.image_path)
        Image.fromarray(mask).save(app.mask_path)


def seen(image: np.ndarray, variant: Variant) -> np.ndarray:
    """The whole picture with the variant composited: what the artist sees."""
    return composite(image, variant.rgba, variant.box)


def thin_stroke(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A grainy grey picture and a 3 px wide diagonal stroke selection across it."""
    rng = np.random.default_rng(11)
    image = _uint8(latent_world.grainy(rng, (105, 105, 110), (165, 162, 155), size))
    yy, xx = np.mgrid[:size, :size]
    distance = np.abs((yy - 12) - 0.6 * (xx - 8)) / np.hypot(1, 0.6)
    mask = ((distance <= 1.5) & (xx >= 8) & (xx < size - 8)) * 255
    return image, mask.astype(np.uint8)


THIN_PROMPT = "a red square"


def official_masks(seen: Any, cell: int, shrink: int | None) -> list[Any]:
    """The official repository's latent mask: the cells the selection covers half of, thresholded,
    no shrinking and no thin parts kept (latent.latent_masks' signature, for comparison)."""
    import torch.nn.functional as F

    return [(F.avg_pool2d(seen, cell) >= 0.5).float()]


def change_inside(image: np.ndarray, mask: np.ndarray, variant: Variant) -> float:
    """Mean absolute change (0..255) of the selected pixels, as the artist sees the result."""
    after = seen(image, variant).astype(np.float64)
    return float(np.abs(after - image)[mask > 0].mean())


def sheet(rows: list[list[np.ndarray]], scale: int = 3, gap: int = 4) -> np.ndarray:
    """Pictures side by side (rows of equal height), each scaled up by `scale` (nearest)."""
    lines = []
    for row in rows:
        tiles = [np.kron(p, np.ones((scale, scale, 1), np.uint8)) for p in row]
        height = max(t.shape[0] for t in tiles)
        padded = []
        for t in tiles:
            pad = np.full((height, t.shape[1] + gap, 3), 255, np.uint8)
            pad[: t.shape[0], : t.shape[1]] = t
            padded.append(pad)
        lines.append(np.concatenate(padded, axis=1))
    width = max(line.shape[1] for line in lines)
    out = np.full((sum(line.shape[0] + gap for line in lines), width, 3), 255, np.uint8)
    y = 0
    for line in lines:
        out[y : y + line.shape[0], : line.shape[1]] = line
        y += line.shape[0] + gap
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the examples, run each application with both methods, save the docs' pictures."""
    from engine.methods import latent, pixel
    from engine.models import load_models
    from engine.shared.request import LATENT, PIXEL, check

    p = argparse.ArgumentParser(prog="python -m engine.demo.applications", description=__doc__)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    write_examples()
    method, models = latent.load("demo-latent", device="cpu"), load_models("demo", device="cpu")
    for app in APPLICATIONS:
        image, mask = app.inputs()
        values = {"seed": args.seed, "variants": 4, "strength": app.strength}
        settings = check(values | {"negative_prompt": app.negative_prompt}, method=LATENT)
        row = [image, np.repeat(mask[..., None], 3, axis=2)]
        row.append(seen(image, latent.run_edit(method, image, mask, app.prompt, settings)[0]))
        if app.pixel:
            result = pixel.run_edit(models, image, mask, app.prompt, check(values, method=PIXEL))
            row.append(seen(image, result[0]))
        Image.fromarray(sheet([row])).save(DOCS / f"demo-latent-{app.name}.png")
        print(f"{app.name}: docs/demo-latent-{app.name}.png")
    image, mask = thin_stroke()
    row = [image, np.repeat(mask[..., None], 3, axis=2)]
    for name, shrink, masks in (
        ("the official mask alone", 0, official_masks), ("no shrinking", 0, None),
        ("shrinking", None, None),
    ):  # fmt: skip
        values = {"seed": args.seed, "variants": 4, "strength": 100, "mask_shrink": shrink}
        settings = check(values, method=LATENT)
        with patch.object(latent, "latent_masks", masks or latent.latent_masks):
            variants = latent.run_edit(method, image, mask, THIN_PROMPT, settings)
        row.append(seen(image, variants[0]))
        changes = [change_inside(image, mask, v) for v in variants]
        print(f"thin stroke, {name}: mean change inside {np.mean(changes):.1f}")
    Image.fromarray(sheet([row])).save(DOCS / "demo-latent-thin.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
