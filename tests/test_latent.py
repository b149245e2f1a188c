"""The latent method (Blended Latent Diffusion) on tiny-latent, random weights at SD's shapes:
what it keeps, what it reproduces, what each setting changes, its masks, and its loop against
diffusers' own inpainting pipeline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine import latent_models, region
from engine.methods import Diverged, latent
from engine.models import load_clip
from engine.shared import request

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny() -> latent.Latent:
    return latent.Latent(latent_models.tiny(CPU), load_clip("tiny", CPU))


def _picture(h: int = 80, w: int = 112, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[24:60, 30:80] = 255
    return image, mask


def _settings(**values) -> request.Settings:
    return request.check({"variants": 2, "seed": 5, "steps": 6, **values}, method="latent")


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m_karras"])
def test_edits_inside_keeps_outside_and_a_seed_reproduces_its_variant(tiny, scheduler):
    image, mask = _picture()
    settings = _settings(scheduler=scheduler)
    variants = tiny.run(image, mask, "a red circle", settings)
    assert [v.rank for v in variants] == [1, 2] and {v.seed for v in variants} == {5, 6}
    for v in variants:
        out = region.composite(image, v.rgba, v.box)
        assert np.array_equal(out[mask == 0], image[mask == 0])  # every byte outside
        assert np.abs(out[mask > 0].astype(int) - image[mask > 0]).mean() > 5  # edited inside
    second = variants[1]
    alone = tiny.run(image, mask, "a red circle", _settings(scheduler=scheduler, variants=1,
                                                           seed=second.seed))[0]  # fmt: skip
    assert np.array_equal(alone.rgba, second.rgba)


def test_negative_prompt_and_guidance_change_the_result_for_the_same_seed(tiny):
    image, mask = _picture()
    base = tiny.run(image, mask, "a red circle", _settings(variants=1))[0].rgba
    negative = tiny.run(image, mask, "a red circle",
                        _settings(variants=1, negative_prompt="blue"))[0].rgba  # fmt: skip
    unguided = tiny.run(image, mask, "a red circle", _settings(variants=1, guidance=1))[0].rgba
    assert not np.array_equal(base, negative)
    assert not np.array_equal(base, unguided)


def test_lcm_runs_its_own_spread_of_steps_and_is_refused_without_lcm_weights(tiny):
    image, mask = _picture()
    settings = _settings(scheduler="lcm", steps=4)
    with pytest.raises(request.SettingError, match="LCM-LoRA"):
        tiny.describe().plan(mask, settings)
    lcm = latent.Latent(dataclasses.replace(tiny.pipe, lcm=True), tiny.clip)
    steps = []
    variants = lcm.run(image, mask, "x", settings, on_step=lambda d, t, p: steps.append((d, t)))
    assert steps[-1] == (4, 4) and settings.steps_run == 4  # all four, over 75% of the schedule
    out = region.composite(image, variants[0].rgba, variants[0].box)
    assert np.array_equal(out[mask == 0], image[mask == 0])


def test_progress_every_step_with_previews_and_a_cancel_within_one_forward(tiny):
    image, mask = _picture()
    seen = []

    def on_step(done, total, previews):
        shown = previews(32)
        assert len(shown) == 2 and max(shown[0].rgba.shape[:2]) <= 32
        seen.append((done, total))

    tiny.run(image, mask, "x", _settings(steps=8), on_step=on_step)
    assert seen == [(i, 6) for i in range(1, 7)]  # 75% of 8 steps: 6 run
    forwards = []

    def check():
        forwards.append(1)
        if len(forwards) > 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny.run(image, mask, "x", _settings(), check=check)
    assert len(forwards) == 4


def test_a_huge_guidance_diverges_with_a_message_naming_it(tiny):
    image, mask = _picture()
    unet = tiny.pipe.unet
    original = unet.forward

    def exploding(*a, **k):
        out = original(*a, **k)
        out.sample.mul_(float("inf"))
        return out

    unet.forward = exploding
    try:
        with pytest.raises(Diverged, match="lower guidance"):
            tiny.run(image, mask, "x", _settings(guidance=30))
    finally:
        del unet.forward


def test_the_latent_mask_keeps_a_stroke_thinner_than_a_cell_and_shrinks_onto_it():
    seen = torch.zeros(1, 1, 64, 64)
    seen[..., 26:29, 4:60] = 1  # 3 px wide, inside row 3 of cells: none is half covered
    masks = latent.latent_masks(seen, 8, None)
    assert len(masks) == 3  # auto: two dilated masks, then the edit's own
    final = masks[-1][0, 0]
    assert final[3].all() and final.sum() == 8  # the stroke's row of cells, no other
    assert masks[0].sum() > masks[1].sum() > masks[2].sum()
    assert len(latent.latent_masks(seen, 8, 0)) == 1
    disc = torch.zeros(1, 1, 64, 64)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc[0, 0] = (((yy - 32) ** 2 + (xx - 32) ** 2) < 20**2).float()
    assert len(latent.latent_masks(disc, 8, None)) == 1  # no thin part: no shrinking
    covered = torch.nn.functional.avg_pool2d(disc, 8) >= 0.5
    assert torch.equal(latent.latent_masks(disc, 8, None)[0].bool(), covered)


def test_schema_refuses_the_other_methods_settings_and_fills_the_schedulers_steps():
    assert request.check({}, method="latent").steps == 25
    assert request.check({"scheduler": "ddim"}, method="latent").steps == 50
    assert request.check({"steps": 7}, method="latent").steps == 7
    with pytest.raises(request.SettingError, match="latent method does not take augmentations"):
        request.check({"augmentations": 3}, method="latent")
    with pytest.raises(request.SettingError, match="pixel method does not take negative_prompt"):
        request.check({"negative_prompt": "x"}, method="pixel")
    with pytest.raises(request.SettingError, match="at most 500 characters"):
        request.check({"negative_prompt": "x" * 501}, method="latent")
    settings = request.check({"negative_prompt": "blue", "guidance_mode": "fast"})
    assert settings.wire("latent") == {"negative_prompt": "blue"}


def test_the_loop_matches_diffusers_inpainting_pipeline_on_its_4_channel_path(tiny):
    """DDIM, fp32 latents, its timing and noise (one draw, reused): the same latents."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    pipe = tiny.pipe
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1  # whole latent cells: nearest and our coverage agree
    settings = request.check({"scheduler": "ddim", "steps": 20}, method="latent")  # 15 run
    encode = pipe.vae.encode

    def mean_encode(x, *a, **k):  # diffusers samples the latent; the method takes the mean
        out = encode(x, *a, **k)
        params = out.latent_dist.parameters
        out.latent_dist = DiagonalGaussianDistribution(params, deterministic=True)
        return out

    reference = StableDiffusionInpaintPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=latent.make_scheduler("ddim", pipe.schedule), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    reference.set_progress_bar_config(disable=True)
    pipe.vae.encode = mean_encode
    try:
        theirs = reference(
            "a red circle", image=image, mask_image=mask, height=64, width=64,
            num_inference_steps=20, strength=0.75, guidance_scale=7.5, output_type="latent",
            generator=torch.Generator().manual_seed(3),
        ).images  # fmt: skip
    finally:
        del pipe.vae.encode
    def generator() -> torch.Generator:
        g = torch.Generator().manual_seed(3)
        torch.randn((1, 4, 8, 8), generator=g)  # the draw diffusers' (zero-width) sample took
        return g

    with torch.inference_mode():
        text = latent.embed(pipe, ["", "a red circle"])
        source = latent.encode(pipe, image)
        scheduler = latent.make_scheduler("ddim", pipe.schedule)
        timesteps = latent.timesteps_for(scheduler, settings, CPU)
        masks = latent.latent_masks(mask, 8, 0)
        ours = latent.blended_latent_diffusion(
            latent.denoiser(pipe, text, 7.5, True), scheduler, timesteps, source, masks,
            [generator()], reuse_noise=True,
        )  # fmt: skip
    delta = (ours - theirs).abs().max().item()
    assert delta <= 1e-4, f"max |delta| {delta:.2e} against diffusers' inpainting pipeline"
    # and the engine's own noise (fresh every step) does differ: the option is what matches
    with torch.inference_mode():
        fresh = latent.blended_latent_diffusion(
            latent.denoiser(pipe, text, 7.5, True), scheduler, timesteps, source, masks,
            [generator()],
        )  # fmt: skip
    assert (fresh - theirs).abs().max().item() > 1e-3


def test_bf16_weights_edit_with_fp32_latents(tiny):
    """A CPU with native bf16 runs the parts in bf16; the scheduler's latents stay fp32."""
    pipe = latent_models.tiny(CPU, torch.bfloat16)
    steps = []
    image, mask = _picture()
    variants = latent.Latent(pipe, tiny.clip).run(
        image, mask, "x", _settings(), on_step=lambda d, t, p: steps.append(p(16))
    )
    out = region.composite(image, variants[0].rgba, variants[0].box)
    assert np.array_equal(out[mask == 0], image[mask == 0]) and len(steps) == 4


def test_a_9_channel_inpainting_unet_reads_the_mask_and_masked_source(tiny):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config({**tiny.pipe.unet.config, "in_channels": 9}).eval()
    inputs = []
    unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    pipe = dataclasses.replace(tiny.pipe, unet=unet)
    assert pipe.inpaint
    image, mask = _picture()
    variants = latent.Latent(pipe, tiny.clip).run(image, mask, "x", _settings(variants=1))
    out = region.composite(image, variants[0].rgba, variants[0].box)
    assert np.array_equal(out[mask == 0], image[mask == 0])
    x = inputs[0]
    assert x.shape[1] == 9 and len(x) == 2  # latents, mask, masked source; both CFG halves
    assert set(x[:, 4].unique().tolist()) == {0.0, 1.0}  # the hard latent mask
