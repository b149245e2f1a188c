"""The step's accelerations change its cost, not its result (beyond float tolerance)."""

import copy

import pytest
import torch

from engine import accel
from engine.models import CONFIGS, build_unet


@pytest.fixture(scope="module")
def unet():
    # legacy attention, as guided_diffusion builds it; random weights that compute something
    return build_unet(CONFIGS["tiny"], seed=1).requires_grad_(False).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([700.0, 40.0])


def test_fused_attention_matches_the_legacy_attention(unet):
    x, t = _inputs()
    fused = copy.deepcopy(unet)
    accel.fuse_attention(fused)
    assert any(isinstance(m, accel.FusedLegacyAttention) for m in fused.modules())
    with torch.no_grad():
        ref, out = unet(x, t), fused(x, t)
    assert ref.abs().max() > 0.1  # the weights compute something
    assert (out - ref).abs().max().item() < 1e-5


def _input_grad(unet, x, t):
    x = x.clone().requires_grad_()
    (unet(x, t) ** 2).sum().backward()
    return x.grad


def test_recomputed_activations_give_the_same_gradient(unet):
    x, t = _inputs()
    patched = copy.deepcopy(unet)
    accel.allow_recompute(patched)
    ref = _input_grad(unet, x, t)
    with accel.recompute(patched, True):
        out = _input_grad(patched, x, t)
    assert ref.abs().max() > 0
    assert (out - ref).abs().max().item() < 1e-5
    # switched off again after the job
    assert not any(getattr(m, "recompute", False) for m in patched.modules())


def test_the_unet_runs_in_16_bits_and_hands_back_fp32(unet):
    x, t = _inputs()
    cpu = torch.device("cpu")
    seen = []

    def spy(x, t):
        seen.append(torch.is_autocast_enabled("cpu"))
        return unet(x, t)

    with torch.no_grad():
        out = accel.in_precision(spy, cpu, "bf16")(x, t)
        ref = unet(x, t)
    assert seen == [True] and out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()  # bf16, not garbage
    assert accel.in_precision(unet, cpu, "fp32") is unet
