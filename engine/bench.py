"""Time a guided step: the official formulation against the engine's, in one run.

Each measurement runs in a child process of its own so that its peak memory is its own. The
models are built with random weights in the named architecture: no weight files are needed, and
the time of a step does not depend on the weights' values. The reference is the official code's
step at batch 1 in fp32 (what it runs on a CPU); the engine runs with the settings given, at each
batch size asked for, and its first batch is broken down into UNet forward, UNet backward,
augmentations, CLIP and the rest. After each engine step it also renders that step's previews
(engine/preview.py: every variant's x0 composited, ranked by CLIP and PNG-encoded, as the server
sends them), timed apart: a step with previews on costs step + preview, so the ratio is measured
within one process under one load, at the worst case of a preview every step. `--refine 2,4`
also times a step of the refinement pass (engine/tiles.py: unguided, the UNet over tiles) on
canvases 2x and 4x the model's side, and gives the pass's time relative to the base edit's.
Each step is timed in wall seconds and in the process's CPU seconds: on a machine shared with
another job the wall times of the two formulations grow with whatever else ran meanwhile, their
CPU seconds much less, so `cpu_ratio` is the figure to read there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from engine import accel, devices, preview, region
from engine.guidance import Guide
from engine.models import CONFIGS, build_unet, load_clip, make_diffusion
from engine.reference import official_cond_fn, official_step
from engine.sampler import blend, clip_loss_fn, guided_step, randn
from engine.shared.geometry import Canvas, Rect, tile_grid
from engine.shared.request import Settings
from engine.tiles import Tiled

SCHEDULE_STEPS, SKIP = 100, 25  # the official defaults: 75 denoising steps an edit
REFINE_STEPS = Settings(steps=SCHEDULE_STEPS).refine_steps  # the pass's, at its defaults
PROMPT = "a stone fountain"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn: Callable[[], object], dev: torch.device) -> float:
    devices.synchronize(dev)
    start = time.perf_counter()
    fn()
    devices.synchronize(dev)
    return time.perf_counter() - start


def _breakdown(unet, guide, mask, x, t, mode: str, dev: torch.device) -> dict:
    """One guided step's parts, each timed alone (under the same precision and recompute)."""
    x = x.detach().requires_grad_(mode == "full")
    out: dict = {}
    with torch.set_grad_enabled(mode == "full"):  # fast mode runs the UNet without grad
        parts = {"unet_forward_s": _timed(lambda: out.update(eps=unet(x, t)), dev)}
    if mode == "full":
        grad = torch.randn_like(out["eps"])
        parts["unet_backward_s"] = _timed(lambda: torch.autograd.grad(out["eps"], x, grad), dev)
    images = (torch.rand_like(x) * 2 - 1).requires_grad_()
    parts["augment_s"] = _timed(lambda: out.update(aug=guide.augment(images * mask)), dev)
    loss = {}
    parts["clip_forward_s"] = _timed(lambda: loss.update(v=guide.loss(images * mask, PROMPT)), dev)
    parts["clip_backward_s"] = _timed(lambda: torch.autograd.grad(loss["v"], images), dev)
    parts["clip_forward_s"] -= parts["augment_s"]  # guide.loss augments too
    return {k: round(v, 3) for k, v in parts.items()}


def measure(part: str, model: str, batch: int, steps: int, opts: dict) -> dict:
    """Seconds per step of `part` ('reference' or 'engine') and the process's peak memory."""
    dev = devices.resolve(opts["device"])
    config = CONFIGS[model]
    official_fp16 = part == "reference" and devices.fp16_blocks(dev)  # as the official code
    unet = build_unet(config, use_fp16=official_fp16, seed=0)
    unet.requires_grad_(False).eval().to(dev)
    if official_fp16:
        unet.convert_to_fp16()
    # random weights; the official formulation with open_clip's own attention
    guide = Guide(load_clip(config.default_clip.partition(":")[0], dev, part != "reference"))
    diffusion = make_diffusion(config, SCHEDULE_STEPS, dev)
    size = config.image_size
    g = devices.generators(list(range(batch)), dev)
    source = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    source = (source * 2 - 1).expand(batch, -1, -1, -1)
    mask = torch.zeros(1, 1, size, size, device=dev)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    guide.text(PROMPT)  # cached per prompt in both formulations
    precision, recompute = ("fp16" if official_fp16 else "fp32"), False
    if part == "reference":
        cond_fn = official_cond_fn(diffusion, unet, guide, mask, PROMPT, 1000.0, 50.0)

        def step(x: torch.Tensor, t: torch.Tensor, _i: int) -> torch.Tensor:
            return official_step(diffusion, unet, cond_fn, source, mask, x, t)
    else:
        accel.prepare(unet, dev)
        precision = devices.resolve_precision(opts["precision"], dev)
        recompute = accel.resolve_recompute(opts["recompute"], config.arch, batch, precision, dev)
        loss_fn = clip_loss_fn(diffusion, guide, mask, PROMPT, 1000.0, 50.0)
        kwargs = (
            {"y": torch.zeros(batch, dtype=torch.long, device=dev)} if config.class_cond else None
        )
        engine_unet = accel.in_precision(unet, dev, precision)
        estimate: dict[str, torch.Tensor] = {}

        def step(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            guided = loss_fn if i % opts["guidance_every"] == 0 else None
            x, estimate["x0"] = guided_step(
                diffusion, engine_unet, x, t, guided, randn(g, x.shape[1:]),
                guidance_mode=opts["guidance_mode"], model_kwargs=kwargs,
            )  # fmt: skip
            return blend(diffusion, x, source, mask, t, randn(g, x.shape[1:]))

        picture = ((source[0].permute(1, 2, 0) + 1) * 127.5).byte().cpu().numpy()
        selection = (mask[0, 0] * 255).byte().cpu().numpy()
        whole = Canvas(Rect(0, 0, size, size), size, size, (size, size))
        sel = region.selection_bounds(selection)
        previewer = preview.Previewer(
            guide, PROMPT, picture, selection, whole, sel, mask, list(range(batch))
        )

        def render() -> None:  # what the server does for a progress message with previews
            for shown in previewer(estimate["x0"], 128, guide.take_seen()):
                preview.encode_png(shown.rgba)

    x = randn(g, source.shape[1:])
    rss_models = _peak_rss_mb()
    times, cpu_times, preview_times = [], [], []
    clip_precision = devices.clip_precision(precision, dev)
    with devices.autocast(dev, clip_precision), accel.recompute(unet, recompute):
        for i in range(-1, steps):  # step -1 warms up (first-call allocations), untimed
            t = torch.full((batch,), SCHEDULE_STEPS - SKIP - 2 - i, device=dev, dtype=torch.long)
            cpu = time.process_time()
            elapsed = _timed(lambda t=t, i=i: x.copy_(step(x, t, max(i, 0))), dev)
            if i >= 0:
                times.append(elapsed)
                cpu_times.append(time.process_time() - cpu)
                if part == "engine":
                    preview_times.append(_timed(render, dev))
            guide.take_seen()  # the warm-up's (and the reference's) distances: not previewed
        peak = _peak_rss_mb()
        parts = (
            _breakdown(engine_unet, guide, mask, x, t, opts["guidance_mode"], dev)
            if part == "engine" and opts["breakdown"]
            else {}
        )
    step_s = sum(times) / len(times)
    if parts:
        parts["other_s"] = round(step_s - sum(parts.values()), 3)
    return {
        "step_s": step_s,
        "step_times_s": [round(t, 3) for t in times],
        # the process's CPU seconds a step (all its threads): the same under another job's load
        # as on a quiet machine, where wall seconds grow with the load
        "step_cpu_s": sum(cpu_times) / len(cpu_times),
        "preview_s": sum(preview_times) / len(preview_times) if preview_times else 0.0,
        "peak_rss_mb": peak,
        "models_rss_mb": rss_models,
        "device_peak_mb": devices.peak_memory_mb(dev),
        "precision": precision,
        "recompute": recompute,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "breakdown": parts,
    }


def measure_refine(model: str, scale: int, steps: int, opts: dict) -> dict:
    """Seconds per step of the refinement pass on a canvas `scale` x the model's side."""
    dev = devices.resolve(opts["device"])
    config = CONFIGS[model]
    unet = build_unet(config, seed=0).requires_grad_(False).eval().to(dev)
    accel.prepare(unet, dev)
    precision = devices.resolve_precision(opts["precision"], dev)
    native, overlap = config.image_size, Settings.refine_overlap
    unet = accel.in_precision(unet, dev, precision)
    side, g = native * scale, devices.generators([0], dev)
    # every tile of the canvas runs: the pass at its most
    tiles = tile_grid(Canvas(Rect(0, 0, side, side), side, side, (side, side)), native, overlap)
    tiled = Tiled(unet, tiles, overlap)
    diffusion = make_diffusion(config, SCHEDULE_STEPS, dev)
    source = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.zeros(1, 1, side, side, device=dev)
    mask[..., side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1
    kwargs = {"y": torch.zeros(1, dtype=torch.long, device=dev)} if config.class_cond else {}
    x = randn(g, source.shape[1:])
    times = []
    with torch.no_grad():
        unet(x[..., :native, :native], torch.zeros(1, device=dev), **kwargs)  # warm-up: a tile
        for i in range(steps):
            t = torch.full((1,), REFINE_STEPS - 1 - i, device=dev, dtype=torch.long)

            def step(t: torch.Tensor = t) -> torch.Tensor:
                y, _ = guided_step(diffusion, tiled, x, t, None, randn(g, x.shape[1:]),
                                   model_kwargs=kwargs or None)  # fmt: skip
                return x.copy_(blend(diffusion, y, source, mask, t, randn(g, x.shape[1:])))

            times.append(_timed(step, dev))
    return {
        "scale": scale,
        "tiles": len(tiles),
        "step_s": sum(times) / len(times),
        "peak_rss_mb": _peak_rss_mb(),
        "precision": precision,
    }


def cpu_flags() -> list[str]:
    """What decides a CPU's precision and speed, from torch's own CPU detection (every OS)."""
    checks = {
        "avx2": torch.cpu._is_avx2_supported,
        "avx512f": torch.cpu._is_avx512_supported,
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported,
        "amx": torch.cpu._is_amx_tile_supported,
    }
    return [flag for flag, present in checks.items() if present()]


# `--isa avx2`: the children run this CPU as one without AVX-512 or bf16 would (ATen's kernels
# and oneDNN's capped; the engine then resolves auto to fp32, devices.cpu_has_native_bf16).
ISA_CAPS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def _child(part: str, model: str, batch: int, steps: int, opts: dict) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "engine.bench",
        part,
        model,
        str(batch),
        str(steps),
        json.dumps(opts),
    ]
    env = os.environ | ISA_CAPS[opts["isa"]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench {part} at batch {batch} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(args: argparse.Namespace) -> dict:
    if args.model not in CONFIGS:
        raise ValueError(f"unknown model '{args.model}'")
    batches = [int(b) for b in str(args.batch).split(",")]
    opts = {
        "device": args.device,
        "guidance_mode": args.guidance_mode,
        "guidance_every": args.guidance_every,
        "precision": args.precision,
        "recompute": args.recompute,
        "breakdown": not args.no_breakdown,
        "isa": args.isa,
    }
    ref = _child("reference", args.model, 1, args.steps, opts)
    runs = [
        _child(
            "engine", args.model, b, args.steps, opts | {"breakdown": opts["breakdown"] and i == 0}
        )
        for i, b in enumerate(batches)
    ]
    eng = runs[0]
    denoising = SCHEDULE_STEPS - SKIP
    scales = [int(x) for x in str(args.refine).split(",")] if args.refine else []
    refines = [_child("refine", args.model, x, args.steps, opts) for x in scales]
    return {
        "model": args.model,
        "weights": "random (timing only)",
        "device": str(devices.resolve(args.device)),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "isa": args.isa,  # native, or the instruction sets the children were capped at
        "cpu_capability": eng["cpu_capability"],  # ATen's kernels as the children ran them
        "threads": torch.get_num_threads(),
        "steps_timed": args.steps,
        "guidance_mode": args.guidance_mode,
        "guidance_every": args.guidance_every,
        "precision": eng["precision"],
        "reference_precision": ref["precision"],
        "reference_step_s": round(ref["step_s"], 3),
        "engine_step_s": round(eng["step_s"], 3),
        "reference_step_times_s": ref["step_times_s"],
        "engine_step_times_s": eng["step_times_s"],
        "ratio": round(eng["step_s"] / ref["step_s"], 3),
        "reference_step_cpu_s": round(ref["step_cpu_s"], 3),
        "engine_step_cpu_s": round(eng["step_cpu_s"], 3),
        "cpu_ratio": round(eng["step_cpu_s"] / ref["step_cpu_s"], 3),
        "reference_peak_rss_mb": round(ref["peak_rss_mb"]),
        "engine_peak_rss_mb": round(eng["peak_rss_mb"]),
        "peak_rss_mb": round(max(ref["peak_rss_mb"], eng["peak_rss_mb"])),
        "reference_edit_s": round(ref["step_s"] * denoising),
        "engine_breakdown": eng["breakdown"],
        # a step with previews on (one every step, the worst case) against one without
        "preview_s": round(eng["preview_s"], 4),
        "preview_cost": round(eng["preview_s"] / eng["step_s"], 4),
        "engine_by_batch": [
            {
                "batch": b,
                "precision": r["precision"],
                "recompute": r["recompute"],
                "step_s": round(r["step_s"], 3),
                "step_per_variant_s": round(r["step_s"] / b, 3),
                "peak_rss_mb": round(r["peak_rss_mb"]),
                "peak_per_variant_mb": round(r["peak_rss_mb"] / b),
                "edit_s": round(r["step_s"] * denoising),  # extrapolated: 75 steps, all variants
            }
            for b, r in zip(batches, runs, strict=True)
        ],
        # per variant: the pass's steps against the base edit's (one variant, batch 1)
        "refine_steps": REFINE_STEPS,
        "refine_by_scale": [
            {
                "scale": r["scale"],
                "tiles": r["tiles"],
                "step_s": round(r["step_s"], 3),
                "peak_rss_mb": round(r["peak_rss_mb"]),
                "pass_s": round(r["step_s"] * REFINE_STEPS),
                "vs_base_edit": round(r["step_s"] * REFINE_STEPS / (eng["step_s"] * denoising), 3),
            }
            for r in refines
        ],
    }


def table(result: dict) -> str:
    """The bench as a person reads it."""
    lines = [
        f"{result['model']} ({result['weights']}), {result['device']}, {result['cores']} cores"
        f" (CPU flags: {' '.join(result['cpu_flags']) or 'none of avx2/avx512f/avx512_bf16/amx'}"
        f"; run as {result['cpu_capability']}{'' if result['isa'] == 'native' else ', capped'})"
        f", guidance {result['guidance_mode']} every {result['guidance_every']}",
        f"{'':28}{'precision':>10}{'s/step':>9}{'peak MB':>9}{'edit s':>8}",
        f"{'official, batch 1':28}{result['reference_precision']:>10}"
        f"{result['reference_step_s']:>9.2f}"
        f"{result['reference_peak_rss_mb']:>9}{result['reference_edit_s']:>8}",
    ]
    for r in result["engine_by_batch"]:
        name = f"engine, batch {r['batch']}{' (recompute)' if r['recompute'] else ''}"
        lines.append(
            f"{name:28}{r['precision']:>10}{r['step_s']:>9.2f}{r['peak_rss_mb']:>9}{r['edit_s']:>8}"
        )
    lines.append(
        f"ratio engine/official at batch 1: {result['ratio']} (CPU seconds: {result['cpu_ratio']})"
    )
    lines.append(
        f"previews (a preview every step, worst case): {result['preview_s']:.3f} s a step, "
        f"step with previews / without = {1 + result['preview_cost']:.4f}"
    )
    if result["engine_breakdown"]:
        lines.append(
            "engine step: "
            + ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in result["engine_breakdown"].items())
        )
    for r in result["refine_by_scale"]:
        lines.append(
            f"refinement at {r['scale']}x ({r['tiles']} tiles): {r['step_s']:.2f} s/step, "
            f"{result['refine_steps']} steps {r['pass_s']} s = {r['vs_base_edit']:.2f}x the base "
            f"edit, peak {r['peak_rss_mb']} MB"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # one measured part, in a process of its own
    part, model, batch, steps, opts = sys.argv[1:6]
    if part != "reference":  # as `python -m engine` runs; the official script keeps glibc's default
        devices.keep_freed_host_memory()
    run = measure_refine if part == "refine" else lambda *a: measure(part, *a)
    print(json.dumps(run(model, int(batch), int(steps), json.loads(opts))))
