"""The end of either method's edit: the finished canvases ranked by CLIP and brought back to the
picture as the variants' layers."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from engine import region
from engine.guidance import Guide
from engine.methods import Variant
from engine.shared.geometry import Canvas, Rect


def ranked(
    guide: Guide,
    prompt: str,
    out: torch.Tensor,
    seen: torch.Tensor,
    canvas: Canvas,
    mask: np.ndarray,
    sel: Rect,
    seeds: list[int],
    check: Callable[[], None],
    diverged: Callable[[str], Exception],
) -> list[Variant]:
    """`out` (N x 3 x H x W in [-1, 1] on `canvas`) as variants, best first: each ranked by
    what the artist will see (through the selection's alpha on the canvas, `seen`), one at a
    time so a cancel is seen in ranking, then resampled to the picture's scale over `sel` with
    the selection's alpha (`mask`, as edited). A distance that is not finite raises
    `diverged(where)`."""
    dists = []
    for one in out * seen:
        check()
        dists += guide.rank_distance(one[None], prompt).tolist()
    if not all(map(math.isfinite, dists)):
        raise diverged("in the CLIP distances")
    results = out.permute(0, 2, 3, 1).cpu().numpy()
    order = sorted(range(len(seeds)), key=lambda i: dists[i])
    variants = []
    for r, i in enumerate(order, 1):
        check()
        rgba = region.layer_pixels(region.from_model(results[i], canvas, sel), mask, sel)
        variants.append(Variant(rank=r, box=sel, rgba=rgba, distance=dists[i], seed=seeds[i]))
    return variants
