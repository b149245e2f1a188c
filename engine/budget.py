"""What a job will cost before it is queued: its peak memory, against the engine's budget.

One estimate, from the same context box the edit will use (`region.context_box`, around the
selection as grow and feather will shape it), so it stays true when the box changes. The parts:
the pixels at image scale (the image and mask the job holds while it waits, the box's part inside
the image, one result layer per variant), the batch at model scale, the UNet activations the
guided backward keeps (accel's measured figure, or a tenth of it when recomputed) and CLIP's
augmented copies with the activations their backward keeps.
The refinement pass (engine/tiles.py) comes after them: its canvas's tensors for every variant and
one tile's forward without grad (counted as a recomputed forward: a tenth of the activations).
A refusal names the setting that costs the most.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine import accel, devices, region
from engine.edit import Plan
from engine.models import Models, UNetConfig
from engine.shared.geometry import Rect
from engine.shared.request import Settings

_GB = 2**30
# Tensors of model-scale size a guided step keeps per variant besides the UNet's activations
# (x_t, x0_hat, mean, variance, noise, gradients, the blend, the source).
_STEP_TENSORS = 24
# Activations a ViT keeps per token per layer for the backward, in floats (q, k, v, the MLP's
# 4x hidden, norms, residuals), measured order of magnitude for open_clip's VisionTransformer.
_VIT_FLOATS_PER_TOKEN_LAYER = 16


@dataclass(frozen=True)
class Estimate:
    parts: dict[str, int]  # bytes by part

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def held(self) -> int:
        """What the job holds while it waits in the queue."""
        return self.parts["input"]


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
    """What an estimate needs of the loaded models, small and picklable: a cluster's front end
    gets it from a replica (engine/cluster.py) and never loads the models itself."""

    config: UNetConfig
    device: torch.device
    clip_image_size: int
    clip_copy_bytes: int
    downsampling: int  # the UNet's: the canvases' sides are multiples of it
    free_gb: float | None = None  # the device's free memory; None: asked when estimating

    @classmethod
    def of(cls, models: Models) -> Facts:
        """Asked once, where the models are loaded (a ViT's size, a ResNet's weights)."""
        return cls(
            models.config,
            models.device,
            models.clip.image_size,
            _clip_copy_bytes(models),
            models.downsampling,
        )


def estimate(
    facts: Facts, image_shape: tuple[int, ...], mask: np.ndarray, plan: Plan
) -> Estimate:
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


def available_bytes(models: Models | Facts) -> int:
    """What the device has free now."""
    return int(devices.available_memory_gb(models.device) * _GB)
