"""Time a guided step: the official formulation against the engine's, in one run.

Each formulation runs in a child process of its own so that its peak memory is its own. The
models are built with random weights in the named architecture: no weight files are needed, and
the time of a step does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from engine.guidance import Guide
from engine.models import CONFIGS, build_unet, load_clip, make_diffusion, resolve_device
from engine.reference import official_cond_fn, official_step
from engine.sampler import blend, clip_loss_fn, guided_step, randn

SCHEDULE_STEPS, SKIP = 100, 25  # the official defaults: the timed steps are the first after skip


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(part: str, model: str, batch: int, steps: int, mode: str, device: str) -> dict:
    """Seconds per step of `part` ('reference' or 'engine') and the process's peak memory."""
    dev = resolve_device(device)
    config = CONFIGS[model]
    unet = build_unet(config, use_fp16=dev.type == "cuda", seed=0)
    unet.requires_grad_(False).eval().to(dev)
    if dev.type == "cuda":
        unet.convert_to_fp16()
    clip_name = config.default_clip.partition(":")[0]  # the architecture, random weights
    guide = Guide(load_clip(clip_name, dev))
    diffusion = make_diffusion(config, SCHEDULE_STEPS)
    size = config.image_size
    g = [torch.Generator(device=dev).manual_seed(i) for i in range(batch)]
    source = (
        torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev) * 2 - 1
    )
    source = source.expand(batch, -1, -1, -1)
    mask = torch.zeros(1, 1, size, size, device=dev)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    prompt = "a stone fountain"
    guide.text(prompt)  # cached per prompt in both formulations
    kwargs = {"y": torch.zeros(batch, dtype=torch.long, device=dev)} if config.class_cond else None
    if part == "reference":
        cond_fn = official_cond_fn(diffusion, unet, guide, mask, prompt, 1000.0, 50.0)

        def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return official_step(diffusion, unet, cond_fn, source, mask, x, t)
    else:
        loss_fn = clip_loss_fn(diffusion, guide, mask, prompt, 1000.0, 50.0)

        def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x, _ = guided_step(
                diffusion, unet, x, t, loss_fn, randn(g, x.shape[1:]),
                guidance_mode=mode, model_kwargs=kwargs,
            )  # fmt: skip
            return blend(diffusion, x, source, mask, t, randn(g, x.shape[1:]))

    x = randn(g, source.shape[1:])
    rss_models = _peak_rss_mb()
    times = []
    for i in range(-1, steps):  # step -1 warms up (first-call allocations), untimed
        t = torch.full((batch,), SCHEDULE_STEPS - SKIP - 2 - i, device=dev, dtype=torch.long)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x = step(x, t)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 0:
            times.append(time.perf_counter() - start)
    return {
        "step_s": sum(times) / len(times),
        "peak_rss_mb": _peak_rss_mb(),
        "models_rss_mb": rss_models,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
    }


def _child(part: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, "-m", "engine.bench", part, args.model, str(args.batch),
        str(args.steps), args.guidance_mode, args.device,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"bench {part} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(args: argparse.Namespace) -> dict:
    if args.model not in CONFIGS:
        raise ValueError(f"unknown model '{args.model}'")
    ref, eng = _child("reference", args), _child("engine", args)
    return {
        "model": args.model,
        "weights": "random (timing only)",
        "device": str(resolve_device(args.device)),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "steps_timed": args.steps,
        "guidance_mode": args.guidance_mode,
        "reference_step_s": round(ref["step_s"], 3),
        "engine_step_s": round(eng["step_s"], 3),
        "ratio": round(eng["step_s"] / ref["step_s"], 3),
        "reference_peak_rss_mb": round(ref["peak_rss_mb"]),
        "engine_peak_rss_mb": round(eng["peak_rss_mb"]),
        "peak_rss_mb": round(max(ref["peak_rss_mb"], eng["peak_rss_mb"])),
    }


if __name__ == "__main__":  # one measured part, in a process of its own
    part, model, batch, steps, mode, device = sys.argv[1:7]
    print(json.dumps(measure(part, model, int(batch), int(steps), mode, device)))
