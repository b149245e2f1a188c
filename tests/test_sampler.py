"""The sampler against guided_diffusion's own primitives, and the edit's invariants (tiny)."""

import numpy as np
import pytest
import torch

from engine.guidance import Guide, range_loss
from engine.methods.pixel import run_edit
from engine.models import load_models
from engine.reference import official_cond_fn, official_step
from engine.region import composite
from engine.sampler import blend, clip_loss_fn, guided_step
from engine.shared.request import Settings

FAST = dict(steps=12, skip=3, variants=2, augmentations=4)


@pytest.fixture(scope="module")
def tiny():
    return load_models("tiny", device="cpu")


def _inputs(n: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(0)
    source = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, size, size)
    mask[..., 8:24, 6:20] = 1.0
    mask[..., 7, 6:20] = 0.5  # a soft edge
    x = torch.randn(n, 3, size, size, generator=g)
    return (
        source.expand(n, -1, -1, -1),
        mask,
        x,
        torch.randn(n, 3, size, size, generator=g),
        torch.randn(n, 3, size, size, generator=g),
    )


def _by_hand(diffusion, unet, guide, source, mask, x, t, noise, noise_bg, detach_unet: bool):
    """The step from guided_diffusion's p_mean_variance, condition_mean and q_sample."""
    out = diffusion.p_mean_variance(unet, x, t, clip_denoised=False)
    step = int(t[0])

    def cond_fn(x_in, _scaled_t, **_):
        with torch.enable_grad():
            x_in = x_in.detach().requires_grad_()
            if detach_unet:  # fast mode: the x0 formula with the model's eps as a constant
                eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"]).detach()
                x0 = diffusion._predict_xstart_from_eps(x_in, t, eps)
            else:
                x0 = diffusion.p_mean_variance(unet, x_in, t, clip_denoised=False)["pred_xstart"]
            fac = diffusion.sqrt_one_minus_alphas_cumprod[step]
            loss = 1000.0 * guide.loss((x0 * fac + x_in * (1 - fac)) * mask, "a red circle")
            loss = loss + 50.0 * range_loss(x0).sum()
            return -torch.autograd.grad(loss, x_in)[0]

    mean = diffusion.condition_mean(cond_fn, out, x, t, model_kwargs={})
    sample = mean + torch.exp(0.5 * out["log_variance"]) * noise
    return sample * mask + diffusion.q_sample(source, t, noise=noise_bg) * (
        1 - mask
    )  # None: drawn now


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_one_step_equals_guided_diffusion_primitives(tiny, mode):
    diffusion, guide = tiny.diffusion(20), Guide(tiny.clip, copies=4)
    source, mask, x, noise, noise_bg = _inputs()
    t = torch.full((2,), 12, dtype=torch.long)
    loss_fn = clip_loss_fn(diffusion, guide, mask, "a red circle", 1000.0, 50.0)
    torch.manual_seed(7)  # the same augmentations on both sides
    ours, _ = guided_step(diffusion, tiny.unet, x, t, loss_fn, noise, guidance_mode=mode)
    ours = blend(diffusion, ours, source, mask, t, noise_bg)
    torch.manual_seed(7)
    theirs = _by_hand(
        diffusion, tiny.unet, guide, source, mask, x, t, noise, noise_bg, mode == "fast"
    )
    assert (ours - theirs).abs().max().item() < 1e-5
    # and the guidance really moved the step: without it the result differs
    torch.manual_seed(7)
    unguided = clip_loss_fn(diffusion, guide, mask, "a red circle", 0.0, 0.0)
    plain, _ = guided_step(diffusion, tiny.unet, x, t, unguided, noise, guidance_mode=mode)
    assert (blend(diffusion, plain, source, mask, t, noise_bg) - ours).abs().max().item() > 1e-4


def test_the_bench_reference_is_the_official_formulation(tiny):
    diffusion, guide = tiny.diffusion(20), Guide(tiny.clip, copies=4)
    source, mask, x, noise, noise_bg = _inputs()
    t = torch.full((2,), 12, dtype=torch.long)
    cond_fn = official_cond_fn(diffusion, tiny.unet, guide, mask, "a red circle", 1000.0, 50.0)
    torch.manual_seed(3)
    ref = official_step(diffusion, tiny.unet, cond_fn, source, mask, x, t)
    torch.manual_seed(3)
    noise = torch.randn_like(x)  # p_sample draws its noise before the cond_fn's augmentations
    hand = _by_hand(diffusion, tiny.unet, guide, source, mask, x, t, noise, None, False)
    assert (ref - hand).abs().max().item() < 1e-5


def test_fast_mode_sends_no_gradient_through_the_unet(tiny):
    seen = []

    def unet(x, t, **kw):
        y = tiny.unet(x, t, **kw)
        seen.append(y.requires_grad)
        return y

    diffusion, guide = tiny.diffusion(20), Guide(tiny.clip, copies=2)
    source, mask, x, noise, _ = _inputs()
    t = torch.full((2,), 12, dtype=torch.long)
    loss_fn = clip_loss_fn(diffusion, guide, mask, "a red circle", 1000.0, 50.0)
    guided_step(diffusion, unet, x, t, loss_fn, noise, guidance_mode="fast")
    guided_step(diffusion, unet, x, t, loss_fn, noise, guidance_mode="full")
    assert seen == [False, True]


def test_clip_pulls_only_where_the_selection_will_be_seen(tiny):
    """Under the hard mask a feathered band is editable in full; CLIP judges it through the
    selection's alpha, so where that is 0 its gradient is 0 too."""
    diffusion, guide = tiny.diffusion(20), Guide(tiny.clip, copies=2)
    _, mask, x, _, _ = _inputs()
    seen = mask.clone()
    seen[..., :, 13:] = 0.0  # the right part of the selection is never seen
    t = torch.full((2,), 12, dtype=torch.long)
    x = x.requires_grad_()
    grads = []
    for judged in (mask, seen):
        loss = clip_loss_fn(diffusion, guide, judged, "a red circle", 1000.0, 0.0)(x, x * 0.5, t)
        grads.append(torch.autograd.grad(loss, x)[0])
    assert grads[0][..., 8:24, 13:20].abs().sum() > 0
    assert grads[1][..., 8:24, 13:20].abs().sum() == 0
    assert grads[1][..., 8:24, 6:13].abs().sum() > 0


def _soft_disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    d = np.hypot(xx - cx, yy - cy)
    return (np.clip((r - d) / 4, 0, 1) * 255).astype(np.uint8)


def _picture(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "shape, mask_fn",
    [
        ((64, 64), lambda: _soft_disc(64, 64, 30, 34, 14)),  # feathered selection
        ((80, 80), lambda: _soft_disc(80, 80, 3, 4, 6)),  # small, at a corner
        ((40, 130), lambda: _soft_disc(40, 130, 100, 20, 12)),  # non-square picture
    ],
)
def test_pixels_outside_the_mask_stay_byte_identical(tiny, shape, mask_fn):
    image, mask = _picture(*shape), mask_fn()
    variants = run_edit(tiny, image, mask, "a red circle", Settings(seed=5, **FAST))
    assert [v.rank for v in variants] == [1, 2]
    assert variants[0].distance <= variants[1].distance
    for v in variants:
        out = composite(image, v.rgba, v.box)
        assert (out[mask == 0] == image[mask == 0]).all()
        assert (out[mask == 255] != image[mask == 255]).any()
        b = v.box
        assert (v.rgba[..., 3] == mask[b.y : b.y + b.height, b.x : b.x + b.width]).all()


def test_same_seed_same_result_other_seed_other_result(tiny):
    image, mask = _picture(48, 48), _soft_disc(48, 48, 24, 24, 10)

    def run(seed):
        return [
            v.rgba
            for v in run_edit(tiny, image, mask, "a blue square", Settings(seed=seed, **FAST))
        ]

    first, again, other = run(11), run(11), run(12)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again, strict=True))
    assert any(a.tobytes() != b.tobytes() for a, b in zip(first, other, strict=True))


def test_guidance_lowers_the_clip_distance(tiny):
    image, mask = _picture(48, 48), _soft_disc(48, 48, 24, 24, 14)
    guided, plain = (
        run_edit(tiny, image, mask, "a red circle", Settings(seed=3, guidance_weight=w, **FAST))
        for w in (1000.0, 0.0)
    )
    assert guided[0].distance < plain[0].distance


def test_ddim_and_class_conditional_paths_run(tiny):
    image, mask = _picture(40, 40), _soft_disc(40, 40, 20, 20, 8)
    v = run_edit(tiny, image, mask, "a red circle", Settings(seed=1, sampler="ddim", **FAST))
    assert len(v) == 2 and np.isfinite(v[0].distance)
    # the 512 model's random class per step, on the tiny architecture
    diffusion = tiny.diffusion(10)
    seen = []

    def unet(x, t, y=None):
        seen.append(y)
        return tiny.unet(x, t)

    from engine.sampler import blended_diffusion

    source, m, *_ = _inputs(1)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    blended_diffusion(
        unet, diffusion, Guide(tiny.clip, 2), source[:1], m, "x", gens, skip=8, class_cond=True
    )
    assert len(seen) == 2 * 2  # 2 steps, the variants one at a time (batch 1)
    assert all(
        y is not None and y.shape == (1,) and (0 <= y).all() and (y < 1000).all() for y in seen
    )
