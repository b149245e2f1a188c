"""Blended Latent Diffusion (Avrahami, Fried, Lischinski, SIGGRAPH 2023) in Stable Diffusion's
latent space (engine/methods: a Method): picture + selection + prompt -> ranked variants.

The loop is the engine's, over diffusers' and transformers' parts (engine/latent_models.py): the
source's latent is the VAE's mean, the selection a hard latent mask, the text guides by
classifier-free guidance (negative and positive prompt in one batch of 2), and after every step
the latent outside the mask is replaced by the source noised to where the step arrived. The
result is decoded and composited through the selection's exact alpha at the picture's scale, so
every byte outside stays, and the variants are ranked with CLIP as the pixel method's are.

The official repository has two paths that differ (../shared/ALGORITHM.md). Chosen here:
- Start from the source noised to the first timestep (the LDM path and the SDXL script), not
  from plain noise (the SD2 script): at a strength below 100% the part of the schedule left out
  is the source's, so the selection starts from its own picture, and the blend's background and
  the sample agree from the first step.
- Blend after each step, with the source noised to the timestep the step reached (the next one;
  clean after the last). This is the LDM path's blend-before-the-next-step, and diffusers'
  inpainting timing; the SD2 script's blend at the current timestep leaves the background one
  step noisier than the sample it joins.
- Fresh noise for the background at every step (both official paths); `reuse_noise` (tests
  only) draws it once, as diffusers' inpainting pipeline does, for the parity test.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine import devices, region
from engine.guidance import Guide
from engine.latent_models import Pipeline, load_pipeline
from engine.methods import Diverged, Estimate, Plan, StepReport, Variant
from engine.methods.ranking import ranked
from engine.models import CONFIGS, Clip, load_clip
from engine.preview import Previewer
from engine.shared import geometry, request
from engine.shared.geometry import Rect
from engine.shared.request import Settings

# SD's latents -> RGB in [-1, 1], a linear fit (the well-known SD 1.x preview factors): a
# preview every step at the cost of a matrix product, no VAE decode
LATENT_RGB = torch.tensor(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
)


# the demo models' ranking CLIP: the one the pixel demo uses, trained on the same shapes
DEMO_CLIP = CONFIGS["demo"].default_clip


# -- the latent mask -----------------------------------------------------------------------------


def _dilate(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(x, k, stride=1, padding=k // 2)


def latent_masks(seen: torch.Tensor, cell: int, shrink: int | None) -> list[torch.Tensor]:
    """The hard latent masks of the steps, largest first, the last the edit's own.

    `seen`: the selection's alpha on the canvas (1x1xHxW). A latent cell is in the mask when the
    selection covers half of it (the official threshold), or when it holds a part of the
    selection thinner than a cell (what an opening with a cell-sized square removes) away from
    the covered cells: a brush stroke thinner than a cell would otherwise vanish. Progressive
    shrinking (the LDM path's `mask_dilation_iterations`) starts from the mask dilated by
    squares of 3 + 2i cells, largest first; None: 2 of them when such thin parts exist."""
    coverage = F.avg_pool2d(seen, cell)
    hard = (coverage >= 0.5).float()
    touched = (seen > 0).float()
    k = cell + 1  # odd, centred: anything narrower than a cell does not survive the opening
    opened = _dilate(-_dilate(-touched, k), k)
    thin = (F.max_pool2d(touched * (1 - opened), cell) > 0).float()
    extra = thin * (1 - _dilate(hard, 3))
    mask = torch.maximum(hard, extra)
    n = shrink if shrink is not None else (2 if extra.any() else 0)
    return [_dilate(mask, 3 + 2 * i) for i in reversed(range(n))] + [mask]


# -- the sampler ---------------------------------------------------------------------------------

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> model output


def _noise(like: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One draw per variant from its own generator: a variant's seed reproduces it alone."""
    shape = like.shape[1:]
    return torch.cat(
        [torch.randn(shape, generator=g, device=g.device)[None] for g in generators]
    ).to(like.device, like.dtype)


def blended_latent_diffusion(
    model: Denoiser,
    scheduler: Any,
    timesteps: torch.Tensor,
    source: torch.Tensor,
    masks: list[torch.Tensor],
    generators: list[torch.Generator],
    *,
    from_noise: bool = False,
    reuse_noise: bool = False,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The blended latents, one per generator, over `timesteps` (the strength's part of
    `scheduler`'s, timesteps_for). `source`: the source latent (1xCxhxw); `masks`: the steps'
    latent masks, largest first (latent_masks), spread evenly over the steps, the last at the
    end; `from_noise`: start from pure noise (at 100% strength, as diffusers does), else from
    the source noised to the first timestep. `callback(done, total, x, model_output)` follows
    every step."""
    first = _noise(source.expand(len(generators), -1, -1, -1), generators)
    if from_noise:
        x = first * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(source.expand_as(first), first, timesteps[:1])
    step_options = {"generator": generators} if "generator" in _step_args(scheduler) else {}
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **step_options).prev_sample
        if i + 1 < n:
            noise = first if reuse_noise else _noise(first, generators)
            background = scheduler.add_noise(source.expand_as(x), noise, timesteps[i + 1 : i + 2])
        else:
            background = source.expand_as(x)
        m = masks[min(len(masks) - 1, (i + 1) * len(masks) // n)]
        x = m * x + (1 - m) * background
        if callback:
            callback(i + 1, n, x, out)
    return x


def _step_args(scheduler: Any) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)


# -- the schedulers ------------------------------------------------------------------------------


# the checkpoint's schedule that every scheduler takes (the rest is each scheduler's own)
SCHEDULE_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
    "timestep_spacing", "rescale_betas_zero_snr",
)  # fmt: skip


def make_scheduler(name: str, schedule: dict[str, Any]) -> Any:
    """A diffusers scheduler over the checkpoint's noise schedule (its training betas and
    prediction type): DDIM as the paper's script sets it, DPM++ 2M with Karras sigmas, LCM."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

    common = {k: schedule[k] for k in SCHEDULE_KEYS if k in schedule}
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
            steps_offset=1,
        )  # fmt: skip
    if name == "lcm":
        return LCMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    raise ValueError(f"unknown scheduler {name!r}")


def timesteps_for(scheduler: Any, settings: Settings, device: torch.device) -> torch.Tensor:
    """The timesteps of the part of the schedule the strength runs: the last
    `steps_run` of `steps` (the official `blending_start_percentage` = 1 - strength). LCM picks
    its own spread for a strength (as diffusers' LCM img2img pipeline lets it)."""
    if type(scheduler).__name__ == "LCMScheduler":
        scheduler.set_timesteps(settings.steps, device, strength=settings.strength / 100)
        return scheduler.timesteps
    scheduler.set_timesteps(settings.steps, device)
    start = settings.start * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    # the scheduler keeps its whole schedule: DPM++ finds its last step by it
    return scheduler.timesteps[start:]


# -- the plan and its cost -----------------------------------------------------------------------


def plan(native: int, factor: int, mask: np.ndarray, settings: Settings, lcm: bool = False) -> Plan:
    """The context box around the selection as grow and feather will shape it, on a canvas of
    about the model's native area with sides multiples of `factor`. `lcm`: the model has LCM
    weights, which the lcm scheduler needs."""
    if settings.scheduler == "lcm" and not lcm:
        raise request.SettingError(
            "scheduler", "the lcm scheduler needs an LCM checkpoint or an LCM-LoRA (--lora): "
            "this model has neither; use dpmpp_2m_karras or ddim",
        )  # fmt: skip
    box = region.context_box(mask, settings.padding, settings.grow, settings.feather)
    return Plan(settings, geometry.canvas_for(box, native, factor))


# Live activations, in values, a UNet forward keeps per latent pixel per unit of its first width
# (SDPA attention keeps no token x token matrix), and the VAE decoder per canvas pixel per unit of
# its widest. Measured at SD-1.5's shapes in bf16 on a CPU: the CFG batch of 2 at 64x64 latents
# peaked 102 MB over the weights (this formula: 210 MB), the decode of 512 px 548 MB (805 MB)
_UNET_VALUES = 40
_VAE_VALUES = 3


@dataclass(frozen=True)
class Facts:
    """What admission needs of the loaded pipeline (engine/methods: a Description)."""

    native: int
    factor: int
    vae_factor: int
    unet_width: int
    vae_width: int
    itemsize: int
    device: torch.device
    label: str
    step_key: dict[str, Any]
    lcm: bool = False
    attention_slice: int = 0  # sliced attention's slices at once (0: SDPA, no score matrix)
    free_gb: float | None = None
    method: str = request.LATENT
    weights: str = "real"  # real | demo | random: results say which
    resident: int = 0  # bytes its loaded models hold

    @property
    def image_size(self) -> int:
        return self.native

    def plan(self, mask: np.ndarray, settings: Settings) -> Plan:
        return plan(self.native, self.factor, mask, settings, self.lcm)

    def memory(self, image_shape: tuple[int, ...], mask: np.ndarray, plan: Plan) -> Estimate:
        settings = plan.settings
        height, width = mask.shape
        channels = image_shape[2] if len(image_shape) > 2 else 4
        sel: Rect = region.shaped_bounds(mask, settings.grow, settings.feather)
        box, canvas = plan.canvas.box, plan.canvas
        inside = min(box.width, width) * min(box.height, height)
        n, batch = settings.variants, min(settings.batch, settings.variants)
        pixels = canvas.width * canvas.height
        latent = pixels // self.vae_factor**2
        cfg = 2 if settings.guidance_scale > 1 else 1
        return Estimate(
            {
                "input": height * width * (channels + 1),
                "image_scale": inside * 3 * 2 + sel.area * 4 * n * 2,
                "canvas": (3 + n * 3) * pixels * 4,
                "unet": cfg * batch * latent * self.unet_width * _UNET_VALUES * self.itemsize
                # sliced attention's scores and their softmax, a slice at a time
                + 2 * self.attention_slice * latent**2 * self.itemsize,
                "vae": pixels * self.vae_width * _VAE_VALUES * self.itemsize,
            }
        )

    def advice(self, cost: Estimate, settings: Settings) -> str:
        part = max(cost.parts, key=cost.parts.get)
        return {
            "input": "the image size (send a smaller crop around the selection)",
            "image_scale": f"the selection's size or variants ({settings.variants})",
            "canvas": f"variants ({settings.variants})",
            "unet": "the engine's batch",
            "vae": "the selection's size (the decoder runs at the canvas's)",
        }[part]

    def free_bytes(self) -> int:
        return devices.free_bytes(self.device, self.free_gb)


# -- the method, loaded --------------------------------------------------------------------------


# (batch x heads) slices of attention computed at once on a bf16 CPU (below)
ATTENTION_SLICE = 4


def bf16_cpu(pipe: Pipeline) -> bool:
    return pipe.device.type == "cpu" and pipe.dtype == torch.bfloat16


def layout(pipe: Pipeline) -> None:
    """The engine's layout of the parts (the bench times it too). The UNet's convolutions in
    channels-last. On a CPU computing bf16 natively, attention as batched matrix products over
    4 (batch x heads) slices at a time, and the VAE in channels-last too: measured there (2
    cores, SD-1.5's shapes, the engine's allocator settings), the CFG step 2.7 s against 3.5 s
    with torch's flash attention (SDPA), whose CPU kernel is slow at SD 1.5's head dim of 40, at
    the same peak memory (all heads at once: 2.8 s, 1 GB more); the decode of 512 px 2.8 s
    against 3.5 s. In fp32 (a CPU without bf16) and on GPUs SDPA stays: it was the faster."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    pipe.unet.to(memory_format=torch.channels_last)
    if bf16_cpu(pipe):
        pipe.unet.set_attn_processor(SlicedAttnProcessor(ATTENTION_SLICE))
        pipe.vae.to(memory_format=torch.channels_last)
    if pipe.native >= 256:
        pipe.vae.enable_tiling()  # canvases above the VAE's own size decode in tiles


class Latent:
    """Blended Latent Diffusion with its pipeline and ranking CLIP loaded (a Method)."""

    def __init__(self, pipe: Pipeline, clip: Clip) -> None:
        self.pipe, self.clip = pipe, clip
        layout(pipe)

    @property
    def label(self) -> str:
        return f"{self.pipe.label}; CLIP: {self.clip.label}"

    def describe(self, remote: bool = False) -> Facts:
        pipe = self.pipe
        return Facts(
            pipe.native, pipe.factor, pipe.vae_factor, pipe.unet.config.block_out_channels[0],
            max(pipe.vae.config.block_out_channels), pipe.dtype.itemsize, pipe.device,
            self.label,
            {
                "model": pipe.name, "image_size": pipe.native, "models": self.label,
                "device": devices.identity(pipe.device), "precision": str(pipe.dtype),
            },
            pipe.lcm,
            ATTENTION_SLICE if bf16_cpu(pipe) else 0,
            devices.available_memory_gb(pipe.device) if remote else None,
            weights=pipe.weights,
            resident=devices.bytes_of(pipe.unet, pipe.vae, pipe.text_encoder, self.clip.model),
        )  # fmt: skip

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
        return run_edit(self, image, mask, prompt, settings, on_step, check, plan)


def _guidance(pipe: Pipeline, settings: Settings) -> tuple[float, bool]:
    """The guidance scale and whether it takes the unconditional half of the batch: an
    LCM-distilled UNet reads the scale as an embedding instead (its default 8.5, diffusers')."""
    if pipe.unet.config.get("time_cond_proj_dim"):
        return (settings.guidance if settings.guidance is not None else 8.5), False
    scale = settings.guidance_scale
    return scale, scale > 1


def denoiser(
    pipe: Pipeline,
    text: torch.Tensor,
    scale: float,
    cfg: bool,
    *,
    extra: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    batch: int = 1,
    check: Callable[[], None] = lambda: None,
) -> Denoiser:
    """The UNet's guided output for x_t at t, `batch` variants through it at a time. `text`:
    the negative and positive prompts' embeddings (`cfg`: classifier-free guidance at `scale`,
    both halves in one batch) or the prompt's alone; `extra`: the inpainting UNet's mask and
    masked-source latents; `cond`: an LCM-distilled UNet's guidance embedding. `check()` runs
    before every forward (cancel)."""
    halves = 2 if cfg else 1

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check()
        n = len(x)
        if extra is not None:
            x = torch.cat([x, extra.expand(n, -1, -1, -1)], dim=1)
        # the UNet in the pipeline's precision; the latents stay fp32 for the scheduler's
        # arithmetic over 25-50 steps (bf16 keeps 8 bits of mantissa)
        out = pipe.unet(
            x.repeat(halves, 1, 1, 1).to(pipe.dtype), t,
            encoder_hidden_states=text.repeat_interleave(n, 0),
            timestep_cond=cond.expand(n * halves, -1) if cond is not None else None,
        ).sample.float()  # fmt: skip
        if not cfg:
            return out
        uncond, text_out = out.chunk(2)
        return uncond + scale * (text_out - uncond)

    return lambda x, t: torch.cat([guided(part, t) for part in x.split(batch)])


def embed(pipe: Pipeline, texts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states for `texts`, padded to the tokenizer's length."""
    tok = pipe.tokenizer(
        texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    )  # fmt: skip
    return pipe.text_encoder(tok.input_ids.to(pipe.device))[0]


def _guidance_embedding(w: float, dim: int, n: int) -> torch.Tensor:
    """An LCM-distilled UNet's guidance input: sinusoids of (scale - 1) x 1000 (diffusers')."""
    w = torch.full((n,), (w - 1) * 1000.0)
    half = dim // 2
    freq = torch.exp(torch.arange(half) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def encode(pipe: Pipeline, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's mean, scaled (the official source latent: no sampling noise)."""
    return pipe.vae.encode(pixels.to(pipe.dtype)).latent_dist.mean.float() * pipe.scaling


def _x0(scheduler: Any, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The step's estimate of the clean latent from the model's output (epsilon or v)."""
    ab = scheduler.alphas_cumprod.to(x.device)[int(t)].to(x.dtype)
    if scheduler.config.prediction_type == "v_prediction":
        return ab.sqrt() * x - (1 - ab).sqrt() * out
    return (x - (1 - ab).sqrt() * out) / ab.sqrt()


def _rgb_estimate(latent: torch.Tensor, factor: int) -> torch.Tensor:
    rgb = torch.einsum("nchw,cr->nrhw", latent.float(), LATENT_RGB.to(latent.device))
    return F.interpolate(rgb, scale_factor=factor, mode="bilinear").clamp(-1, 1)


def run_edit(
    method: Latent,
    image: np.ndarray,
    mask: np.ndarray,
    prompt: str,
    settings: Settings,
    on_step: StepReport | None = None,
    check: Callable[[], None] | None = None,
    planned: Plan | None = None,
    *,
    reuse_noise: bool = False,
) -> list[Variant]:
    """Edit `image` (HxWx3|4 uint8) inside `mask` (HxW uint8), as `planned` (see the pixel
    method's run_edit: the same contract). `reuse_noise`: diffusers' noise timing (tests)."""
    pipe, check = method.pipe, check or (lambda: None)
    settings = request.check(dataclasses.asdict(settings), method=request.LATENT)
    region.check_inputs(image, mask)
    check()
    seed = settings.seed if settings.seed is not None else random.randrange(2**31)
    planned = planned or plan(pipe.native, pipe.factor, mask, settings, pipe.lcm)
    canvas, dev = planned.canvas, pipe.device
    mask = region.shape_selection(mask, settings.grow, settings.feather)
    sel = region.selection_bounds(mask)
    rgb, hard = region.to_model(image, mask, canvas)
    source_px = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous().to(dev)
    seen = torch.from_numpy(region.seen_on_canvas(mask, canvas))[None, None].to(dev)
    seeds = [seed + i for i in range(settings.variants)]
    guide = Guide(method.clip, 1)
    previewer = Previewer(guide, prompt, image, mask, canvas, sel, seen, seeds)
    scale, cfg = _guidance(pipe, settings)

    with torch.inference_mode():
        check()
        source = encode(pipe, source_px)
        masks = latent_masks(seen.float(), pipe.vae_factor, settings.mask_shrink)
        texts = [settings.negative_prompt, prompt] if cfg else [prompt]
        text = embed(pipe, texts)
        extra = None
        if pipe.inpaint:  # the 9-channel UNet reads the mask and the masked source too
            kept = source_px * (torch.from_numpy(hard)[None, None].to(dev) < 0.5)
            extra = torch.cat([masks[-1], encode(pipe, kept)], dim=1).to(pipe.dtype)
        cond = None
        if pipe.unet.config.get("time_cond_proj_dim"):
            dim = pipe.unet.config.time_cond_proj_dim
            cond = _guidance_embedding(scale, dim, 1).to(dev, pipe.dtype)
        check()

        batch = min(settings.batch, settings.variants)
        model = denoiser(pipe, text, scale, cfg, extra=extra, cond=cond, batch=batch, check=check)
        scheduler = make_scheduler(settings.scheduler, pipe.schedule)
        timesteps = timesteps_for(scheduler, settings, dev)

        def step(done: int, total: int, x: torch.Tensor, out: torch.Tensor) -> None:
            if not torch.isfinite(x).all():
                raise Diverged(
                    f"the edit diverged (NaN or infinite values at step {done} of {total}): "
                    f"lower guidance ({scale:g})"
                )
            if on_step:
                t = timesteps[done - 1]
                x0 = lambda: _rgb_estimate(_x0(scheduler, x, out, t), pipe.vae_factor)  # noqa: E731
                on_step(done, total, lambda side: previewer(x0(), side))

        latents = blended_latent_diffusion(
            model, scheduler, timesteps, source, masks, devices.generators(seeds, dev),
            from_noise=settings.strength == 100, reuse_noise=reuse_noise, callback=step,
        )  # fmt: skip
        pictures = []
        for one in latents:  # one decode a variant: the decoder's peak is per picture
            check()
            latent = (one[None] / pipe.scaling).to(pipe.dtype)
            pictures.append(pipe.vae.decode(latent).sample.float())
        out = torch.cat(pictures)
    if not torch.isfinite(out).all():
        raise Diverged(f"the edit diverged (NaN or infinite values in the result): lower "
                       f"guidance ({scale:g})")  # fmt: skip
    out = out.clamp(-1, 1)
    return ranked(
        guide, prompt, out, seen, canvas, mask, sel, seeds, check,
        lambda where: Diverged(f"the edit diverged (NaN or infinite values {where}): lower "
                               f"guidance ({scale:g})"),
    )  # fmt: skip


def load(
    model: str = "tiny-latent",
    *,
    clip: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    lora: str | None = None,
) -> Latent:
    """`model`: tiny-latent, an SD name, a diffusers folder or a checkpoint file
    (engine/latent_models.py); `clip`: the ranking CLIP (default: the paper's ViT-B/16, the
    tiny one for random weights, the demo CLIP for demo weights)."""
    pipe = load_pipeline(model, device, precision, lora=lora)
    default = {"random": "tiny", "demo": DEMO_CLIP}.get(pipe.weights, "ViT-B-16-quickgelu:openai")
    return Latent(pipe, load_clip(clip or default, pipe.device))
