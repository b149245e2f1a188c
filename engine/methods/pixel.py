"""Blended Diffusion in pixel space (engine/methods: a Method): picture + selection + prompt ->
ranked variants, each a layer over the selection; and what a job will cost before it is queued.

The edit knows nothing of files or sockets: the command line, the server's executors and the demo
run it alike. Its memory estimate comes from the same plan the edit follows (the context box
around the selection as grow and feather will shape it), so it stays true when the box changes.
The parts: the pixels at image scale (the image and mask the job holds while it waits, the box's
part inside the image, one result layer per variant), the batch at model scale, the UNet
activations the guided backward keeps (accel's measured figure, or a tenth of it when recomputed)
and CLIP's augmented copies with the activations their backward keeps. The refinement pass
(engine/tiles.py) comes after them: its canvas's tensors for every variant and one tile's forward
without grad (counted as a recomputed forward: a tenth of the activations). A refusal names the
setting that costs the most.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine import accel, devices, region, tiles
from engine.guidance import Guide
from engine.methods import Diverged, Estimate, Plan, StepReport, Variant
from engine.methods.ranking import ranked
from engine.models import Models, UNetConfig, load_models
from engine.preview import Previewer
from engine.sampler import StepCallback, blended_diffusion
from engine.shared import geometry, request
from engine.shared.geometry import Canvas, Rect
from engine.shared.request import Settings
from engine.steptime import engine_key


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
    planned: Plan | None = None,
) -> list[Variant]:
    """Edit `image` (HxWx3|4 uint8) inside `mask` (HxW uint8, soft edges allowed), as
    `planned` (the plan of this mask and these settings, when admission made it already).

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
    if planned is None:
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
    return ranked(
        guide, prompt, out, seen, fine.canvas if fine else canvas, mask, sel, seeds, check,
        lambda where: _diverged(settings, default_weight, where),
    )  # fmt: skip


# -- what a job will cost ------------------------------------------------------------------------

_GB = 2**30
# Tensors of model-scale size a guided step keeps per variant besides the UNet's activations
# (x_t, x0_hat, mean, variance, noise, gradients, the blend, the source).
_STEP_TENSORS = 24
# Activations a ViT keeps per token per layer for the backward, in floats (q, k, v, the MLP's
# 4x hidden, norms, residuals), measured order of magnitude for open_clip's VisionTransformer.
_VIT_FLOATS_PER_TOKEN_LAYER = 16


def _clip_copy_bytes(models: Models) -> int:
    """Activation bytes one augmented copy costs CLIP's forward + backward."""
    visual = models.clip.model.visual
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(transformer, "width"):
        tokens = int(np.prod(getattr(visual, "grid_size", (14, 14)))) + 1
        per = tokens * transformer.width * transformer.layers * _VIT_FLOATS_PER_TOKEN_LAYER
        return 4 * per
    params = sum(p.numel() for p in visual.parameters())  # a ResNet: about its weights again
    return 4 * params


@dataclass(frozen=True)
class Facts:
    """What admission needs of the loaded models (engine/methods: a Description), small and
    picklable: a cluster's front end gets it from a replica and never loads the models."""

    config: UNetConfig
    device: torch.device
    clip_image_size: int
    clip_copy_bytes: int
    downsampling: int  # the UNet's: the canvases' sides are multiples of it
    label: str = ""
    step_key: dict[str, Any] = dataclasses.field(default_factory=dict)
    free_gb: float | None = None  # the device's free memory; None: asked when needed
    method: str = request.PIXEL
    weights: str = "real"  # real | demo | random: results say which
    resident: int = 0  # bytes its loaded models hold

    @classmethod
    def of(cls, models: Models, free_gb: float | None = None) -> Facts:
        """Asked once, where the models are loaded (a ViT's size, a ResNet's weights)."""
        name = models.config.name
        random = "random weights" in models.unet_label
        return cls(
            models.config,
            models.device,
            models.clip.image_size,
            _clip_copy_bytes(models),
            models.downsampling,
            models.label,
            engine_key(models),
            free_gb,
            weights="demo" if name == "demo" else "random" if random else "real",
            resident=devices.bytes_of(models.unet, models.clip.model),
        )

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def plan(self, mask: np.ndarray, settings: Settings) -> Plan:
        return plan(self.config.image_size, self.downsampling, mask, settings)

    def memory(self, image_shape: tuple[int, ...], mask: np.ndarray, plan: Plan) -> Estimate:
        return estimate(self, image_shape, mask, plan)

    def advice(self, cost: Estimate, settings: Settings) -> str:
        return advice(cost, settings)

    def free_bytes(self) -> int:
        return devices.free_bytes(self.device, self.free_gb)


def estimate(facts: Facts, image_shape: tuple[int, ...], mask: np.ndarray, plan: Plan) -> Estimate:
    """The peak memory of the edit of an image of `image_shape` inside `mask` as `plan`s."""
    settings = plan.settings
    height, width = mask.shape
    channels = image_shape[2] if len(image_shape) > 2 else 4
    # the selection as grow and feather will shape it, and the edit's own box around it
    sel: Rect = region.shaped_bounds(mask, settings.grow, settings.feather)
    box = plan.canvas.box
    inside = min(box.width, width) * min(box.height, height)  # only the box's part is read
    n = settings.variants
    batch = min(settings.batch, n)  # variants through the models together
    base = plan.canvas
    precision = devices.resolve_precision(settings.precision, facts.device)
    unet = 0
    if settings.guidance_mode == "full":
        unet = int(accel.activations_gb(facts.config.arch, batch, precision) * _GB)
        if accel.resolve_recompute(
            settings.recompute, facts.config.arch, batch, precision, facts.device, facts.free_gb
        ):
            unet //= 10
    copies = batch * settings.augmentations
    fine, refine = plan.refinement, 0
    if fine:
        tile = int(accel.activations_gb(facts.config.arch, batch, precision) * _GB) // 10
        refine = n * _STEP_TENSORS * 3 * fine.canvas.width * fine.canvas.height * 4 + tile
    clip_size = facts.clip_image_size
    return Estimate(
        {
            "input": height * width * (channels + 1),
            "image_scale": inside * 3 * 2 + sel.area * 4 * n * 2,
            "model_scale": n * _STEP_TENSORS * 3 * base.width * base.height * 4,
            "unet_activations": unet,
            "clip_copies": copies * (3 * clip_size * clip_size * 4 + facts.clip_copy_bytes),
            "refinement": refine,
        }
    )


def advice(cost: Estimate, settings: Settings) -> str:
    """Which setting to lower, by the part that costs the most."""
    part = max(cost.parts, key=cost.parts.get)
    return {
        "input": "the image size (send a smaller crop around the selection)",
        "image_scale": f"the selection's size or variants ({settings.variants})",
        "model_scale": f"variants ({settings.variants})",
        # both grow with the variants that go through the models together (one by default)
        "unet_activations": "the engine's batch, or use guidance_mode fast",
        "clip_copies": f"augmentations ({settings.augmentations})",
        "refinement": "refine_cap (2 or 4 model sides), or turn refine off",
    }[part]


# -- the method, loaded --------------------------------------------------------------------------


class Pixel:
    """Blended Diffusion with its models loaded (engine/methods: a Method)."""

    def __init__(self, models: Models) -> None:
        self.models = models

    def describe(self, remote: bool = False) -> Facts:
        free_gb = devices.available_memory_gb(self.models.device) if remote else None
        return Facts.of(self.models, free_gb)

    def run(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        prompt: str,
        settings: Settings,
        on_step: StepReport | None = None,
        check: Callable[[], None] | None = None,
        plan: Plan | None = None,
    ) -> list[Variant]:
        return run_edit(self.models, image, mask, prompt, settings, on_step, check, plan)


def load(
    model: str = "tiny",
    *,
    clip: str | None = None,
    unet_checkpoint: str | None = None,
    device: str = "auto",
) -> Pixel:
    """`model`: tiny | demo | adm256 | adm512 (engine/models.py)."""
    return Pixel(load_models(model, clip=clip, unet_checkpoint=unet_checkpoint, device=device))
