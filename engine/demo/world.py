"""The demo world: 32x32 images of a coloured shape on a plain background, with a caption.

The real Blended Diffusion weights (ADM 256, CLIP ViT-B/16) cannot be downloaded everywhere, so
the project trains two small models here on this world. In it a prompt has a checkable meaning:
"a red circle" is right when the edited pixels are red and round.

An image holds one shape (circle, square or triangle) in one of six named colours, at a random
position and size, on a plain background of a random colour far from the shape's colour, so
the shape is always visible. Optionally a second shape, not overlapping the first, is added
(the caption then names both). Shapes are anti-aliased by supersampling, so the diffusion model
learns smooth edges rather than staircases. Everything is pure numpy and driven by a
`numpy.random.Generator`: the same seed gives the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 180, 40),
    "blue": (30, 60, 230),
    "yellow": (245, 220, 30),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES: list[str] = ["circle", "square", "triangle"]
CAPTIONS: list[str] = [f"a {c} {s}" for c in COLOURS for s in SHAPES]  # the 18 single captions

MIN_RADIUS, MAX_RADIUS = 4.0, 10.0  # half the side of the shape's box, in pixels
MIN_CONTRAST = 120.0  # Euclidean RGB distance between a shape's colour and the background
_SUPERSAMPLE = 4  # sub-pixels per pixel side, for anti-aliased edges


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # a key of COLOURS
    cx: float  # centre, in pixels (0 = left edge of the image)
    cy: float
    r: float  # half the side of the shape's bounding box

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.kind}"


def coverage(shape: Shape, size: int = SIZE) -> np.ndarray:
    """Fraction (0..1) of each pixel the shape covers, as a size x size float array."""
    n = size * _SUPERSAMPLE
    c = (np.arange(n) + 0.5) / _SUPERSAMPLE  # sub-pixel centres, in pixel units
    x, y = c[None, :] - shape.cx, c[:, None] - shape.cy
    r = shape.r
    if shape.kind == "circle":
        inside = x**2 + y**2 <= r**2
    elif shape.kind == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    elif shape.kind == "triangle":  # apex up, base at the bottom of its box
        inside = (y <= r) & (np.abs(x) <= (y + r) / 2)
    else:
        raise ValueError(f"unknown shape '{shape.kind}' (one of {', '.join(SHAPES)})")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def random_shape(
    rng: np.random.Generator, colour: str | None = None, kind: str | None = None
) -> Shape:
    """A shape that fits inside the image; colour and kind are drawn when not given."""
    colour = colour if colour is not None else str(rng.choice(list(COLOURS)))
    kind = kind if kind is not None else str(rng.choice(SHAPES))
    r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
    cx, cy = rng.uniform(r, SIZE - r, size=2)
    return Shape(kind, colour, float(cx), float(cy), r)


def random_background(rng: np.random.Generator, avoid: list[str]) -> np.ndarray:
    """A random RGB colour at least MIN_CONTRAST away from every named colour in `avoid`."""
    while True:  # rejection sampling: the excluded balls cover a small part of the RGB cube
        bg = rng.integers(0, 256, size=3).astype(np.float64)
        if all(np.linalg.norm(bg - COLOURS[c]) >= MIN_CONTRAST for c in avoid):
            return bg


def render(shapes: list[Shape], background: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Paint the shapes, in order, over a plain background: uint8 size x size x 3."""
    img = np.broadcast_to(np.asarray(background, np.float64), (size, size, 3)).copy()
    for s in shapes:
        a = coverage(s, size)[..., None]
        img = img * (1 - a) + np.asarray(COLOURS[s.colour], np.float64) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def scene(
    rng: np.random.Generator,
    colour: str | None = None,
    kind: str | None = None,
    second: bool = False,
) -> tuple[list[Shape], np.ndarray]:
    """The shapes and background of a random image (drawn, not yet rendered)."""
    shapes = [random_shape(rng, colour, kind)]
    if second:
        taken = coverage(shapes[0]) > 0
        for _ in range(30):  # a second shape only where it does not touch the first
            s = random_shape(rng)
            if not (taken & (coverage(s) > 0)).any():
                shapes.append(s)
                break
    return shapes, random_background(rng, [s.colour for s in shapes])


def draw(
    rng: np.random.Generator,
    colour: str | None = None,
    kind: str | None = None,
    second: bool = False,
) -> tuple[np.ndarray, str]:
    """One image (uint8 32x32x3) and its caption, e.g. "a red circle".

    `colour` and `kind` fix the (first) shape; `second` asks for a second shape, named in the
    caption as "a red circle and a blue square" (it may not fit, then there is one shape).
    """
    shapes, bg = scene(rng, colour, kind, second)
    return render(shapes, bg), " and ".join(s.caption for s in shapes)


def to_model(images: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3 to float32 N x 3 x H x W in [-1, 1], as the diffusion model sees it."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def batch(rng: np.random.Generator, n: int, p_second: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """`n` random images as float32 N x 3 x 32 x 32 in [-1, 1], and their captions.

    Each image gets a second shape with probability `p_second`.
    """
    drawn = [draw(rng, second=bool(rng.random() < p_second)) for _ in range(n)]
    return to_model(np.stack([img for img, _ in drawn])), [cap for _, cap in drawn]
