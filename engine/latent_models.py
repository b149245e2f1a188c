"""The latent method's models (Stable Diffusion's parts): VAE, text encoder and tokenizer, UNet and
the checkpoint's noise schedule, loaded from a name, a diffusers folder or a single checkpoint file.

`tiny-latent` is a random SD-shaped pipeline built here in code (every result names it random):
the method's plumbing runs on it in seconds. The tokenizer is CLIP's BPE, which open_clip ships
(`bpe_simple_vocab_16e6.txt.gz`), so no tokenizer files are downloaded: SD 1.x pads with the end
token, SD 2.x (OpenCLIP's) with "!" (id 0), as their tokenizer configurations say.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from platformdirs import user_cache_dir

from engine import devices

TINY = "tiny-latent"
# the schedule every SD 1.x/2.x checkpoint was trained with (its scheduler_config.json)
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


@dataclass
class Pipeline:
    """A latent diffusion model's parts, loaded on `device` in `dtype`."""

    name: str  # what the artist named: sd15, a path, tiny-latent
    vae: Any  # diffusers AutoencoderKL
    unet: Any  # diffusers UNet2DConditionModel
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    schedule: dict[str, Any]  # the noise schedule: a diffusers scheduler's config
    native: int  # the side it was trained at, in pixels
    device: torch.device
    dtype: torch.dtype
    weights: str = "real"  # real | demo | random: results say which
    lcm: bool = False  # an LCM checkpoint or an LCM-LoRA fused in: the lcm scheduler applies
    files: list[str] = field(default_factory=list)  # where the weights came from

    @property
    def label(self) -> str:
        kind = {"random": " (random weights)", "demo": " (demo model)"}.get(self.weights, "")
        lcm = " + LCM" if self.lcm else ""
        return f"{self.name}{lcm}{kind}"

    @property
    def inpaint(self) -> bool:
        """A 9-channel inpainting UNet: it reads the mask and the masked source too."""
        return self.unet.config.in_channels == 9

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def factor(self) -> int:
        """Pixels per side a canvas must be a multiple of: the VAE's and the UNet's downsampling."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def scaling(self) -> float:
        return float(self.vae.config.scaling_factor)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable character map, which CLIP's BPE uses."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=1)
def _vocabulary() -> Path:
    """CLIP's vocab.json and merges.txt, written once from open_clip's BPE file (the same
    49,408 tokens as openai/clip-vit-large-patch14's tokenizer files)."""
    import open_clip

    out = Path(user_cache_dir("blended-diffusion")) / "clip-tokenizer"
    if (out / "vocab.json").exists() and (out / "merges.txt").exists():
        return out
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    letters = list(_bytes_to_unicode().values())
    tokens = letters + [v + "</w>" for v in letters] + ["".join(p) for p in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".vocab.{id(out)}"
    tmp.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    tmp.replace(out / "vocab.json")
    tmp.write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n", "utf-8")
    tmp.replace(out / "merges.txt")
    return out


def tokenizer(pad: str = "<|endoftext|>", max_length: int = 77) -> Any:
    """CLIP's tokenizer; `pad`: SD 1.x's "<|endoftext|>", SD 2.x's "!"."""
    from transformers import CLIPTokenizer

    files = _vocabulary()
    return CLIPTokenizer(
        str(files / "vocab.json"), str(files / "merges.txt"), pad_token=pad,
        model_max_length=max_length,
    )  # fmt: skip


def tiny(device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> Pipeline:
    """A random SD-shaped pipeline at 64 px (8x8 latents): every part of SD's, small."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407, projection_dim=32,
        )  # fmt: skip
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.18215,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    parts = [m.to(device, dtype).eval().requires_grad_(False) for m in (vae, unet, text)]
    return Pipeline(
        TINY, *parts[:2], parts[2], tokenizer(), dict(SD_SCHEDULE), 64, device, dtype, "random"
    )


def dtype_for(precision: str, device: torch.device) -> torch.dtype:
    """The weights' number format: fp16 on GPUs, bf16 on CPUs that compute it natively."""
    resolved = devices.resolve_precision(precision, device)
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[resolved]


def load_pipeline(
    model: str, device: str | torch.device = "auto", precision: str = "auto"
) -> Pipeline:
    """The pipeline `model` names: tiny-latent, an SD name (sd15, sd21-base, ...), a diffusers
    folder or a single .safetensors/.ckpt file."""
    dev = devices.resolve(device) if isinstance(device, str) else device
    dtype = dtype_for(precision, dev)
    if model == TINY:
        return tiny(dev, dtype)
    raise ValueError(f"unknown latent model '{model}'")
