"""Checkpoint loading: real guided-diffusion and open_clip formats, and clear errors."""

from pathlib import Path

import open_clip
import pytest
import torch
from guided_diffusion.script_util import create_model

from engine import weights
from engine.models import CONFIGS, CheckpointError, load_clip, load_models, load_unet

CPU = torch.device("cpu")


def test_an_adm256_checkpoint_from_guided_diffusion_loads(tmp_path):
    # the official 256x256 unconditional configuration, random weights, saved as the real file is
    official = create_model(
        image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8",
        num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True,
        class_cond=False, use_fp16=False,
    )  # fmt: skip
    path = tmp_path / "256x256_diffusion_uncond.pt"
    torch.save(official.state_dict(), path)
    probe = "output_blocks.3.0.in_layers.2.weight"
    expected = official.state_dict()[probe].clone()
    del official
    unet, label = load_unet(CONFIGS["adm256"], path, CPU)
    assert torch.equal(unet.state_dict()[probe], expected)
    assert sum(p.numel() for p in unet.parameters()) > 550e6
    assert str(path) in label


def _tiny_state(tmp_path: Path) -> tuple[dict, Path]:
    state = load_unet(CONFIGS["tiny"], None, CPU)[0].state_dict()
    return dict(state), tmp_path / "tiny.pt"


def test_a_checkpoint_with_a_wrong_key_names_the_file_and_the_key(tmp_path):
    state, path = _tiny_state(tmp_path)
    state["input_blocks.0.0.wieght"] = state.pop("input_blocks.0.0.weight")
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_unet(CONFIGS["tiny"], path, CPU)
    msg = str(err.value)
    assert str(path) in msg and "model 'tiny'" in msg
    assert "missing keys (1): input_blocks.0.0.weight" in msg
    assert "unexpected keys (1): input_blocks.0.0.wieght" in msg


def test_a_checkpoint_of_another_architecture_reports_shape_mismatches(tmp_path):
    state, path = _tiny_state(tmp_path)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"not a checkpoint of model 'demo'.*(shape|keys)"):
        load_unet(CONFIGS["demo"], path, CPU)


def test_a_damaged_file_is_refused_clearly(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        load_unet(CONFIGS["tiny"], path, CPU)


def test_a_missing_weight_file_says_where_it_looked_and_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(tmp_path))
    with pytest.raises(weights.MissingWeights) as err:
        load_models("adm256", device="cpu")
    msg = str(err.value)
    assert str(tmp_path / "256x256_diffusion_uncond.pt") in msg
    assert weights.DOWNLOAD_COMMAND in msg


def test_clip_weights_from_a_file_load_and_a_wrong_file_is_refused(tmp_path):
    made = open_clip.create_model("engine-tiny")
    path = tmp_path / "tiny_clip.pt"
    torch.save(made.state_dict(), path)
    clip = load_clip(f"tiny:{path}", CPU)
    assert torch.equal(clip.model.text_projection, made.text_projection)
    assert clip.image_size == 32 and len(clip.mean) == 3
    with pytest.raises(CheckpointError, match="CLIP 'engine-demo'"):
        load_clip(f"demo:{path}", CPU)
    with pytest.raises(weights.MissingWeights, match="missing"):
        load_clip(f"tiny:{tmp_path / 'absent.pt'}", CPU)
    with pytest.raises(ValueError, match="unknown CLIP model"):
        load_clip("ViT-Nope", CPU)


def test_the_clip_activation_follows_the_name_not_the_file():
    def act(spec: str) -> str:
        return type(load_clip(spec, CPU).model.visual.transformer.resblocks[0].mlp.gelu).__name__

    assert act("ViT-B-16-quickgelu") == "QuickGELU"
    assert act("ViT-B-16") == "GELU"


def test_the_unet_keeps_fp32_weights_on_cuda_so_each_job_chooses_its_precision(monkeypatch):
    """`--precision fp32` on CUDA must run fp32: no fp16 conversion at load (16 bits come from
    autocast per job). No GPU here: the move to CUDA is skipped, the device decision is not."""
    from guided_diffusion.unet import UNetModel

    monkeypatch.setattr(UNetModel, "to", lambda self, *a, **k: self)
    unet, _ = load_unet(CONFIGS["tiny"], None, torch.device("cuda"))
    assert unet.dtype == torch.float32
    assert {p.dtype for p in unet.parameters()} == {torch.float32}
