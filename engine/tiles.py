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
own bias never shows as a step where the next tile takes over. Only the tiles that touch the
selection run (engine/shared/geometry.py plans them): the blend throws the rest away.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from guided_diffusion.gaussian_diffusion import GaussianDiffusion

from engine.guidance import Guide
from engine.sampler import blended_diffusion
from engine.shared.geometry import Canvas, Rect


def ramp(tile: int, overlap: float) -> torch.Tensor:
    """A tile's weight along one side: 1 in the middle, falling linearly over the overlap (at
    most half the tile) to 1 / overlap pixels at its edges (never 0: a canvas border is covered
    by one tile only)."""
    width = max(1, min(math.ceil(overlap * tile), tile // 2))
    i = torch.arange(tile)
    return torch.minimum(torch.minimum(i + 1, tile - i), torch.tensor(width)) / width


class Tiled:
    """The UNet (any callable `unet(x, t, **kwargs)`) over a canvas of any size: run on each of
    `tiles` (canvas rectangles) and fused by weight. A canvas no larger than its one tile runs
    as it is. Each tile is its own forward, so a hook on the UNet sees every one (cancel).
    Pixels no tile covers (outside the selection: the blend replaces them) predict 0."""

    def __init__(self, unet: Callable, tiles: Sequence[Rect], overlap: float) -> None:
        self.unet, self.tiles, self.overlap = unet, tiles, overlap
        # the tiles' weights and their sum over the canvas: the same at every step
        self._fusion: tuple[tuple, dict[tuple[int, int], torch.Tensor], torch.Tensor] | None = None

    def _weights(self, x: torch.Tensor) -> tuple[dict[tuple[int, int], torch.Tensor], torch.Tensor]:
        """Each tile size's weight and the weights' sum (never 0), on `x`'s canvas and device."""
        key = (tuple(x.shape[-2:]), x.device)
        if self._fusion is None or self._fusion[0] != key:
            ramps = {(r.height, r.width) for r in self.tiles}
            weights = {(h, w): (ramp(h, self.overlap)[:, None] * ramp(w, self.overlap)[None])
                       .to(x.device) for h, w in ramps}  # fmt: skip
            total = x.new_zeros(x.shape[-2:])
            for r in self.tiles:
                total[r.y : r.y + r.height, r.x : r.x + r.width] += weights[r.height, r.width]
            self._fusion = key, weights, total.clamp(min=1e-6)
        return self._fusion[1], self._fusion[2]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        height, width = x.shape[-2:]
        if len(self.tiles) == 1 and (self.tiles[0].width, self.tiles[0].height) == (width, height):
            return self.unet(x, t, **kwargs)
        weights, total = self._weights(x)
        out = None
        for r in self.tiles:
            y0, y1, x0, x1 = r.y, r.y + r.height, r.x, r.x + r.width
            part = self.unet(x[..., y0:y1, x0:x1], t, **kwargs)
            if out is None:
                out = part.new_zeros(*part.shape[:2], height, width)
            out[..., y0:y1, x0:x1] += part * weights[r.height, r.width].to(part.dtype)
        return out / total


def refine(
    unet: Callable,
    diffusion: GaussianDiffusion,
    guide: Guide,
    source: torch.Tensor,
    mask: torch.Tensor,
    edits: torch.Tensor,
    canvases: tuple[Canvas, Canvas],
    prompt: str,
    generators: Sequence[torch.Generator],
    *,
    steps: int,
    tiles: Sequence[Rect],
    overlap: float,
    clip_weight: float = 0.0,
    **sampler: object,
) -> torch.Tensor:
    """The refinement of `edits` (Nx3xhxw, the base pass's predictions on the first of
    `canvases`) on the second, that of `source` (1x3xHxW) inside the hard `mask` (1x1xHxW):
    enlarged, noised to the last `steps` of `diffusion`'s schedule and denoised over `tiles`
    (those touching the selection), blended with the
    noised source at every step. `clip_weight` > 0 guides the pass in fast mode (the UNet's
    output taken as a constant: no tile's activations kept for a backward); the other keywords
    go to `blended_diffusion` (sampler, batch, callback, `seen`: the selection's alpha on this
    canvas, which CLIP judges through)."""
    (base_w, base_h), (fine_w, fine_h) = (c.content for c in canvases)
    start = F.interpolate(edits[..., :base_h, :base_w], size=(fine_h, fine_w), mode="bicubic")
    pad = (0, source.shape[-1] - fine_w, 0, source.shape[-2] - fine_h)
    start = F.pad(start.clamp(-1, 1), pad)  # the padding is outside the mask: the source's
    start = start * mask + source * (1 - mask)
    return blended_diffusion(
        Tiled(unet, tiles, overlap),
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
