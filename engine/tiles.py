"""Detail at any size: a second, low-noise pass over a canvas larger than the model's.

The base edit runs on a canvas of about the model's pixel count (engine/region.py). A large
selection enlarged from it comes back soft, so the refinement enlarges each variant's prediction
to the context box's own resolution (up to a cap), noises it back `refine_steps` of the schedule
and denoises it again with the same sampler and the same blend against the noised source
(engine/sampler.py), the UNet running on overlapping tiles of its own size whose outputs are
fused at every step: MultiDiffusion (Bar-Tal et al., ICML 2023).

The fusion averages the UNet's outputs, not the tiles' steps: a DDPM or DDIM step is linear in
the predicted noise, so the two are the same for the mean (the learnt variance is averaged in log
space). Each tile's weight fades linearly over the overlap towards its inner edges, so a tile's
own bias never shows as a step where the next tile takes over.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from guided_diffusion.gaussian_diffusion import GaussianDiffusion

from engine import region
from engine.guidance import Guide
from engine.sampler import blended_diffusion

MIN_GAIN = 1.5  # refine when the refinement canvas's side is at least this x the base canvas's


def refine_canvas(
    box: region.Box, base: tuple[int, int], native: int, factor: int, cap: float
) -> tuple[int, int] | None:
    """The refinement canvas (width, height) for the context `box`: the box's own pixel count,
    its side at most `cap` x the model's `native` side (0: no cap); None when it would not be
    MIN_GAIN x the `base` canvas's side (the base edit is then already about as sharp)."""
    side = math.sqrt(box.w * box.h)
    if cap:
        side = min(side, cap * native)
    canvas = region.canvas_size(box, round(side), factor)
    if canvas[0] * canvas[1] < MIN_GAIN**2 * base[0] * base[1]:
        return None
    return canvas


def starts(length: int, tile: int, overlap: float) -> list[int]:
    """Where tiles of `tile` pixels start to cover `length`, evenly spread, neighbours sharing at
    least `overlap` x tile pixels."""
    if length <= tile:
        return [0]
    stride = max(1, tile - math.ceil(overlap * tile))
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def count(canvas: tuple[int, int], tile: int, overlap: float) -> int:
    """The UNet forwards `Tiled` makes a step over `canvas` (width, height) with square tiles."""
    return len(starts(canvas[0], tile, overlap)) * len(starts(canvas[1], tile, overlap))


def ramp(tile: int, overlap: float) -> torch.Tensor:
    """A tile's weight along one side: 1 in the middle, falling linearly over the overlap (at
    most half the tile) to 1 / overlap pixels at its edges (never 0: a canvas border is covered
    by one tile only)."""
    width = max(1, min(math.ceil(overlap * tile), tile // 2))
    i = torch.arange(tile)
    return torch.minimum(torch.minimum(i + 1, tile - i), torch.tensor(width)) / width


class Tiled:
    """The UNet (any callable `unet(x, t, **kwargs)`) over a canvas of any size: run on each tile
    of `tile` = (height, width) pixels and fused by weight. A canvas no larger than one tile runs
    as it is. Each tile is its own forward, so a hook on the UNet sees every one (cancel)."""

    def __init__(self, unet: Callable, tile: tuple[int, int], overlap: float) -> None:
        self.unet, self.tile, self.overlap = unet, tile, overlap

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        height, width = x.shape[-2:]
        th, tw = min(self.tile[0], height), min(self.tile[1], width)
        if (th, tw) == (height, width):
            return self.unet(x, t, **kwargs)
        weight = (ramp(th, self.overlap)[:, None] * ramp(tw, self.overlap)[None]).to(x.device)
        out, total = None, x.new_zeros(height, width)
        for y in starts(height, th, self.overlap):
            for x0 in starts(width, tw, self.overlap):
                part = self.unet(x[..., y : y + th, x0 : x0 + tw], t, **kwargs)
                if out is None:
                    out = part.new_zeros(*part.shape[:2], height, width)
                out[..., y : y + th, x0 : x0 + tw] += part * weight.to(part.dtype)
                total[y : y + th, x0 : x0 + tw] += weight
        return out / total


def refine(
    unet: Callable,
    diffusion: GaussianDiffusion,
    guide: Guide,
    source: torch.Tensor,
    mask: torch.Tensor,
    edits: torch.Tensor,
    prompt: str,
    generators: Sequence[torch.Generator],
    *,
    steps: int,
    tile: tuple[int, int],
    overlap: float,
    clip_weight: float = 0.0,
    **sampler: object,
) -> torch.Tensor:
    """The refinement of `edits` (Nx3xhxw, the base pass's predictions) on the canvas of
    `source` (1x3xHxW) inside the hard `mask` (1x1xHxW): enlarged, noised to the last `steps`
    of `diffusion`'s schedule and denoised over tiles of `tile` (height, width), blended with the
    noised source at every step. `clip_weight` > 0 guides the pass in fast mode (the UNet's
    output taken as a constant: no tile's activations kept for a backward); the other keywords
    go to `blended_diffusion` (sampler, batch, callback, `seen`: the selection's alpha on this
    canvas, which CLIP judges through)."""
    start = F.interpolate(edits, size=source.shape[-2:], mode="bicubic").clamp(-1, 1)
    start = start * mask + source * (1 - mask)
    return blended_diffusion(
        Tiled(unet, tile, overlap),
        diffusion,
        guide,
        source,
        mask,
        prompt,
        generators,
        skip=diffusion.num_timesteps - steps,
        clip_weight=clip_weight,
        range_weight=0.0,
        guidance_mode="fast",
        start=start,
        **sampler,
    )
