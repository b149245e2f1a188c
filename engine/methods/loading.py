"""Which method serves a model, and loading it: the pixel method's names, else the latent one's."""

from __future__ import annotations

from typing import Any

from engine.methods import Method


def method_of(model: str) -> str:
    """Which method serves `model`: the pixel method's names (engine/models.py's CONFIGS), else
    the latent one's (tiny-latent, an SD name, a diffusers folder or a checkpoint file)."""
    from engine.models import CONFIGS
    from engine.shared.request import LATENT, PIXEL

    return PIXEL if model in CONFIGS else LATENT


def load_entry(entry: Any, **options: Any) -> Method:
    """The method of `entry` (engine/catalogue.py's Entry, which imports this module), loaded
    with the `load` options its method takes (--lora for the latent models, --unet-checkpoint
    for the pixel ones)."""
    from engine.shared.request import PIXEL

    drop = "lora" if entry.method == PIXEL else "unet_checkpoint"
    return load(entry.source, **{k: v for k, v in options.items() if k != drop})


def load(
    model: str,
    *,
    clip: str | None = None,
    unet_checkpoint: str | None = None,
    lora: str | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> Method:
    """The method serving `model`, its models loaded (picklable arguments: a cluster's replicas
    load with them). `unet_checkpoint` is the pixel method's, `lora` the latent one's."""
    from engine.shared.request import PIXEL

    if method_of(model) == PIXEL:
        if lora:
            raise ValueError(f"--lora is for the latent method's models, not {model}")
        from engine.methods import pixel

        return pixel.load(model, clip=clip, unet_checkpoint=unet_checkpoint, device=device)
    if unet_checkpoint:
        raise ValueError(f"--unet-checkpoint is for the pixel method's models, not {model}")
    from engine.methods import latent

    return latent.load(model, clip=clip, device=device, precision=precision, lora=lora)
