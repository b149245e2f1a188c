"""Blended Diffusion (Avrahami et al., CVPR 2022, Algorithm 1) over guided_diffusion's schedule.

All of the method's math is here. Per step t, from k = T - skip down to 0:
    x0_hat, mean, var = the model's DDPM posterior at x_t          (one UNet forward, with grad)
    L = clip_weight * D_clip(augment(mix * a), prompt) + range_weight * range(x0_hat)
        with mix = x0_hat * sqrt(1 - abar_t) + x_t * (1 - sqrt(1 - abar_t))   (official input mix)
        and a the selection's alpha (m where it has no soft edge, as in the official code)
    x_fg = mean - var * dL/dx_t + sqrt(var) * z                    (CLIP-guided DDPM step)
    x_{t-1} = x_fg * m + q_sample(source, t) * (1 - m)             (the blend, noised to level t)
result = x0_hat of the last step. The official code then pastes the source outside the mask in the
model's canvas; the engine pastes at image scale instead, through the selection's own alpha
(engine/region.py), so the edit is resampled from edited pixels up to the selection's edge.

The official code runs the UNet twice per step (once for the mean, once again inside cond_fn for
the gradient); the forward with grad already yields the mean, so the engine runs it once.
`guidance_mode="fast"` treats the UNet's output as a constant (no backward through the UNet):
the gradient then reaches x_t only through the x0 formula.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from guided_diffusion.gaussian_diffusion import GaussianDiffusion, _extract_into_tensor

from engine.guidance import Guide, range_loss

NUM_CLASSES = 1000  # ImageNet classes of the class-conditional ADM

StepCallback = Callable[[int, int, torch.Tensor], None]  # (done, total, x0_hat)


def randn(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """One normal sample per variant, each from the variant's own generator."""
    return torch.cat([torch.randn(1, *shape, generator=g, device=g.device) for g in generators])


def _constant(unet: Callable) -> Callable:
    def run(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return unet(x, t, **kwargs)

    return run


def guided_step(
    diffusion: GaussianDiffusion,
    unet: Callable,
    x: torch.Tensor,
    t: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None,
    noise: torch.Tensor,
    *,
    sampler: str = "ddpm",
    eta: float = 0.0,
    guidance_mode: str = "full",
    model_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One CLIP-guided denoising step from x_t; returns (x_{t-1} before the blend, x0_hat).
    With no `loss_fn` the step is unguided: one UNet forward without grad."""
    model = unet if guidance_mode == "full" else _constant(unet)
    with torch.set_grad_enabled(loss_fn is not None):
        x = x.detach().requires_grad_(loss_fn is not None)
        out = diffusion.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs=model_kwargs)
        loss = loss_fn(x, out["pred_xstart"], t) if loss_fn else None
        # all weights 0: no graph to differentiate, the step is plain DDPM/DDIM
        has_grad = loss is not None and loss.requires_grad
        grad = -torch.autograd.grad(loss, x)[0] if has_grad else torch.zeros_like(x)
    x = x.detach()
    x0, var = out["pred_xstart"].detach(), out["variance"].detach()
    nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # no noise on the last step
    if sampler == "ddpm":  # Sohl-Dickstein conditioning: shift the mean by var * grad
        mean = out["mean"].detach().float() + var * grad.float()
        return mean + nonzero * torch.exp(0.5 * out["log_variance"].detach()) * noise, x0
    # DDIM: condition the score (Song et al.), then the deterministic (eta = 0) update
    abar = _extract_into_tensor(diffusion.alphas_cumprod, t, x.shape)
    abar_prev = _extract_into_tensor(diffusion.alphas_cumprod_prev, t, x.shape)
    eps = diffusion._predict_eps_from_xstart(x, t, x0) - (1 - abar).sqrt() * grad
    x0 = diffusion._predict_xstart_from_eps(x, t, eps)
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    mean = x0 * abar_prev.sqrt() + (1 - abar_prev - sigma**2).sqrt() * eps
    return mean + nonzero * sigma * noise, x0


def clip_loss_fn(
    diffusion: GaussianDiffusion,
    guide: Guide,
    mask: torch.Tensor,
    prompt: str,
    clip_weight: float,
    range_weight: float,
    streams: Sequence[torch.Generator] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The guidance loss of x_t and x0_hat at step t, as the official cond_fn computes it
    (`streams`: each image's augmentation generator)."""

    def loss(x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        if clip_weight:
            fac = _extract_into_tensor(diffusion.sqrt_one_minus_alphas_cumprod, t, x.shape)
            mixed = (x0 * fac + x * (1 - fac)) * mask
            total = total + clip_weight * guide.loss(mixed, prompt, streams)
        if range_weight:
            total = total + range_weight * range_loss(x0).sum()
        return total

    return loss


def blend(
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Keep the sample inside the mask, the source noised to level t outside it."""
    return x * mask + diffusion.q_sample(source, t, noise=noise) * (1 - mask)


def blended_diffusion(
    unet: Callable,
    diffusion: GaussianDiffusion,
    guide: Guide,
    source: torch.Tensor,
    mask: torch.Tensor,
    prompt: str,
    generators: Sequence[torch.Generator],
    *,
    skip: int = 25,
    clip_weight: float = 1000.0,
    range_weight: float = 50.0,
    sampler: str = "ddpm",
    eta: float = 0.0,
    guidance_mode: str = "full",
    guidance_every: int = 1,
    class_cond: bool = False,
    batch: int = 1,
    callback: StepCallback | None = None,
    seen: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edit `source` (1x3xHxW in [-1, 1]) inside `mask` (1x1xHxW in [0, 1]): one variant per
    generator. CLIP judges the edit through `seen` (the selection's soft alpha, default `mask`).
    Returns the variants' last predictions x0_hat (Nx3xHxW): the caller pastes them over the
    source.
    `guidance_every` N > 1 guides one step in N (a speed trade; the paper guides every step).
    `batch` variants go through the models together. With 1, each variant's pixels depend on
    its own generator alone (batched kernels round differently, and chaos amplifies it), so a
    variant's seed reproduces it in a run of its own; larger batches may pay on a GPU.
    `start` (Nx3xHxW) is what the first step noises, the source by default (the refinement pass,
    engine/tiles.py, starts from the enlarged edit). With both weights 0 no step is guided: the
    UNet runs without grad."""
    n, shape = len(generators), source.shape[1:]
    source = source.expand(n, *shape)
    chunks = [slice(i, i + batch) for i in range(0, n, batch)]
    # each variant's augmentations from a stream of its own, seeded by its generator
    streams = [
        torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g, device=g.device)))
        for g in generators
    ]
    seen = mask if seen is None else seen
    loss_fns = [
        clip_loss_fn(diffusion, guide, seen, prompt, clip_weight, range_weight, streams[c])
        for c in chunks
    ]
    steps = list(range(diffusion.num_timesteps - skip))[::-1]
    full = torch.full((n,), steps[0], device=source.device, dtype=torch.long)
    x = diffusion.q_sample(source if start is None else start, full, noise=randn(generators, shape))
    x0 = source
    for done, step in enumerate(steps, 1):
        t = torch.full((n,), step, device=source.device, dtype=torch.long)
        y = None
        if class_cond:  # the official code draws a random ImageNet class at every step
            y = [torch.randint(NUM_CLASSES, (1,), generator=g, device=g.device) for g in generators]
            y = torch.cat(y)
        guided = (done - 1) % guidance_every == 0 and bool(clip_weight or range_weight)
        noise = randn(generators, shape)
        parts = [
            guided_step(
                diffusion, unet, x[c], t[c], loss_fn if guided else None, noise[c],
                sampler=sampler, eta=eta, guidance_mode=guidance_mode,
                model_kwargs=None if y is None else {"y": y[c]},
            )  # fmt: skip
            for c, loss_fn in zip(chunks, loss_fns, strict=True)
        ]
        x, x0 = (torch.cat(p) for p in zip(*parts, strict=True))
        x = blend(diffusion, x, source, mask, t, randn(generators, shape))
        if callback:
            callback(done, len(steps), x0)
    return x0
