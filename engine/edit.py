"""One edit job: picture + selection + prompt -> ranked variants, each a layer over the selection.

Used by the command line and the server alike; knows nothing of files or sockets.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from engine import accel, devices, region, tiles
from engine.guidance import Guide
from engine.models import Models
from engine.preview import Preview, Previewer
from engine.sampler import StepCallback, blended_diffusion

# what a step reports: (done, total, previews), where previews(max_side) renders the variants'
# current estimates on demand (engine/preview.py), so a step nobody previews costs nothing more
StepReport = Callable[[int, int, Callable[[int], list[Preview]]], None]

SAMPLERS = ("ddpm", "ddim")
GUIDANCE_MODES = ("full", "fast")
MAX_SHAPING = 1000  # the largest grow or feather, in pixels
MAX_REFINE_CAP = 16  # the largest refinement canvas side, in model sides
MAX_REFINE_GUIDANCE = 10  # the refinement's largest guidance, as a share of the edit's


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
    precision: str = "auto"  # engine/devices.py: what the device computes natively
    recompute: str = "auto"  # drop UNet activations and recompute them when memory is short
    # variants through the models together: 1 makes a variant's seed reproduce it alone, needs
    # one variant's memory and costs nothing on a CPU (a batch of 1 already fills its cores)
    batch: int = 1
    # the refinement pass (engine/tiles.py) for a context box larger than the model's canvas:
    # `refine_strength` of the schedule's noise levels denoised again at the box's resolution,
    # its side capped at `refine_cap` x the model's (0: the image's own scale), over tiles
    # sharing `refine_overlap` of their side (defaults measured in the demo world, README);
    # `refine_guidance`: its CLIP guidance as a share of the edit's, in fast mode (a backward
    # through every tile would keep all their activations); 0: unguided
    refine: bool = True  # in the demo world it narrowed every clean edge, adding nothing (README)
    refine_strength: float = 0.1
    refine_overlap: float = 0.5  # 0.25 narrowed edges less evenly (README)
    refine_cap: float = 0.0
    refine_guidance: float = 0.0

    @property
    def refine_steps(self) -> int:
        return max(1, round(self.refine_strength * self.steps))

    def check(self) -> None:
        if not 1 <= self.variants <= 64:
            raise region.RegionError(f"variants must be 1 to 64, got {self.variants}")
        if self.steps < 2:  # guided_diffusion's posterior variance needs two timesteps
            raise region.RegionError(f"steps must be at least 2, got {self.steps}")
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
        if self.batch < 1:
            raise region.RegionError("batch must be at least 1")
        for name in ("grow", "feather"):
            if not 0 <= getattr(self, name) <= MAX_SHAPING:
                raise region.RegionError(f"{name} must be 0 to {MAX_SHAPING} pixels")
        if self.guidance_every < 1:
            raise region.RegionError("guidance_every must be at least 1")
        if self.precision not in devices.PRECISIONS:
            raise region.RegionError(f"precision must be one of {devices.PRECISIONS}")
        if self.recompute not in accel.RECOMPUTE:
            raise region.RegionError(f"recompute must be one of {accel.RECOMPUTE}")
        if not 0 < self.refine_strength <= 1:
            raise region.RegionError("refine_strength must be over 0 and at most 1")
        if not 0 <= self.refine_overlap <= 0.75:
            raise region.RegionError("refine_overlap must be 0 to 0.75 of a tile's side")
        if self.refine_cap and not 1 <= self.refine_cap <= MAX_REFINE_CAP:
            raise region.RegionError(
                f"refine_cap must be 0 (the image's own scale) or 1 to {MAX_REFINE_CAP}"
            )
        if not 0 <= self.refine_guidance <= MAX_REFINE_GUIDANCE:
            raise region.RegionError(f"refine_guidance must be 0 to {MAX_REFINE_GUIDANCE}")


@dataclass
class Variant:
    rank: int  # 1 = closest to the prompt
    box: region.Box  # where `rgba` sits in the image
    rgba: np.ndarray  # h x w x 4 uint8: the edit, alpha = the selection
    distance: float  # CLIP distance of the masked result to the prompt (lower is closer)
    seed: int


class Diverged(ValueError):
    """The edit produced NaN or infinite values; the message names the likely setting."""


def _diverged(settings: EditSettings, default_weight: float, where: str) -> Diverged:
    """Name the settings far above their defaults: what made the guidance blow up."""
    weights = {
        "guidance_weight": (settings.guidance_weight, default_weight),
        "range_weight": (settings.range_weight, EditSettings.range_weight),
    }
    high = sorted(
        ((v / max(d, 1e-9), k, v, d) for k, (v, d) in weights.items() if v and v > 10 * d),
        reverse=True,
    )
    if high:
        blame = " and ".join(f"{k} {v:g} (default {d:g})" for _, k, v, d in high)
        advice = f"lower {blame}"
    else:
        advice = "lower guidance_weight or range_weight, or use more steps"
    return Diverged(f"the edit diverged (NaN or infinite values {where}): {advice}")


@contextlib.contextmanager
def _checked_forwards(models: Models, check: Callable[[], None]) -> Iterator[None]:
    """Call `check` before every UNet and CLIP image forward, so a cancel stops within one."""
    hooks = [
        m.register_forward_pre_hook(lambda *_: check())
        for m in (models.unet, models.clip.model.visual)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _on_canvas(
    image: np.ndarray, mask: np.ndarray, box: region.Box, canvas: tuple[int, int], dev
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The context box on a canvas as the sampler takes it: source 1x3xHxW, hard mask 1x1xHxW
    and the selection's alpha 1x1xHxW that CLIP judges through (region.seen_on_canvas)."""
    rgb, m = region.to_model(image, mask, box, canvas)
    source = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous().to(dev)
    seen = torch.from_numpy(region.seen_on_canvas(mask, box, canvas))[None, None].to(dev)
    return source, torch.from_numpy(m)[None, None].to(dev), seen


def refinement(
    settings: EditSettings, box: region.Box, native: int, factor: int
) -> tuple[int, int] | None:
    """The refinement pass's canvas for the context `box` with the model's `native` side and
    downsampling `factor`; None: no pass."""
    if not settings.refine:
        return None
    base = region.canvas_size(box, native, factor)
    return tiles.refine_canvas(box, base, native, factor, settings.refine_cap)


def refine_tiles(settings: EditSettings, box: region.Box, native: int, factor: int) -> int:
    """The UNet forwards a step of the refinement pass makes for the context `box` (0: no
    pass): what its steps cost, for the time estimates."""
    fine = refinement(settings, box, native, factor)
    return tiles.count(fine, native, settings.refine_overlap) if fine else 0


def run_edit(
    models: Models,
    image: np.ndarray,
    mask: np.ndarray,
    prompt: str,
    settings: EditSettings,
    on_step: StepReport | None = None,
    check: Callable[[], None] | None = None,
) -> list[Variant]:
    """Edit `image` (HxWx3|4 uint8) inside `mask` (HxW uint8, soft edges allowed).

    The model edits every pixel the selection touches; each variant's layer carries the
    selection's alpha (grown and feathered as the settings ask), so composited it gives
    alpha x edit + (1 - alpha) x source. Transparent pixels reach the model over mid-grey.

    Variant i draws its noise and augmentations from seed + i alone: at batch 1 that seed,
    with variants 1, reproduces the variant's pixels. `on_step(done, total, previews)` follows
    the denoising (`previews(max_side)` renders the variants' estimates at that step);
    `check()` is called before every UNet and CLIP image forward and between the other phases;
    raising in either aborts. Raises Diverged when the sample turns NaN or infinite.
    """
    check = check or (lambda: None)
    settings.check()
    region.check_inputs(image, mask)
    check()
    seed = settings.seed if settings.seed is not None else random.randrange(2**31)
    # the box from the selection as it will be shaped: the one the memory budget costed
    box = region.context_box(mask, settings.padding, settings.grow, settings.feather)
    mask = region.shape_selection(mask, settings.grow, settings.feather)
    sel = region.selection_bounds(mask)
    dev = models.device
    canvas = region.canvas_size(box, models.config.image_size, models.downsampling)
    source, mask_t, seen = _on_canvas(image, mask, box, canvas, dev)
    seeds = [seed + i for i in range(settings.variants)]
    guide = Guide(models.clip, settings.augmentations)
    previewer = Previewer(guide, prompt, image, mask, box, sel, seen, seeds)
    precision = devices.resolve_precision(settings.precision, dev)
    batch = min(settings.batch, settings.variants)
    recompute = accel.resolve_recompute(
        settings.recompute, models.config.arch, batch, precision, dev
    )
    default_weight = models.config.guidance_weight(settings.guidance_mode)
    clip_weight = (
        settings.guidance_weight if settings.guidance_weight is not None else default_weight
    )

    fine = refinement(settings, box, models.config.image_size, models.downsampling)
    base_steps = settings.steps - settings.skip
    total = base_steps + (settings.refine_steps if fine else 0)

    def progress(offset: int, previewer: Previewer) -> StepCallback:  # both passes as one run
        def step(done: int, _: int, x0: torch.Tensor) -> None:
            if not torch.isfinite(x0).all():
                raise _diverged(settings, default_weight, f"at step {offset + done} of {total}")
            distances = guide.take_seen()  # this step's guidance distances (None: unguided)
            if on_step:
                on_step(offset + done, total, lambda side: previewer(x0, side, distances))

        return step

    check()
    unet = accel.in_precision(models.unet, dev, precision)
    diffusion, generators = models.diffusion(settings.steps), devices.generators(seeds, dev)
    sampler = dict(sampler=settings.sampler, class_cond=models.config.class_cond, batch=batch)
    with (
        _checked_forwards(models, check),
        devices.autocast(dev, devices.clip_precision(precision, dev)),
        accel.recompute(models.unet, recompute),
    ):
        out = blended_diffusion(
            unet,
            diffusion,
            guide,
            source,
            mask_t,
            prompt,
            generators,
            skip=settings.skip,
            clip_weight=clip_weight,
            range_weight=settings.range_weight,
            guidance_mode=settings.guidance_mode,
            guidance_every=settings.guidance_every,
            callback=progress(0, previewer),
            seen=seen,
            **sampler,
        )
        if fine:
            check()
            source, mask_t, seen = _on_canvas(image, mask, box, fine, dev)
            previewer = Previewer(guide, prompt, image, mask, box, sel, seen, seeds)
            native = models.config.image_size
            out = tiles.refine(
                unet, diffusion, guide, source, mask_t, out, prompt, generators,
                steps=settings.refine_steps, tile=(native, native),
                overlap=settings.refine_overlap, seen=seen, clip_weight=settings.refine_guidance
                * clip_weight * models.config.guidance_weight("fast") / default_weight,
                callback=progress(base_steps, previewer), **sampler,
            )  # fmt: skip
    out = out.float()
    if not torch.isfinite(out).all():
        raise _diverged(settings, default_weight, "in the result")
    out = out.clamp(-1, 1)
    dists = []
    # ranked by what the artist will see; one variant at a time, so a cancel is seen in ranking
    for one in out * seen:
        check()
        dists += guide.rank_distance(one[None], prompt).tolist()
    if not all(map(math.isfinite, dists)):
        raise _diverged(settings, default_weight, "in the CLIP distances")
    results = out.permute(0, 2, 3, 1).cpu().numpy()
    order = sorted(range(len(seeds)), key=lambda i: dists[i])
    variants = []
    for r, i in enumerate(order, 1):
        check()
        rgba = region.layer_pixels(region.from_model(results[i], box, sel), mask, sel)
        variants.append(Variant(rank=r, box=sel, rgba=rgba, distance=dists[i], seed=seeds[i]))
    return variants
