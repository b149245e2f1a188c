"""Time the latent method (Blended Latent Diffusion) and set its edit against the pixel one's.

`python -m engine bench --model sd15` (any latent model name: tiny-latent, sd15, sd21-base, ...):
the models are built with random weights at the named model's shapes (its diffusers
configuration from engine/latent_configs, no weight files) in the engine's precision
(latent_models.dtype_for: fp16 on GPUs, bf16 on a CPU with native bf16, else fp32). Each part is
measured in a child process of its own, so that its peak memory is its own, after an untimed
warm-up, as the mean of `--steps` runs, in wall and in the process's CPU seconds:
- step: one guided step at the model's native side (512 px: 64x64 latents) as the engine runs it
  (latent.blended_latent_diffusion over latent.denoiser): the UNet on the classifier-free
  guidance batch of 2, the scheduler's step and the blend; the edit's default scheduler
  (DPM++ 2M Karras);
- lcm_step: the same with the lcm scheduler at guidance 1: no unconditional half, the UNet at
  batch 1;
- text: the text encoder (once a job), and the ranking CLIP on one variant (random weights at the
  architecture the method ranks with);
- vae: the VAE's encode of the source and its decode of one variant.
The edit is composed from them (`edit_from`): text + encode + variants x steps_run x step +
variants x (decode + rank), at the request's defaults for the latent method (4 variants, 25 steps
at 75% strength: 19 run); `lcm_edit_s` the same at 4 lcm steps. `--full-edit` also runs a real
4-variant edit end to end (latent.run_edit at 512 px) and reports it as `edit_measured_s`.
The pixel method's edit (`bd_edit_s`) comes from engine/bench.py's own engine step, measured in a
child here on the same machine (`--pixel-model`, default adm256) and extrapolated as bench.py does:
its step x 75 steps x 4 variants (one at a time; its text and ranking not counted). `ratio` is the
latent edit's time over the pixel one's; `cpu_ratio` the same in CPU seconds, the figure to read
on a machine shared with another job (as engine/bench.py's). The parts are laid out as the
engine lays them out (latent.layout); `--channels-last` puts the VAE in channels-last memory
format too, `--attention` picks the UNet's and the VAE's attention (ATTENTION; "math" holds for
every SDPA call of a child), so that runs can compare them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from engine import bench, devices, latent_models
from engine.methods import latent
from engine.models import CONFIGS as PIXEL_MODELS
from engine.shared import request

PROMPT = bench.PROMPT
LATENT_CONFIGS = Path(__file__).parent / "latent_configs"  # diffusers configurations, no weights
# sdpa: diffusers' default (torch picks the kernel); math: torch's SDPA restricted to its math
# backend; classic: diffusers' AttnProcessor (baddbmm and softmax, the token x token matrix kept)
ATTENTION = ("engine", "sdpa", "math", "classic")
LCM = {"scheduler": "lcm", "steps": 4, "guidance": 1.0}  # LCM's few steps, no CFG
PARTS = ("text", "vae", "step", "lcm_step", "edit")  # the children; "edit" with --full-edit
ALL = ("unet", "vae", "text")  # a pipeline's parts with weights


# -- the models, random, at a named model's shapes ------------------------------------------------


def _filled(module: torch.nn.Module, dev: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """A module built on the meta device given random parameters where it runs: matrices and
    kernels N(0, 1/fan_in) (activations keep their scale through the layers, nothing overflows
    fp16 or slows to denormals), norms' scales 1, biases 0. Its buffers stay as built."""
    g = devices.generators([seed], dev)[0]
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if p.dim() >= 2:
                value = torch.randn(p.shape, generator=g, device=dev, dtype=dtype)
                value *= p[0].numel() ** -0.5
            else:
                fill = torch.ones if name == "weight" else torch.zeros
                value = fill(p.shape, device=dev, dtype=dtype)
            sub._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    return module.to(dev).eval()


def _configurations(model: str) -> Path:
    """The folder of `model`'s diffusers configurations: shipped, or a diffusers folder's own."""
    folder = LATENT_CONFIGS / model if (LATENT_CONFIGS / model).is_dir() else Path(model)
    if not (folder / "unet" / "config.json").is_file():
        raise ValueError(
            f"unknown latent model '{model}' for the bench: choose {latent_models.TINY}, one of "
            f"{', '.join(sorted(p.parts[-3] for p in LATENT_CONFIGS.glob('*/unet/config.json')))}"
            " or a diffusers folder (its configurations are read, not its weights)"
        )
    return folder


def random_pipeline(
    model: str, dev: torch.device, dtype: torch.dtype, need: tuple[str, ...] = ALL
) -> latent_models.Pipeline:
    """`model`'s parts with random weights: tiny-latent as latent_models builds it; a named SD
    model (or a diffusers folder) from its configurations, the parts not in `need` left on the
    meta device (their configuration read, no memory taken)."""
    if model == latent_models.TINY:
        return latent_models.tiny(dev, dtype)
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = _configurations(model)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"))
    parts = {"unet": unet, "vae": vae, "text": text}
    for i, name in enumerate(parts):
        if name in need:
            parts[name] = _filled(parts[name], dev, dtype, seed=i)
    schedule = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    schedule = {**latent_models.SD_SCHEDULE, **{k: v for k, v in schedule.items() if k[0] != "_"}}
    pad = "!" if unet.config.cross_attention_dim == 1024 else "<|endoftext|>"  # SD 2's OpenCLIP
    native = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return latent_models.Pipeline(
        model, parts["vae"], parts["unet"], parts["text"], latent_models.tokenizer(pad), schedule,
        native, dev, dtype, "random",
    )  # fmt: skip


def _layout(pipe: latent_models.Pipeline, channels_last: bool, attention: str) -> None:
    """The engine's layout (latent.layout), then the options': the VAE in channels-last too,
    the UNet's and the VAE's attention other than the engine's (the text encoder keeps its
    own): sdpa (torch's kernels; math: its math backend), classic (all heads at once)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if pipe.unet.device.type != "meta":
        latent.layout(pipe)
    processor = {"sdpa": AttnProcessor2_0, "math": AttnProcessor2_0, "classic": AttnProcessor}
    for part in (pipe.unet, pipe.vae):
        if channels_last and part.device.type != "meta":
            part.to(memory_format=torch.channels_last)
        if attention in processor:
            part.set_attn_processor(processor[attention]())


@contextlib.contextmanager
def _attention(name: str) -> Iterator[None]:
    if name != "math":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


# -- the measured parts, each in a child process ----------------------------------------------


def _repeat(fn: Callable[[], object], dev: torch.device, n: int) -> dict:
    """`fn` once untimed (first-call allocations), then `n` times: mean wall and CPU seconds."""
    fn()
    walls, cpus = [], []
    for _ in range(n):
        cpu = time.process_time()
        walls.append(bench._timed(fn, dev))
        cpus.append(time.process_time() - cpu)
    return {"s": sum(walls) / n, "cpu_s": sum(cpus) / n, "times_s": [round(t, 3) for t in walls]}


def _selection(side: int, dev: torch.device) -> torch.Tensor:
    """The selection's alpha on the canvas: its middle quarter by area."""
    seen = torch.zeros(1, 1, side, side, device=dev)
    seen[..., side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1
    return seen


def _text(pipe: latent_models.Pipeline, opts: dict) -> dict:
    from engine.guidance import Guide
    from engine.models import load_clip

    dev, n = pipe.device, opts["steps"]
    text = _repeat(lambda: latent.embed(pipe, ["", PROMPT]), dev, n)  # negative, positive
    guide = Guide(load_clip(opts["clip"], dev), 1)  # as run_edit ranks: one variant at a time
    picture = torch.rand(1, 3, pipe.native, pipe.native, device=dev) * 2 - 1
    masked = picture * _selection(pipe.native, dev)
    rank = _repeat(lambda: guide.rank_distance(masked, PROMPT), dev, n)
    return {"text": text, "rank": rank, "clip": guide.clip.label}


def _vae(pipe: latent_models.Pipeline, opts: dict) -> dict:
    dev, side, n = pipe.device, pipe.native, opts["steps"]
    if side >= 256:
        pipe.vae.enable_tiling()  # as latent.Latent does (one tile at the native side)
    pixels = torch.rand(1, 3, side, side, device=dev) * 2 - 1
    encode = _repeat(lambda: latent.encode(pipe, pixels), dev, n)
    z = torch.randn(1, pipe.vae.config.latent_channels, side // pipe.vae_factor,
                    side // pipe.vae_factor, device=dev, dtype=pipe.dtype)  # fmt: skip
    decode = _repeat(lambda: pipe.vae.decode(z / pipe.scaling).sample.float(), dev, n)
    return {"encode": encode, "decode": decode}


def _steps(pipe: latent_models.Pipeline, opts: dict, settings: request.Settings) -> dict:
    """Guided steps as run_edit runs them, the first a warm-up: each step's time is read at the
    loop's callback, which follows the UNet, the scheduler's step and the blend."""
    dev, side, batch = pipe.device, pipe.native, opts["batch"]
    scale, cfg = latent._guidance(pipe, settings)
    # the negative and the positive prompt's embeddings, or the prompt's alone: random, at the
    # text encoder's shape (the encoder is a part of its own, and not built here)
    texts = 2 if cfg else 1
    width = pipe.unet.config.cross_attention_dim
    text = torch.randn(texts, pipe.tokenizer.model_max_length, width, device=dev, dtype=pipe.dtype)
    masks = latent.latent_masks(_selection(side, dev), pipe.vae_factor, settings.mask_shrink)
    cells = side // pipe.vae_factor
    source = torch.randn(1, 4, cells, cells, device=dev)  # the latents fp32, as run_edit keeps them
    extra = torch.cat([masks[-1], source], dim=1).to(pipe.dtype) if pipe.inpaint else None
    cond = None
    if pipe.unet.config.get("time_cond_proj_dim"):  # an LCM-distilled UNet's guidance input
        cond = latent._guidance_embedding(scale, pipe.unet.config.time_cond_proj_dim, 1)
        cond = cond.to(dev, pipe.dtype)
    model = latent.denoiser(pipe, text, scale, cfg, extra=extra, cond=cond, batch=batch)
    scheduler = latent.make_scheduler(settings.scheduler, pipe.schedule)
    timesteps = latent.timesteps_for(scheduler, settings, dev)
    timed = min(opts["steps"], len(timesteps) - 1)  # LCM's 4 steps: at most 3 after the warm-up
    marks = [(time.perf_counter(), time.process_time())]

    def mark(*_: object) -> None:
        devices.synchronize(dev)
        marks.append((time.perf_counter(), time.process_time()))

    generators = devices.generators(list(range(batch)), dev)
    latent.blended_latent_diffusion(
        model, scheduler, timesteps[: timed + 1], source, masks, generators,
        from_noise=settings.strength == 100, callback=mark,
    )  # fmt: skip
    walls = [b[0] - a[0] for a, b in pairwise(marks[1:])]  # marks[0] -> [1]: the warm-up
    cpus = [b[1] - a[1] for a, b in pairwise(marks[1:])]
    return {
        "step": {"s": sum(walls) / timed, "cpu_s": sum(cpus) / timed,
                 "times_s": [round(t, 3) for t in walls]},
        "unet_batch": texts * batch, "guidance": scale, "scheduler": settings.scheduler,
    }  # fmt: skip


def _edit(pipe: latent_models.Pipeline, opts: dict, settings: request.Settings) -> dict:
    """The default edit end to end (latent.run_edit), of a random picture at the native side."""
    import numpy as np

    from engine.models import load_clip

    method = latent.Latent(pipe, load_clip(opts["clip"], pipe.device))
    side = pipe.native
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    mask = (_selection(side, torch.device("cpu"))[0, 0].numpy() * 255).astype(np.uint8)
    planned = method.describe().plan(mask, settings)
    cpu, start = time.process_time(), time.perf_counter()
    method.run(image, mask, PROMPT, settings, plan=planned)
    devices.synchronize(pipe.device)
    return {
        "edit": {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu},
        "canvas": list(planned.canvas.size),
    }


def measure(part: str, model: str, opts: dict) -> dict:
    """One part's times, in this process: its models built for it alone."""
    dev = devices.resolve(opts["device"])
    dtype = latent_models.dtype_for(opts["precision"], dev)
    need = {"text": ("text",), "vae": ("vae",), "step": ("unet",), "lcm_step": ("unet",)}
    pipe = random_pipeline(model, dev, dtype, need.get(part, ALL))
    _layout(pipe, opts["channels_last"], opts["attention"])
    settings = request.check({"batch": opts["batch"]}, method=request.LATENT)
    with torch.inference_mode(), _attention(opts["attention"]):
        if part == "text":
            out = _text(pipe, opts)
        elif part == "vae":
            out = _vae(pipe, opts)
        elif part == "step":
            out = _steps(pipe, opts, settings)
        elif part == "lcm_step":
            lcm = request.check({**LCM, "batch": opts["batch"]}, method=request.LATENT)
            out = _steps(pipe, opts, lcm)
        else:
            out = _edit(pipe, opts, settings)
    return out | {
        "peak_rss_mb": bench._peak_rss_mb(),
        "device_peak_mb": devices.peak_memory_mb(dev),
        "precision": devices.resolve_precision(opts["precision"], dev),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "side": pipe.native,
    }


def _child(part: str, model: str, opts: dict) -> dict:
    cmd = [sys.executable, "-m", "engine.bench_latent", part, model, json.dumps(opts)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=os.environ | bench.ISA_CAPS[opts["isa"]]
    )
    if done.returncode != 0:
        raise RuntimeError(f"latent bench {part} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the run: children, then the edits composed --------------------------------------------------


def _ratio(x: float) -> float:
    return float(f"{x:.4g}")  # 4 significant digits: a tiny model's ratios are small


def run_bench(args: argparse.Namespace) -> dict:
    for option in ("refine", "unet_checkpoint", "lora"):
        if getattr(args, option, None):
            raise ValueError(f"--{option.replace('_', '-')} is not for the latent bench")
    if args.model != latent_models.TINY:
        _configurations(args.model)  # before any child starts
    if args.pixel_model not in PIXEL_MODELS:
        raise ValueError(f"unknown pixel model '{args.pixel_model}' (--pixel-model)")
    if not str(args.batch).isdigit():
        raise ValueError(f"--batch {args.batch}: the latent bench takes one batch size")
    batch = int(args.batch)
    opts = {
        "device": args.device, "precision": args.precision, "isa": args.isa, "steps": args.steps,
        "batch": batch, "channels_last": args.channels_last, "attention": args.attention,
        "clip": (args.clip or ("tiny" if args.model == latent_models.TINY
                               else "ViT-B-16-quickgelu")).partition(":")[0],
    }  # fmt: skip
    parts = list(PARTS if args.full_edit else PARTS[:-1])
    runs = {part: _child(part, args.model, opts) for part in parts}
    # the pixel method's default edit, one variant at a time, from bench.py's engine step
    pixel = request.check({}, method=request.PIXEL)
    pixel_opts = {
        "device": args.device, "precision": args.precision, "isa": args.isa,
        "guidance_mode": args.guidance_mode or pixel.guidance_mode,
        "guidance_every": args.guidance_every or pixel.guidance_every,
        "recompute": args.recompute, "breakdown": False,
    }  # fmt: skip
    runs["pixel"] = bench._child("engine", args.pixel_model, 1, args.steps, pixel_opts)

    settings = request.check({"batch": batch}, method=request.LATENT)
    lcm = request.check({**LCM, "batch": batch}, method=request.LATENT)
    n = settings.variants
    text, rank = runs["text"]["text"]["s"], runs["text"]["rank"]["s"]
    encode, decode = runs["vae"]["encode"]["s"], runs["vae"]["decode"]["s"]

    def composed(step: str, steps_run: int, s: str = "s") -> dict:
        """The edit's parts in wall seconds (`s`) or CPU seconds (`cpu_s`)."""
        return {
            "text": runs["text"]["text"][s], "encode": runs["vae"]["encode"][s],
            "denoise": math.ceil(n / batch) * steps_run * runs[step]["step"][s],
            "decode": n * runs["vae"]["decode"][s], "rank": n * runs["text"]["rank"][s],
        }  # fmt: skip

    edit = composed("step", settings.steps_run)
    lcm_edit = composed("lcm_step", lcm.steps_run)
    bd_edit_s = runs["pixel"]["step_s"] * pixel.steps_run * pixel.variants
    edit_s, lcm_edit_s = sum(edit.values()), sum(lcm_edit.values())
    # on a machine shared with another job: CPU seconds grow much less with its load than wall
    edit_cpu_s = sum(composed("step", settings.steps_run, "cpu_s").values())
    bd_edit_cpu_s = runs["pixel"]["step_cpu_s"] * pixel.steps_run * pixel.variants
    dev = devices.resolve(args.device)
    step = runs["step"]
    result = {
        "model": args.model,
        "weights": "random (timing only)",
        "device": str(dev),
        "device_name": devices.identity(dev),
        "side": step["side"],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_flags": bench.cpu_flags(),
        "isa": args.isa,  # native, or the instruction sets the children were capped at
        "cpu_capability": step["cpu_capability"],  # ATen's kernels as the children ran them
        "precision": step["precision"],
        "channels_last": args.channels_last,
        "attention": args.attention,
        "steps_timed": args.steps,
        "batch": batch,
        "step_s": round(step["step"]["s"], 4),
        "step_cpu_s": round(step["step"]["cpu_s"], 4),
        "step_times_s": step["step"]["times_s"],
        "unet_batch": step["unet_batch"],
        "lcm_step_s": round(runs["lcm_step"]["step"]["s"], 4),
        "lcm_step_cpu_s": round(runs["lcm_step"]["step"]["cpu_s"], 4),
        "lcm_unet_batch": runs["lcm_step"]["unet_batch"],
        "text_s": round(text, 4),
        "rank_s": round(rank, 4),
        "rank_clip": runs["text"]["clip"],
        "encode_s": round(encode, 4),
        "decode_s": round(decode, 4),
        "edit": {
            "scheduler": settings.scheduler,
            "steps": settings.steps,
            "strength": settings.strength,
            "steps_run": settings.steps_run,
            "variants": n,
            "guidance": settings.guidance_scale,
        },
        "edit_s": round(edit_s, 4),
        "edit_from": "measured parts",
        "edit_parts_s": {k: round(v, 4) for k, v in edit.items()},
        "edit_measured_s": round(runs["edit"]["edit"]["s"], 4) if args.full_edit else None,
        "edit_measured_cpu_s": round(runs["edit"]["edit"]["cpu_s"], 4) if args.full_edit else None,
        "edit_measured_canvas": runs["edit"]["canvas"] if args.full_edit else None,
        "lcm_edit": {
            "scheduler": "lcm",
            "steps": lcm.steps,
            "steps_run": lcm.steps_run,
            "variants": n,
            "guidance": lcm.guidance_scale,
        },
        "lcm_edit_s": round(lcm_edit_s, 4),
        "lcm_edit_parts_s": {k: round(v, 4) for k, v in lcm_edit.items()},
        "pixel_model": args.pixel_model,
        "bd_precision": runs["pixel"]["precision"],
        "bd_step_s": round(runs["pixel"]["step_s"], 4),
        "bd_step_cpu_s": round(runs["pixel"]["step_cpu_s"], 4),
        "bd_edit": {
            "steps_run": pixel.steps_run,
            "variants": pixel.variants,
            "guidance_mode": pixel_opts["guidance_mode"],
            "guidance_every": pixel_opts["guidance_every"],
        },
        "bd_edit_s": round(bd_edit_s, 4),
        "bd_edit_from": "engine/bench.py's engine step x steps_run x variants",
        "ratio": _ratio(edit_s / bd_edit_s),
        "edit_cpu_s": round(edit_cpu_s, 4),
        "bd_edit_cpu_s": round(bd_edit_cpu_s, 4),
        "cpu_ratio": _ratio(edit_cpu_s / bd_edit_cpu_s),
        "lcm_ratio": _ratio(lcm_edit_s / bd_edit_s),
        "peak_rss_mb": {k: round(r["peak_rss_mb"]) for k, r in runs.items()},
        "device_peak_mb": {
            k: round(r["device_peak_mb"]) for k, r in runs.items() if r["device_peak_mb"]
        },
    }
    return result


def table(result: dict) -> str:
    """The bench as a person reads it."""
    e, lcm, bd = result["edit"], result["lcm_edit"], result["bd_edit"]
    rss, gpu = result["peak_rss_mb"], result["device_peak_mb"]

    def peak(part: str) -> str:
        return f"{rss[part]:>8}" + (f" (device {gpu[part]} MB)" if part in gpu else "")

    lines = [
        f"{result['model']} ({result['weights']}) at {result['side']} px, "
        f"{result['device_name']}, {result['precision']}, {result['cores']} cores (CPU flags: "
        f"{' '.join(result['cpu_flags']) or 'none'}; run as {result['cpu_capability']}"
        f"{'' if result['isa'] == 'native' else ', capped'}), attention {result['attention']}, "
        f"{'channels-last' if result['channels_last'] else 'contiguous'}",
        f"{'part':40}{'s':>8}{'peak MB':>8}",
        f"{'guided step (UNet batch ' + str(result['unet_batch']) + ')':40}"
        f"{result['step_s']:>8.3f}{peak('step')}",
        f"{'lcm step (UNet batch ' + str(result['lcm_unet_batch']) + ')':40}"
        f"{result['lcm_step_s']:>8.3f}{peak('lcm_step')}",
        f"{'text encoder / ranking CLIP (a variant)':40}"
        f"{result['text_s']:>8.3f}{peak('text')}  / {result['rank_s']:.3f}",
        f"{'VAE encode / decode':40}{result['encode_s']:>8.3f}{peak('vae')}  / "
        f"{result['decode_s']:.3f}",
        f"{'pixel step (' + result['pixel_model'] + ', batch 1)':40}"
        f"{result['bd_step_s']:>8.3f}{peak('pixel')}",
        f"edit, {e['variants']} variants x {e['steps_run']} of {e['steps']} {e['scheduler']} "
        f"steps: {result['edit_s']:.1f} s (from measured parts"
        + (f"; end to end {result['edit_measured_s']:.1f} s" if result["edit_measured_s"] else "")
        + ")",
        f"lcm edit, {lcm['variants']} variants x {lcm['steps_run']} steps: "
        f"{result['lcm_edit_s']:.1f} s",
        f"pixel edit ({result['pixel_model']}), {bd['variants']} variants x {bd['steps_run']} steps"
        f": {result['bd_edit_s']:.1f} s",
        f"ratio latent / pixel: {result['ratio']:.4f} (lcm: {result['lcm_ratio']:.4f}; in CPU "
        f"seconds: {result['cpu_ratio']:.4f})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # one measured part, in a process of its own
    part, model, opts = sys.argv[1:4]
    devices.keep_freed_host_memory()  # as `python -m engine` runs
    print(json.dumps(measure(part, model, json.loads(opts))))
