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


def test_the_prepared_unet_computes_the_same_step_in_channels_last(unet):
    x, t = _inputs()
    prepared = copy.deepcopy(unet)
    accel.prepare(prepared, torch.device("cpu"))
    convs = [m for m in prepared.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    ref, out = _input_grad(unet, x, t), _input_grad(prepared, x, t)
    assert (out - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("side, unfolds", [(8, True), (16, True), (32, False)])
def test_a_wide_convolution_over_few_pixels_is_one_matrix_product_with_the_same_result(
    monkeypatch, side, unfolds
):
    """ADM-256's 1024-channel convolutions at 8 and 16 px go through unfold + GEMM (forward and
    the input's gradient equal to the convolution's); at 32 px they stay convolutions."""
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(1024, 32, 3, padding=1).requires_grad_(False)
    conv = copy.deepcopy(ref)
    assert accel.gemm_wide_convs(conv) == 1
    assert accel.gemm_wide_convs(torch.nn.Conv2d(512, 32, 3, padding=1)) == 0  # not wide enough
    calls = []
    unfold = accel.F.unfold
    monkeypatch.setattr(accel.F, "unfold", lambda *a, **k: calls.append(1) or unfold(*a, **k))
    x = torch.randn(2, 1024, side, side).to(memory_format=torch.channels_last)
    want, got = (_input_grad(m, x, None) for m in (ref, conv))
    assert bool(calls) == unfolds
    assert (conv(x) - ref(x)).abs().max().item() < 1e-4
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


def test_the_attention_runs_a_fused_kernel_at_the_engines_shapes():
    """With only the fused backends allowed, PyTorch raises "No available kernel" when the
    inputs would send it to the math kernel (as q, k, v strided over tokens did)."""
    from guided_diffusion.unet import AttentionBlock
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused_only = [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
    ]
    torch.manual_seed(0)
    # ADM-256's attention at 16x16: 1024 channels in heads of 64 (32x32 has 8 heads of 64 too)
    block = AttentionBlock(1024, num_head_channels=64).eval().requires_grad_(False)
    torch.nn.init.normal_(block.proj_out.weight, std=0.02)  # zero-initialised by guided_diffusion
    x = torch.randn(1, 1024, 16, 16, requires_grad=True)
    ref = block(x)
    accel.fuse_attention(block)
    with sdpa_kernel(fused_only):
        out = block(x)
        (grad,) = torch.autograd.grad(out.sum(), x)  # the guided step's backward too
    assert (out - ref).abs().max().item() < 1e-5
    assert grad.abs().max() > 0


def _input_grad(unet, x, t):
    x = x.clone().requires_grad_()
    out = unet(x) if t is None else unet(x, t)
    (out**2).sum().backward()
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
