"""Named model configurations and checkpoint loading: guided-diffusion's ADM UNet and open_clip.

A configuration names the architecture (guided_diffusion `create_model` keywords), the diffusion
schedule it was trained with, its weight file and the CLIP that guides it by default. `tiny` is the
same UNetModel class with a few channels and random weights: a plumbing test, never an edit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from guided_diffusion.respace import SpacedDiffusion
from guided_diffusion.script_util import create_gaussian_diffusion, create_model
from guided_diffusion.unet import UNetModel

from engine import accel, devices, weights

open_clip.add_model_config(Path(__file__).parent / "clip_configs")

DEMO_DIR = Path(__file__).parent / "demo" / "weights"


@dataclass(frozen=True)
class UNetConfig:
    name: str
    label: str  # shown wherever results are shown
    arch: dict  # guided_diffusion.script_util.create_model keywords
    noise_schedule: str = "linear"
    weight: weights.WeightFile | Path | None = None  # None: random weights
    default_clip: str = "ViT-B-16-quickgelu:openai"
    # the CLIP guidance weight when a job names none, per guidance mode: the official 1000 for
    # the paper's full gradient; the x0-space gradient is larger and needs less (README)
    guidance_weights: tuple[tuple[str, float], ...] = (("full", 1000.0), ("fast", 300.0))

    def guidance_weight(self, mode: str) -> float:
        return dict(self.guidance_weights)[mode]

    @property
    def image_size(self) -> int:
        return self.arch["image_size"]

    @property
    def class_cond(self) -> bool:
        return self.arch.get("class_cond", False)


_ADM = dict(
    num_channels=256,
    num_res_blocks=2,
    attention_resolutions="32,16,8",
    num_head_channels=64,
    resblock_updown=True,
    use_scale_shift_norm=True,
    learn_sigma=True,
)

CONFIGS: dict[str, UNetConfig] = {
    c.name: c
    for c in (
        UNetConfig(
            "adm256",
            "ADM 256x256 unconditional (guided-diffusion)",
            dict(_ADM, image_size=256),
            weight=weights.ADM256,
        ),
        UNetConfig(
            "adm512",
            "ADM 512x512 class-conditional (guided-diffusion)",
            dict(_ADM, image_size=512, class_cond=True),
            weight=weights.ADM512,
        ),
        UNetConfig(
            "demo",
            "demo shapes-world UNet (trained here on coloured shapes; not the paper's model)",
            dict(
                image_size=32,
                num_channels=32,
                channel_mult="1,2,4",
                num_res_blocks=2,
                attention_resolutions="8",
                num_head_channels=32,
                learn_sigma=True,
            ),
            noise_schedule="cosine",
            weight=DEMO_DIR / "demo_unet.pt",
            default_clip=f"demo:{DEMO_DIR / 'demo_clip.pt'}",
            # measured with `demo-ablation`: full 300 obeyed in 81% of variants (1000: 62%, and
            # rougher); fast 100 in 56% (300 diverged into colour noise: 6%)
            guidance_weights=(("full", 300.0), ("fast", 100.0)),
        ),
        UNetConfig(
            "tiny",
            "tiny UNet with random weights (plumbing test: its output is noise, not an edit)",
            dict(
                image_size=32,
                num_channels=32,
                channel_mult="1,2",
                num_res_blocks=1,
                attention_resolutions="16",
                num_head_channels=32,
                learn_sigma=True,
            ),
            default_clip="tiny",
        ),
    )
}

# Our own open_clip configurations (engine/clip_configs/*.json) by their short names.
_CLIP_ALIASES = {"tiny": "engine-tiny", "demo": "engine-demo"}


class CheckpointError(ValueError):
    pass


def load_state_dict_checked(module: torch.nn.Module, path: Path, what: str) -> None:
    """Load a plain state dict into `module`, or say which file is wrong and how."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise CheckpointError(f"{path} is not a checkpoint of {what}: " + "; ".join(parts))
    module.load_state_dict(state)


def build_unet(config: UNetConfig, *, use_fp16: bool = False, seed: int | None = None) -> UNetModel:
    """The architecture; with `seed`, reproducible random weights that compute something
    (guided_diffusion zero-initialises its output layers, so a fresh UNet outputs exactly 0)."""
    if seed is None:
        return create_model(**config.arch, use_fp16=use_fp16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = create_model(**config.arch, use_fp16=use_fp16)
        with torch.no_grad():
            for p in unet.parameters():
                if not p.any():
                    p.normal_(0.0, 0.02)
    return unet


def make_diffusion(
    config: UNetConfig, steps: int, device: torch.device | None = None
) -> SpacedDiffusion:
    """The model's 1000-step training schedule respaced to `steps` sampling steps. guided_diffusion
    keeps it in float64, which `device` may lack (MPS): then it is float32, and said so."""
    diffusion = create_gaussian_diffusion(
        steps=1000,
        learn_sigma=config.arch.get("learn_sigma", False),
        noise_schedule=config.noise_schedule,
        rescale_timesteps=True,
        timestep_respacing=str(steps),
    )
    if device is not None and not devices.has_float64(device):
        devices.fallback(device, "float64", "the diffusion schedule runs in float32")
        for name, value in vars(diffusion).items():
            if isinstance(value, np.ndarray) and value.dtype == np.float64:
                setattr(diffusion, name, value.astype(np.float32))
    return diffusion


def load_unet(
    config: UNetConfig, checkpoint: Path | None, device: torch.device
) -> tuple[UNetModel, str]:
    """The UNet in eval mode, frozen, on `device`, its weights in fp32 on every device: each
    job's precision is autocast around it (`accel.in_precision`), so `--precision fp32` on CUDA
    runs fp32 (the official code's fp16 conversion would fix fp16 for every job)."""
    if checkpoint is None and config.weight is not None:  # find the file before building
        w = config.weight
        checkpoint = w if isinstance(w, Path) else weights.locate(w)
    if checkpoint is not None and not checkpoint.is_file():
        raise weights.MissingWeights(f"weight file {checkpoint} is missing")
    unet = build_unet(config, seed=0 if checkpoint is None else None)
    if checkpoint is None:
        label = config.label
    else:
        load_state_dict_checked(unet, Path(checkpoint), f"model '{config.name}'")
        label = config.label if checkpoint == config.weight else f"{config.label}, {checkpoint}"
    unet.requires_grad_(False).eval().to(device)
    accel.prepare(unet, device)
    return unet, label


@dataclass
class Clip:
    """An open_clip model with what guidance needs to feed it."""

    model: open_clip.CLIP
    tokenize: Callable[[list[str]], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    label: str


def _bare_clip(arch: str) -> open_clip.CLIP:
    """The architecture alone; open_clip's warning that no weights were loaded is ours to give
    (the label says "random weights", or the weights come from a file next)."""
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(arch, pretrained=None, device="cpu")
    finally:
        logging.disable(logging.NOTSET)


def load_clip(spec: str, device: torch.device, fold_attention: bool = True) -> Clip:
    """`NAME[:PRETRAINED_OR_FILE]`: an open_clip model name (or tiny/demo) and a tag or a file.

    The activation follows the name (`ViT-B-16-quickgelu` for OpenAI's weights), never the file.
    `fold_attention`: the engine's faster attention (accel.fold_clip_attention); off for the
    official formulation the bench measures against.
    """
    name, _, source = spec.partition(":")
    arch = _CLIP_ALIASES.get(name, name)
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model '{name}' (open_clip knows e.g. ViT-B-16-quickgelu)")
    is_file = source and (Path(source).suffix in {".pt", ".bin", ".safetensors", ".pth"})
    if is_file:
        path = Path(source).expanduser()
        if not path.is_file():
            raise weights.MissingWeights(
                f"CLIP weight file {path} is missing. Download the default CLIP with "
                f"`{weights.DOWNLOAD_COMMAND}`, or name an open_clip pretrained tag."
            )
        model = _bare_clip(arch)
        load_state_dict_checked(model, path, f"CLIP '{arch}'")
        label = f"{name} ({path.name})"
    elif source:
        try:  # an open_clip tag: huggingface_hub's cache, downloaded on first use
            model = open_clip.create_model(arch, pretrained=source, device="cpu")
        except RuntimeError as e:
            raise weights.MissingWeights(
                f"CLIP weights '{arch}:{source}' could not be loaded ({e}). "
                f"Download them with `{weights.DOWNLOAD_COMMAND}`."
            ) from e
        label = f"{name} ({source})"
    else:
        with torch.random.fork_rng(devices=[]):  # the same random CLIP in every process
            torch.manual_seed(0)
            model = _bare_clip(arch)
        label = f"{name} CLIP with random weights"
    model.requires_grad_(False).eval().to(device)
    if fold_attention:
        accel.fold_clip_attention(model)
    pp = model.visual.preprocess_cfg
    size = model.visual.image_size
    return Clip(
        model=model,
        tokenize=open_clip.get_tokenizer(arch),
        image_size=size[0] if isinstance(size, tuple | list) else size,
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
        label=label,
    )


@dataclass
class Models:
    """Everything an edit needs, loaded once and kept warm."""

    config: UNetConfig
    unet: UNetModel
    clip: Clip
    device: torch.device
    unet_label: str
    _diffusions: dict[int, SpacedDiffusion] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.unet_label}; CLIP: {self.clip.label}"

    @property
    def downsampling(self) -> int:
        """The UNet's total downsampling: its canvas sides must be multiples of it."""
        return 2 ** (len(self.unet.channel_mult) - 1)

    def diffusion(self, steps: int) -> SpacedDiffusion:
        if steps not in self._diffusions:
            self._diffusions[steps] = make_diffusion(self.config, steps, self.device)
        return self._diffusions[steps]


def load_models(
    model: str = "tiny",
    *,
    clip: str | None = None,
    unet_checkpoint: str | Path | None = None,
    device: str = "auto",
) -> Models:
    if model not in CONFIGS:
        raise ValueError(f"unknown model '{model}': choose one of {', '.join(CONFIGS)}")
    config = CONFIGS[model]
    dev = devices.resolve(device)
    ckpt = Path(unet_checkpoint).expanduser() if unet_checkpoint else None
    unet, unet_label = load_unet(config, ckpt, dev)
    return Models(config, unet, load_clip(clip or config.default_clip, dev), dev, unet_label)
