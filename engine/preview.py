"""A variant's picture mid-edit: its x0 estimate as the artist would see the edit, small.

The sampler predicts each variant's final picture (x0) at every step. A preview is that estimate
over the selection's bounding box, composited through the selection's alpha over the source (as
the result layer would be), at most `max_side` pixels on its longer side, with a CLIP distance so
a host can show the best so far: the step's own guidance distance when the step was guided (free:
the guidance computed it), else the distance the final ranking uses (one CLIP forward per
variant). The source and alpha at preview scale are made once per size; a preview then costs a
resample of the small canvas and a PNG encode.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine import region
from engine.guidance import Guide
from engine.shared.geometry import Canvas, Rect


@dataclass
class Preview:
    variant: int  # index in seed order (the seed is the job's + variant)
    seed: int
    rgba: np.ndarray  # h x w x 4 uint8: the selection's box, composited over the source
    distance: float | None  # CLIP distance of the estimate (None: NaN)
    box: Rect  # what it shows: the selection's bounds in the picture, at image scale


def size_for(box: Rect, max_side: int) -> tuple[int, int]:
    """(width, height) of a preview of `box`: its shape, at most `max_side`, never enlarged."""
    scale = min(1.0, max_side / max(box.width, box.height))
    return max(1, round(box.width * scale)), max(1, round(box.height * scale))


class Previewer:
    """Renders a step's x0 (N x 3 x H x W on the model's canvas) as one Preview per variant."""

    def __init__(
        self,
        guide: Guide,
        prompt: str,
        image: np.ndarray,
        mask: np.ndarray,
        canvas: Canvas,
        sel: Rect,
        seen: torch.Tensor,
        seeds: list[int],
    ) -> None:
        """`mask`: the selection as edited (grown, feathered) at image scale; `seen` its alpha
        on the canvas, what the final ranking judges through (region.seen_on_canvas); `canvas`
        the context box on the model's canvas, `sel` the selection's bounds."""
        self.guide, self.prompt, self.image, self.mask = guide, prompt, image, mask
        self.canvas, self.sel, self.seen, self.seeds = canvas, sel, seen, seeds
        self._under: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # max_side -> source, alpha

    def _source(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """The source's RGBA and the selection's alpha (0..1) over `sel` at preview scale."""
        if max_side not in self._under:
            s, size = self.sel, size_for(self.sel, max_side)
            patch = self.image[s.y : s.y + s.height, s.x : s.x + s.width]
            alpha = Image.fromarray(self.mask[s.y : s.y + s.height, s.x : s.x + s.width].copy())
            if patch.shape[2] == 3:
                patch = np.concatenate([patch, np.full_like(patch[..., :1], 255)], axis=2)
            rgba = Image.fromarray(np.ascontiguousarray(patch)).resize(size, Image.Resampling.BOX)
            alpha = alpha.resize(size, Image.Resampling.BOX)
            self._under[max_side] = (
                np.asarray(rgba, np.float32),
                np.asarray(alpha, np.float32)[..., None] / 255,
            )
        return self._under[max_side]

    def __call__(
        self, x0: torch.Tensor, max_side: int, guided: torch.Tensor | None = None
    ) -> list[Preview]:
        """`guided`: the step's guidance distances per variant (Guide.take_seen), if any."""
        under, alpha = self._source(max_side)
        size = under.shape[1::-1]
        x0 = x0.detach().float().clamp(-1, 1)
        if guided is None or len(guided) != len(x0):
            guided = self.guide.rank_distance(x0 * self.seen, self.prompt)
        dists = guided.float().tolist()
        canvases = x0.permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for i, (x0_i, dist) in enumerate(zip(canvases, dists, strict=True)):
            edit = region.from_model(x0_i, self.canvas, self.sel, size).astype(np.float32)
            rgba = under * (1 - alpha)
            rgba[..., :3] += edit * alpha
            rgba[..., 3:] += 255 * alpha
            dist = dist if math.isfinite(dist) else None
            picture = (rgba + 0.5).astype(np.uint8)
            out.append(Preview(i, self.seeds[i], picture, dist, self.sel))
        return out


def encode_png(rgba: np.ndarray) -> bytes:
    """A preview as PNG bytes (fast compression: a preview must not slow a step)."""
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()
