"""The official formulation of one Blended Diffusion step, for comparison only.

As omriav/blended-diffusion runs it: guided_diffusion's `p_sample` (a UNet forward without grad
for the mean) with a `cond_fn` that runs the UNet again with grad for the CLIP gradient, then the
blend with the source noised to level t (its `postprocess_fn`). The bench times this against the
engine's step; the tests check the engine's step against the same primitives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from guided_diffusion.respace import SpacedDiffusion

from engine.guidance import Guide, range_loss


def official_cond_fn(
    diffusion: SpacedDiffusion,
    unet: Callable,
    guide: Guide,
    mask: torch.Tensor,
    prompt: str,
    clip_weight: float,
    range_weight: float,
) -> Callable:
    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            t = (t * (diffusion.num_timesteps / 1000)).long()  # the wrapper rescaled it
            kwargs = {} if y is None else {"y": y}
            out = diffusion.p_mean_variance(unet, x, t, clip_denoised=False, model_kwargs=kwargs)
            fac = diffusion.sqrt_one_minus_alphas_cumprod[t[0].item()]
            x_in = out["pred_xstart"] * fac + x * (1 - fac)
            loss = clip_weight * guide.loss(x_in * mask, prompt)
            loss = loss + range_weight * range_loss(out["pred_xstart"]).sum()
            return -torch.autograd.grad(loss, x)[0]

    return cond_fn


def official_step(
    diffusion: SpacedDiffusion,
    unet: Callable,
    cond_fn: Callable,
    source: torch.Tensor,
    mask: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    out = diffusion.p_sample(unet, x, t, clip_denoised=False, cond_fn=cond_fn, model_kwargs={})
    background = diffusion.q_sample(source, t)
    return out["sample"] * mask + background * (1 - mask)
