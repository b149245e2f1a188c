"""Train the demo world's CLIP and UNet on CPU within a wall-clock budget.

    python -m engine.demo.train clip --minutes 8
    python -m engine.demo.train unet --minutes 90

Both write plain state dicts (float16, to keep the files small) that `engine.models.load_models`
("demo") reads, plus a JSON file of what the run did. The UNet is saved every few minutes, so a
long run can be used (and checked) before it ends; files are replaced atomically so a reader
never sees half a checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.demo import world

DEFAULT_OUT = Path(__file__).parent / "weights"
EVAL_SEED = 20_241_124  # held-out images: a seed the training streams never use


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save a float16 copy of a state dict, atomically (write a temporary file, then rename)."""
    half = {
        k: v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()
        for k, v in state.items()
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(half, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, info: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def _lr(base: float, frac: float, warmup: float = 0.05) -> float:
    """Linear warm-up then cosine decay, over the fraction of the time budget spent."""
    if frac < warmup:
        return base * frac / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warmup) / (1 - warmup))))


def ema_update(
    pairs: list[tuple[torch.nn.Module, torch.nn.Module]], step: int, ceiling: float
) -> None:
    """Move each (average, model) pair's average toward the model. Early on a 0.999 average
    would still be mostly the random initial weights: the rate warms up to `ceiling`."""
    rate = min(ceiling, (1 + step) / (10 + step))
    with torch.no_grad():
        for ema, model in pairs:
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - rate)


def _bar(budget_s: float, what: str) -> tqdm:
    # Counts seconds, not steps: the budget is time, and the step rate is only known as it runs.
    return tqdm(total=round(budget_s), unit="s", desc=what, file=sys.stderr, mininterval=5)


# --- CLIP --------------------------------------------------------------------------------------


def clip_images(clip, x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to CLIP's input: [0, 1], then OpenAI's normalisation, as guidance does."""
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


@torch.no_grad()
def zero_shot(clip, n_per_caption: int = 30, seed: int = EVAL_SEED) -> dict[str, float]:
    """Accuracy of picking the right caption among the 18, on held-out seeded images.

    `colour` and `shape` count the predicted caption's colour (shape) alone.
    """
    model = clip.model
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    images, truth = [], []
    for i, cap in enumerate(world.CAPTIONS):
        colour, kind = cap.split()[1:]
        for _ in range(n_per_caption):
            images.append(world.draw(rng, colour, kind)[0])
            truth.append(i)
    x = torch.from_numpy(world.to_model(np.stack(images)))
    text = model.encode_text(clip.tokenize(world.CAPTIONS), normalize=True)
    img = torch.cat(
        [model.encode_image(clip_images(clip, b), normalize=True) for b in x.split(256)]
    )
    pred = (img @ text.T).argmax(1).tolist()
    parts = [c.split()[1:] for c in world.CAPTIONS]
    n = len(truth)
    model.train(was_training)
    return {
        "colour_shape": sum(p == t for p, t in zip(pred, truth, strict=True)) / n,
        "colour": sum(parts[p][0] == parts[t][0] for p, t in zip(pred, truth, strict=True)) / n,
        "shape": sum(parts[p][1] == parts[t][1] for p, t in zip(pred, truth, strict=True)) / n,
        "images": n,
    }


def _previous_run(init: Path | None) -> dict:
    """The counts of the run a new one continues, from the JSON record beside its weights."""
    previous = {"steps": 0, "minutes": 0.0, "runs": 0, "loss_history": []}
    record = init.with_suffix(".json") if init else None
    if record and record.is_file():
        old = json.loads(record.read_text())
        previous |= {k: old[k] for k in ("steps", "minutes", "loss_history") if k in old}
        previous["runs"] = old.get("runs", 1)
    return previous


def train_clip(args: argparse.Namespace) -> int:
    from engine.models import load_clip, load_state_dict_checked

    torch.set_num_threads(args.threads or 2)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    clip = load_clip("demo", torch.device("cpu"))
    previous = _previous_run(args.init)
    if args.init:  # continue a run: its weights, and its counts for the record
        load_state_dict_checked(clip.model, args.init, "CLIP 'engine-demo'")
    model = clip.model.requires_grad_(True).train()
    # No weight decay on gains, biases, embeddings and the temperature (as CLIP's recipe).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr or 1e-3,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    budget = args.minutes * 60
    start = time.monotonic()
    step, losses = 0, []
    bar = _bar(budget, "clip")
    while (elapsed := time.monotonic() - start) < budget:
        for g in opt.param_groups:
            g["lr"] = _lr(args.lr or 1e-3, elapsed / budget)
        x, captions = world.batch(rng, args.batch or 128)
        x = torch.from_numpy(x)
        # A little pixel noise on a quarter of the batch: guidance shows CLIP slightly noisy
        # predictions, and a CLIP that only ever saw clean images has wilder gradients there.
        noisy = torch.rand(len(x), 1, 1, 1) < 0.25
        x = x + noisy * torch.rand(len(x), 1, 1, 1) * 0.2 * torch.randn_like(x)
        img = model.encode_image(clip_images(clip, x), normalize=True)
        txt = model.encode_text(clip.tokenize(captions), normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        # A batch of 128 from 18 captions repeats captions: every pair with the same caption is
        # a positive, so the targets are soft (uniform over the matches), not the diagonal.
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP's clamp: a temperature above 100 destabilises training
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        losses.append(loss.item())
        bar.set_postfix(step=step, loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
        bar.update(round(time.monotonic() - start) - bar.n)
        if step % 100 == 0:
            tqdm.write(f"clip step {step} loss {np.mean(losses[-100:]):.4f}", file=sys.stderr)
    bar.close()
    minutes = (time.monotonic() - start) / 60
    acc = zero_shot(clip)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _save(model.state_dict(), out / "demo_clip.pt")
    info = {
        "model": "engine-demo CLIP (engine/clip_configs/engine-demo.json)",
        "steps": previous["steps"] + step,
        "batch": args.batch or 128,
        "minutes": round(previous["minutes"] + minutes, 2),
        "runs": previous["runs"] + 1,
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "zero_shot_accuracy": acc,
        "seed": args.seed,
        "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads",
    }
    _write_json(out / "demo_clip.json", info)
    print(
        f"CLIP: {step} steps in {minutes:.1f} min; zero-shot accuracy on {acc['images']} held-out "
        f"images: colour+shape {acc['colour_shape']:.1%}, colour {acc['colour']:.1%}, "
        f"shape {acc['shape']:.1%}; saved {out / 'demo_clip.pt'}"
    )
    return 0


# --- UNet --------------------------------------------------------------------------------------


def train_unet(args: argparse.Namespace) -> int:
    from guided_diffusion.resample import UniformSampler
    from guided_diffusion.script_util import create_gaussian_diffusion

    from engine.models import CONFIGS, build_unet, load_state_dict_checked

    # One thread: the machine's other core belongs to other work.
    torch.set_num_threads(args.threads or 1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    config = CONFIGS["demo"]
    unet = build_unet(config).train()
    previous = _previous_run(args.init)
    if args.init:  # continue from a run's EMA weights (the optimiser's state starts anew)
        load_state_dict_checked(unet, args.init, "model 'demo'")
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    diffusion = create_gaussian_diffusion(
        steps=1000,
        learn_sigma=config.arch["learn_sigma"],
        noise_schedule=config.noise_schedule,
        rescale_timesteps=True,
    )
    sampler = UniformSampler(diffusion)
    lr = args.lr or 5e-4
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.minutes * 60
    start = time.monotonic()
    last_save = start
    step, losses, history = 0, [], []

    def save(final: bool) -> None:
        _save(ema.state_dict(), out / "demo_unet.pt")
        info = {
            "model": "demo UNet (engine.models.CONFIGS['demo']), EMA weights",
            "steps": previous["steps"] + step,
            "batch": args.batch or 32,
            "minutes": round(previous["minutes"] + (time.monotonic() - start) / 60, 2),
            "runs": previous["runs"] + 1,
            "final_loss": round(float(np.mean(losses[-100:])), 4) if losses else None,
            "loss_history": previous["loss_history"] + history,  # mean loss of each 100 steps
            "finished": final,
            "seed": args.seed,
            "machine": f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads",
        }
        _write_json(out / "demo_unet.json", info)

    bar = _bar(budget, "unet")
    while time.monotonic() - start < budget:
        # Warm-up only: a constant rate after it, since the run may be cut at any checkpoint.
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        x, _ = world.batch(rng, args.batch or 32, p_second=args.p_second)
        x = torch.from_numpy(x)
        t, weights = sampler.sample(len(x), x.device)
        loss = (diffusion.training_losses(unet, x, t)["loss"] * weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        ema_update([(ema, unet)], step, args.ema)
        losses.append(loss.item())
        if step % 100 == 0:
            history.append(round(float(np.mean(losses[-100:])), 4))
            tqdm.write(f"unet step {step} loss {history[-1]:.4f}", file=sys.stderr)
        bar.set_postfix(step=step, loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
        bar.update(round(time.monotonic() - start) - bar.n)
        if time.monotonic() - last_save >= args.save_every * 60:
            save(final=False)
            last_save = time.monotonic()
            tqdm.write(f"unet step {step}: saved {out / 'demo_unet.pt'}", file=sys.stderr)
    bar.close()
    save(final=True)
    minutes = (time.monotonic() - start) / 60
    print(
        f"UNet: {step} steps in {minutes:.1f} min; final loss {np.mean(losses[-100:]):.4f}; "
        f"saved {out / 'demo_unet.pt'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="demo-train",
        description="Train the demo world's CLIP or UNet on CPU (`latent`: demo-latent, whose "
        "options `demo-train latent --help` lists).",
    )
    p.add_argument("what", choices=["clip", "unet", "latent"])
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget (default: 8 for clip, 60 for unet)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the weights")
    p.add_argument("--batch", type=int, default=None, help="default: 128 for clip, 32 for unet")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 clip, 5e-4 unet")
    p.add_argument("--threads", type=int, default=None, help="default: 2 for clip, 1 for unet")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue from this state dict (the last demo_clip.pt or demo_unet.pt)",
    )
    p.add_argument("--ema", type=float, default=0.999, help="unet: EMA rate of the weights")
    p.add_argument("--save-every", type=float, default=5.0, help="unet: minutes between saves")
    p.add_argument(
        "--p-second",
        type=float,
        default=0.3,
        help="unet: fraction of training images with a second shape",
    )
    args = p.parse_args(argv)
    if args.minutes is None:
        args.minutes = 8.0 if args.what == "clip" else 60.0
    return train_clip(args) if args.what == "clip" else train_unet(args)


if __name__ == "__main__":
    sys.exit(main())
