"""The latent demo world: 64x64 pictures of coloured shapes on a named background, captioned.

The pixel demo world (engine/demo/world.py) at twice its side, so that the VAE's latents are
8x8, with what the latent method needs on top: a background named in the caption ("a red circle
on a grey background"), pictures with no shape ("a grey background": what removing an object
asks for), and a split between what training sees and what the tests edit:
- training backgrounds are one of BACKGROUNDS, jittered, plain or with a gentle gradient between
  two shades of that colour; test backgrounds (`unseen_background`) are gradients with grain
  between two colours of a photo-like palette that training never draws (sky, sand, foliage...);
- training never centres a shape in the bottom-right corner, right of and below 5/8 of the side
  (`allowed`); the tests' selections (`test_box`) lie there: a shape that fills one is centred
  at least 6 px inside that corner.
The VAE, a codec like SD's (trained on everything), also sees `codec_picture`s: any colours,
gradients and grain, shapes anywhere. The UNet and the text encoder see `draw` alone.
Shapes, colours and rendering are world.py's (its `coverage` and `render` at SIZE here).
"""

from __future__ import annotations

import numpy as np

from engine.demo.world import COLOURS, MIN_CONTRAST, SHAPES, Shape, coverage, render

SIZE = 64
MIN_RADIUS, MAX_RADIUS = 7.0, 14.0  # world.py's 4..10 at 32 px, a little larger than half
# named backgrounds, each at least MIN_CONTRAST from some of the shape colours (pairs closer
# than that are never drawn, so every shape stays visible)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "brown": (115, 75, 40),
    "purple": (125, 55, 150),
    "orange": (240, 140, 40),
    "pink": (240, 160, 200),
    "teal": (30, 140, 140),
}
# photo-like colours training never sees, for the test backgrounds' gradients
PHOTO: dict[str, tuple[int, int, int]] = {
    "sky": (140, 180, 215),
    "sand": (205, 180, 140),
    "foliage": (75, 105, 55),
    "skin": (215, 165, 135),
    "dusk": (95, 65, 115),
    "concrete": (155, 152, 145),
}
JITTER = 20  # per channel, training backgrounds
GRAIN = 8.0  # standard deviation of the test backgrounds' grain, in 0..255 units


def allowed(cx: float, cy: float, size: int = SIZE) -> bool:
    """Where training may centre a shape: anywhere but the bottom-right corner."""
    return not (cx >= size * 5 / 8 and cy >= size * 5 / 8)


def contrast(a: np.ndarray | tuple, b: np.ndarray | tuple) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def _gradient(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, size: int) -> np.ndarray:
    """A linear ramp from colour `a` to `b` in a random direction, size x size x 3 float."""
    angle = rng.uniform(0, 2 * np.pi)
    c = np.arange(size) / (size - 1) - 0.5
    ramp = np.cos(angle) * c[None, :] + np.sin(angle) * c[:, None]
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    return a * (1 - ramp[..., None]) + b * ramp[..., None]


def training_background(rng: np.random.Generator, name: str, size: int = SIZE) -> np.ndarray:
    """A named background as training draws it: jittered, plain or a gentle gradient."""
    base = np.asarray(BACKGROUNDS[name], np.float64)
    a = np.clip(base + rng.uniform(-JITTER, JITTER, 3), 0, 255)
    if rng.random() < 0.5:
        return np.broadcast_to(a, (size, size, 3)).copy()
    b = np.clip(base + rng.uniform(-JITTER, JITTER, 3), 0, 255)
    return _gradient(rng, a, b, size)


def unseen_background(
    rng: np.random.Generator, avoid: list[str], size: int = SIZE
) -> np.ndarray:
    """A test background: a gradient with grain between two photo-like colours, both at least
    MIN_CONTRAST from every colour in `avoid` (the colours a test will ask for)."""
    names = [n for n in PHOTO if all(contrast(PHOTO[n], COLOURS[c]) >= MIN_CONTRAST for c in avoid)]
    a, b = (PHOTO[n] for n in rng.choice(names, 2, replace=len(names) < 2))
    return grainy(rng, a, b, size)


def grainy(rng: np.random.Generator, a: tuple, b: tuple, size: int = SIZE) -> np.ndarray:
    """A gradient from colour `a` to `b` in a random direction, with grain (GRAIN)."""
    ramp = _gradient(rng, np.asarray(a, np.float64), np.asarray(b, np.float64), size)
    return np.clip(ramp + rng.normal(0, GRAIN, (size, size, 1)), 0, 255)


def backgrounds_for(colours: list[str]) -> list[str]:
    """The named backgrounds every one of `colours` stands out on."""
    return [
        n for n, bg in BACKGROUNDS.items()
        if all(contrast(bg, COLOURS[c]) >= MIN_CONTRAST for c in colours)
    ]  # fmt: skip


def training_shape(
    rng: np.random.Generator, colour: str | None = None, kind: str | None = None,
    size: int = SIZE,
) -> Shape:  # fmt: skip
    """A shape inside the picture, centred where training may put one (`allowed`)."""
    colour = colour if colour is not None else str(rng.choice(list(COLOURS)))
    kind = kind if kind is not None else str(rng.choice(SHAPES))
    while True:
        r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS) * size / SIZE)
        cx, cy = rng.uniform(r, size - r, size=2)
        if allowed(cx, cy, size):
            return Shape(kind, colour, float(cx), float(cy), r)


def draw(
    rng: np.random.Generator, p_empty: float = 0.15, p_second: float = 0.2, size: int = SIZE
) -> tuple[np.ndarray, str, str]:
    """A training picture (uint8 size x size x 3), its objects' caption ("a red circle", "" for
    none) and its background's name."""
    shapes: list[Shape] = []
    if rng.random() >= p_empty:
        shapes.append(training_shape(rng, size=size))
        if rng.random() < p_second:
            taken = coverage(shapes[0], size) > 0
            for _ in range(30):  # a second shape only where it does not touch the first
                s = training_shape(rng, size=size)
                if s.colour != shapes[0].colour and not (taken & (coverage(s, size) > 0)).any():
                    shapes.append(s)
                    break
    names = backgrounds_for([s.colour for s in shapes])
    name = str(rng.choice(names))
    picture = render(shapes, training_background(rng, name, size), size)
    return picture, " and ".join(s.caption for s in shapes), name


def caption(objects: str, background: str, rng: np.random.Generator) -> str:
    """A training caption: objects with the background (70%), the objects alone (20%: the
    prompts name no background), or the background alone for a picture without objects."""
    if not objects:
        return f"a {background} background"
    return f"{objects} on a {background} background" if rng.random() < 0.78 else objects


def test_box(rng: np.random.Generator, size: int = SIZE) -> tuple[int, int, int]:
    """A square selection (x, y, side) whose centre lies in the corner training never centres
    a shape in, at least 6 px (at 64) inside it."""
    side = int(rng.integers(size * 3 // 8, size * 7 // 16 + 1))  # 24..28 px at 64
    low = size * 17 // 32  # 34 at 64: the box's centre at least 46
    x, y = (int(v) for v in rng.integers(low, size - side + 1, size=2))
    return x, y, side


def codec_picture(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A picture for the VAE only: a gradient between two random colours with random grain, and
    up to two shapes anywhere."""
    a, b = (tuple(rng.integers(0, 256, 3)) for _ in range(2))
    ramp = _gradient(rng, np.asarray(a, np.float64), np.asarray(b, np.float64), size)
    background = np.clip(ramp + rng.normal(0, rng.uniform(0, 2 * GRAIN), (size, size, 1)), 0, 255)
    shapes = []
    for _ in range(int(rng.integers(0, 3))):
        r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS) * size / SIZE)
        cx, cy = rng.uniform(r, size - r, size=2)
        shapes.append(Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), cx, cy, r))
    return render(shapes, background, size)
