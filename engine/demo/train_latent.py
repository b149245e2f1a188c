"""Train demo-latent, the latent demo world's Stable-Diffusion-shaped model, on CPU in a budget.

    python -m engine demo-train latent --minutes 60

Stage 1 (`--vae-minutes`): a small diffusers AutoencoderKL (4 latent channels, 8x down: 64 px to
8x8 latents), L1 + MSE reconstruction of the posterior's mean (the latent the engine encodes)
with a small KL term, on the world's pictures and, half of each batch, on codec pictures of any
colours and grain (latent_world.codec_picture: a codec is trained on everything, as SD's VAE);
its scaling factor is then set so the training latents have unit standard deviation (SD's
0.18215 is the same measure of its own VAE).
Stage 2 (the rest): a small transformers CLIPTextModel (CLIP's 49,408-token BPE vocabulary, the
tokenizer latent_models.tokenizer builds) and a small UNet2DConditionModel with cross-attention,
trained together to predict the noise on SD's own schedule, with 10% of the captions emptied so
classifier-free guidance and negative prompts work. EMA weights of both are saved.

The result is a diffusers folder (model_index.json, unet/, vae/, text_encoder/, scheduler/; fp16
safetensors) that latent_models loads as `--model demo-latent`, rewritten whole every few
minutes (a new folder renamed into place) so a run can be evaluated while it trains.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.demo import latent_world
from engine.demo.train import _bar, _lr, _write_json, ema_update
from engine.demo.world import to_model
from engine.latent_models import DEMO_LATENT_DIR, SD_SCHEDULE, tokenizer

P_EMPTY_CAPTION = 0.1  # caption dropout: the unconditional half of classifier-free guidance


def build_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=16, sample_size=latent_world.SIZE,
        mid_block_add_attention=False,
    )  # fmt: skip


def build_text_encoder() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407, projection_dim=64,
        )
    )  # fmt: skip


def build_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_world.SIZE // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128), norm_num_groups=32, cross_attention_dim=64,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
    )  # fmt: skip


def pictures(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    """`n` training pictures in [-1, 1] and their captions, caption dropout applied."""
    drawn = [latent_world.draw(rng) for _ in range(n)]
    x = torch.from_numpy(to_model(np.stack([d[0] for d in drawn])))
    captions = [
        "" if rng.random() < P_EMPTY_CAPTION else latent_world.caption(obj, bg, rng)
        for _, obj, bg in drawn
    ]
    return x, captions


def train_vae(args: argparse.Namespace, rng: np.random.Generator, log: dict) -> Any:
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    budget, start, step, losses = args.vae_minutes * 60, time.monotonic(), 0, []
    bar = _bar(budget, "vae")
    while (elapsed := time.monotonic() - start) < budget:
        for g in opt.param_groups:
            g["lr"] = _lr(args.vae_lr, elapsed / budget)
        x, _ = pictures(rng, args.vae_batch // 2)
        codec = [latent_world.codec_picture(rng) for _ in range(args.vae_batch - len(x))]
        x = torch.cat([x, torch.from_numpy(to_model(np.stack(codec)))])
        posterior = vae.encode(x).latent_dist
        # the mean, not a sample: the engine encodes the mean, and a sample's noise (a unit
        # variance until the small KL term shrinks it) blurs what the decoder learns
        y = vae.decode(posterior.mean).sample
        loss = (y - x).abs().mean() + F.mse_loss(y, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step, losses = step + 1, losses + [loss.item()]
        bar.set_postfix(step=step, loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
        bar.update(round(time.monotonic() - start) - bar.n)
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # the scaling that gives the latents unit standard deviation
        x, _ = pictures(np.random.default_rng(1), 256)
        latents = vae.encode(x).latent_dist.mean
        vae.register_to_config(scaling_factor=round(float(1 / latents.std()), 5))
        error = float((vae.decode(latents).sample - x).abs().mean() * 127.5)
    log["vae"] = {
        "steps": step, "batch": args.vae_batch, "lr": args.vae_lr,
        "minutes": round((time.monotonic() - start) / 60, 2),
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "mean_abs_error_0_255": round(error, 2), "scaling_factor": vae.config.scaling_factor,
    }  # fmt: skip
    tqdm.write(f"vae: {log['vae']}", file=sys.stderr)
    return vae


def save(out: Path, vae: Any, unet: Any, text: Any, log: dict) -> None:
    """The diffusers folder, fp16, written beside `out` and renamed into place."""
    from diffusers import DDPMScheduler

    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    for part, model in (("vae", vae), ("unet", unet), ("text_encoder", text)):
        copy.deepcopy(model).to(torch.float16).save_pretrained(tmp / part, safe_serialization=True)
    DDPMScheduler(**SD_SCHEDULE).save_pretrained(tmp / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_note": "demo-latent: demo weights"}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_json(tmp / "train.json", log)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def train(args: argparse.Namespace) -> int:
    from diffusers import DDPMScheduler

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.monotonic()
    log: dict[str, Any] = {
        "model": "demo-latent (demo weights, trained on the latent demo world)",
        "seed": args.seed, "machine": f"{os.cpu_count()} CPU cores, {args.threads} torch threads",
    }  # fmt: skip
    vae = train_vae(args, rng, log)
    unet, text = build_unet().train(), build_text_encoder().train()
    ema_unet = copy.deepcopy(unet).requires_grad_(False).eval()
    ema_text = copy.deepcopy(text).requires_grad_(False).eval()
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    noise = DDPMScheduler(**SD_SCHEDULE)
    tok = tokenizer()
    scale = vae.config.scaling_factor
    budget = args.minutes * 60 - (time.monotonic() - start)
    begin, last_save = time.monotonic(), time.monotonic()
    step, losses, history = 0, [], []

    def checkpoint(final: bool) -> None:
        log["unet"] = {
            "steps": step, "batch": args.batch, "lr": args.lr, "ema": args.ema,
            "minutes": round((time.monotonic() - begin) / 60, 2),
            "final_loss": round(float(np.mean(losses[-100:])), 4) if losses else None,
            "loss_history": history, "p_empty_caption": P_EMPTY_CAPTION,
        }  # fmt: skip
        log["minutes"] = round((time.monotonic() - start) / 60, 2)
        log["finished"] = final
        save(args.out, vae, ema_unet, ema_text, log)

    bar = _bar(budget, "unet+text")
    while time.monotonic() - begin < budget:
        for g in opt.param_groups:  # warm-up, then constant: a run may be cut at any save
            g["lr"] = args.lr * min(1.0, (step + 1) / 200)
        x, captions = pictures(rng, args.batch)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean * scale
        eps = torch.randn_like(z)
        t = torch.randint(0, noise.config.num_train_timesteps, (len(z),))
        ids = tok(captions, padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
        out = unet(noise.add_noise(z, eps, t), t, encoder_hidden_states=text(ids)[0]).sample
        loss = F.mse_loss(out, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema_update([(ema_unet, unet), (ema_text, text)], step, args.ema)
        losses.append(loss.item())
        if step % 100 == 0:
            history.append(round(float(np.mean(losses[-100:])), 4))
            tqdm.write(f"step {step} loss {history[-1]:.4f}", file=sys.stderr)
        bar.set_postfix(step=step, loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
        bar.update(round(time.monotonic() - begin) - bar.n)
        if time.monotonic() - last_save >= args.save_every * 60:
            checkpoint(final=False)
            last_save = time.monotonic()
            tqdm.write(f"step {step}: saved {args.out}", file=sys.stderr)
    bar.close()
    checkpoint(final=True)
    print(f"demo-latent: {step} steps, {log['minutes']} min in all; saved {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine demo-train latent", description=__doc__)
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget, both stages")
    p.add_argument("--vae-minutes", type=float, default=8.0, help="of it, the VAE's")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1.5e-3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between saves")
    p.add_argument("--out", type=Path, default=DEMO_LATENT_DIR)
    return train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
