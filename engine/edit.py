"""One edit job: picture + selection + prompt -> ranked variants, each a layer over the selection.

Used by the command line and the server alike; knows nothing of files or sockets.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine import accel, region
from engine.guidance import Guide
from engine.models import Models
from engine.sampler import blended_diffusion

SAMPLERS = ("ddpm", "ddim")
GUIDANCE_MODES = ("full", "fast")
MAX_SHAPING = 1000  # the largest grow or feather, in pixels


@dataclass
class EditSettings:
    variants: int = 4
    seed: int | None = None  # None: a random seed, reported back
    steps: int = 100
    skip: int = 25
    guidance_weight: float | None = None  # lambda_clip; None: the model's default for the mode
    range_weight: float = 50.0
    augmentations: int = 8
    sampler: str = "ddpm"
    guidance_mode: str = "full"
    guidance_every: int = 1  # guide one step in N: faster, further from the paper
    padding: float = 0.25  # context on each side, as a fraction of the selection's size
    grow: int = 0  # pixels the selection grows by before the edit
    feather: int = 0  # pixels of feathering added to the (hard) selection's edge
    precision: str = "auto"  # engine/accel.py: bf16 on CPUs that compute it natively, fp16 on CUDA
    recompute: str = "auto"  # drop UNet activations and recompute them when memory is short

    def check(self) -> None:
        if not 1 <= self.variants <= 64:
            raise region.RegionError(f"variants must be 1 to 64, got {self.variants}")
        if not 0 <= self.skip < self.steps:
            raise region.RegionError(
                f"skip must be 0 to steps - 1 ({self.steps - 1}), got {self.skip}"
            )
        if self.augmentations < 1:
            raise region.RegionError("augmentations must be at least 1")
        if self.sampler not in SAMPLERS:
            raise region.RegionError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.guidance_mode not in GUIDANCE_MODES:
            raise region.RegionError(f"guidance mode must be one of {GUIDANCE_MODES}")
        for name in ("grow", "feather"):
            if not 0 <= getattr(self, name) <= MAX_SHAPING:
                raise region.RegionError(f"{name} must be 0 to {MAX_SHAPING} pixels")
        if self.guidance_every < 1:
            raise region.RegionError("guidance_every must be at least 1")
        if self.precision not in accel.PRECISIONS:
            raise region.RegionError(f"precision must be one of {accel.PRECISIONS}")
        if self.recompute not in accel.RECOMPUTE:
            raise region.RegionError(f"recompute must be one of {accel.RECOMPUTE}")


@dataclass
class Variant:
    rank: int  # 1 = closest to the prompt
    box: region.Box  # where `rgba` sits in the image
    rgba: np.ndarray  # h x w x 4 uint8: the edit, alpha = the selection
    distance: float  # CLIP distance of the masked result to the prompt (lower is closer)
    seed: int


def _generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def run_edit(
    models: Models,
    image: np.ndarray,
    mask: np.ndarray,
    prompt: str,
    settings: EditSettings,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Variant]:
    """Edit `image` (HxWx3|4 uint8) inside `mask` (HxW uint8, soft edges allowed).

    The model edits every pixel the selection touches; each variant's layer carries the
    selection's alpha (grown and feathered as the settings ask), so composited it gives
    alpha x edit + (1 - alpha) x source. Transparent pixels reach the model over mid-grey.

    Variant i uses seed + i for its noise; augmentations draw from seed, so (seed, variants)
    reproduces a run. `on_step(done, total)` follows the denoising; raising in it aborts.
    """
    settings.check()
    region.check_inputs(image, mask)
    seed = settings.seed if settings.seed is not None else random.randrange(2**31)
    mask = region.shape_selection(mask, settings.grow, settings.feather)
    sel = region.selection_bounds(mask)
    box = region.context_box(mask, settings.padding)
    dev = models.device
    canvas = region.canvas_size(box, models.config.image_size, models.downsampling)
    rgb, m = region.to_model(image, mask, box, canvas)
    source = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(dev)
    mask_t = torch.from_numpy(m)[None, None].to(dev)
    seeds = [seed + i for i in range(settings.variants)]
    guide = Guide(models.clip, settings.augmentations)
    devices = [dev] if dev.type == "cuda" else []
    precision = accel.resolve_precision(settings.precision, dev)
    recompute = accel.resolve_recompute(
        settings.recompute, models.config.arch, settings.variants, precision, dev
    )
    with (
        torch.random.fork_rng(devices=devices),
        accel.autocast(dev, accel.clip_precision(precision, dev)),
        accel.recompute(models.unet, recompute),
    ):
        torch.manual_seed(seed)
        out = blended_diffusion(
            accel.in_precision(models.unet, dev, precision),
            models.diffusion(settings.steps),
            guide,
            source,
            mask_t,
            prompt,
            _generators(seeds, dev),
            skip=settings.skip,
            clip_weight=(
                settings.guidance_weight
                if settings.guidance_weight is not None
                else models.config.guidance_weight(settings.guidance_mode)
            ),
            range_weight=settings.range_weight,
            sampler=settings.sampler,
            guidance_mode=settings.guidance_mode,
            guidance_every=settings.guidance_every,
            class_cond=models.config.class_cond,
            callback=(lambda done, total, _x0: on_step(done, total)) if on_step else None,
        )
    out = out.float().clamp(-1, 1)
    dists = guide.rank_distance(out * mask_t, prompt).tolist()
    results = out.permute(0, 2, 3, 1).cpu().numpy()
    order = sorted(range(len(seeds)), key=lambda i: dists[i])
    return [
        Variant(
            rank=r,
            box=sel,
            rgba=region.layer_pixels(region.from_model(results[i], box, sel), mask, sel),
            distance=dists[i],
            seed=seeds[i],
        )
        for r, i in enumerate(order, 1)
    ]
