"""One edit job: picture + selection + prompt -> ranked variants, each a layer over the selection.

Used by the command line and the server alike; knows nothing of files or sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from engine.shared import geometry, request
from engine.shared.geometry import Canvas, Rect, Refinement
from engine.shared.request import Settings

# what a step reports: (done, total, previews), where previews(max_side) renders the variants'
# current estimates on demand (engine/preview.py), so a step nobody previews costs nothing more
StepReport = Callable[[int, int, Callable[[int], list[Preview]]], None]


@dataclass
class Variant:
    rank: int  # 1 = closest to the prompt
    box: Rect  # where `rgba` sits in the image
    rgba: np.ndarray  # h x w x 4 uint8: the edit, alpha = the selection
    distance: float  # CLIP distance of the masked result to the prompt (lower is closer)
    seed: int


class Diverged(ValueError):
    """The edit produced NaN or infinite values; the message names the likely setting."""


def _diverged(settings: Settings, default_weight: float, where: str) -> Diverged:
    """Name the settings far above their defaults: what made the guidance blow up."""
    weights = {
        "guidance_weight": (settings.guidance_weight, default_weight),
        "range_weight": (settings.range_weight, Settings.range_weight),
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
    image: np.ndarray, mask: np.ndarray, canvas: Canvas, dev
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The context box on a canvas as the sampler takes it: source 1x3xHxW, hard mask 1x1xHxW
    and the selection's alpha 1x1xHxW that CLIP judges through (region.seen_on_canvas)."""
    rgb, m = region.to_model(image, mask, canvas)
    source = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous().to(dev)
    seen = torch.from_numpy(region.seen_on_canvas(mask, canvas))[None, None].to(dev)
    return source, torch.from_numpy(m)[None, None].to(dev), seen


@dataclass(frozen=True)
class Plan:
    """What an edit will do, worked out from the selection before it runs (the memory budget,
    the step total and the time estimate read it; the edit follows it)."""

    settings: Settings
    canvas: Canvas  # the context box on the model's canvas
    refinement: Refinement | None  # None: no refinement pass

    @property
    def total(self) -> int:
        return self.settings.total_steps(self.refinement is not None)

    @property
    def refine_tiles(self) -> int:
        """The UNet forwards a step of the refinement makes (0: no pass), for the estimates."""
        return len(self.refinement.tiles) if self.refinement else 0

    def to_json(self) -> dict:
        box = self.canvas.box
        return {
            "context_box": [box.x, box.y, box.width, box.height],
            "model_canvas": list(self.canvas.size),
            "scale": [round(s, 6) for s in self.canvas.scale],
            "refine": self.refinement.to_json() if self.refinement else None,
        }


def plan(native: int, factor: int, mask: np.ndarray, settings: Settings) -> Plan:
    """The plan of the edit inside `mask` on a model of `native` side and downsampling
    `factor`: the box around the selection as grow and feather will shape it, its canvas, and
    the refinement over the tiles that touch it."""
    box = region.context_box(mask, settings.padding, settings.grow, settings.feather)
    canvas = geometry.canvas_for(box, native, factor)
    fine = None
    if settings.refine:
        reach = geometry.shaping_reach(settings.grow, settings.feather)
        fine = geometry.refinement(
            canvas, native, factor, cap=settings.refine_cap, overlap=settings.refine_overlap,
            steps=settings.refine_steps, base_steps=settings.steps_run,
            touches=region.selected_within(mask, reach),
        )  # fmt: skip
    return Plan(settings, canvas, fine)


def run_edit(
    models: Models,
    image: np.ndarray,
    mask: np.ndarray,
    prompt: str,
    settings: Settings,
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
    settings = request.check(dataclasses.asdict(settings))
    region.check_inputs(image, mask)
    check()
    seed = settings.seed if settings.seed is not None else random.randrange(2**31)
    # from the selection as it will be shaped: what the memory budget costed
    planned = plan(models.config.image_size, models.downsampling, mask, settings)
    canvas, fine = planned.canvas, planned.refinement
    mask = region.shape_selection(mask, settings.grow, settings.feather)
    sel = region.selection_bounds(mask)
    dev = models.device
    source, mask_t, seen = _on_canvas(image, mask, canvas, dev)
    seeds = [seed + i for i in range(settings.variants)]
    guide = Guide(models.clip, settings.augmentations)
    previewer = Previewer(guide, prompt, image, mask, canvas, sel, seen, seeds)
    precision = devices.resolve_precision(settings.precision, dev)
    batch = min(settings.batch, settings.variants)
    recompute = accel.resolve_recompute(
        settings.recompute, models.config.arch, batch, precision, dev
    )
    default_weight = models.config.guidance_weight(settings.guidance_mode)
    clip_weight = (
        settings.guidance_weight if settings.guidance_weight is not None else default_weight
    )

    base_steps, total = settings.steps_run, planned.total

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
            skip=settings.start,
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
            source, mask_t, seen = _on_canvas(image, mask, fine.canvas, dev)
            previewer = Previewer(guide, prompt, image, mask, fine.canvas, sel, seen, seeds)
            out = tiles.refine(
                unet, diffusion, guide, source, mask_t, out, (canvas, fine.canvas), prompt,
                generators,
                steps=settings.refine_steps, tiles=fine.tiles,
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
        edited = region.from_model(results[i], fine.canvas if fine else canvas, sel)
        rgba = region.layer_pixels(edited, mask, sel)
        variants.append(Variant(rank=r, box=sel, rgba=rgba, distance=dists[i], seed=seeds[i]))
    return variants
