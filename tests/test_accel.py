"""The step's accelerations change its cost, not its result (beyond float tolerance)."""

import copy

import pytest
import torch

from engine import accel, devices
from engine.guidance import Guide
from engine.models import CONFIGS, build_unet, load_clip


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


def _clip_gradient(guide: Guide, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = (torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    x.requires_grad_()
    with devices.autocast(torch.device("cpu"), precision):
        loss = guide.loss(x, "a red circle", [torch.Generator().manual_seed(5)])
    return loss.detach(), torch.autograd.grad(loss, x)[0]


def test_clips_folded_attention_gives_the_same_loss_and_gradient():
    cpu = torch.device("cpu")
    plain, folded = (load_clip("tiny", cpu, fold) for fold in (False, True))
    n = sum(isinstance(m, torch.nn.MultiheadAttention) for m in folded.model.modules())
    assert n > 0 and not any(
        m.batch_first for m in folded.model.modules() if isinstance(m, torch.nn.MultiheadAttention)
    )
    (ref_loss, ref_grad), (loss, grad) = (_clip_gradient(Guide(c), "fp32") for c in (plain, folded))
    assert ref_grad.abs().max() > 0
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert (grad - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()


def test_clips_folded_attention_projects_in_one_matrix_product_under_bf16():
    """Without the fold a linear layer over the transposed view, needing grad, ran as a batched
    product over a copy of its weight per token (bmm over an expanded weight)."""
    from torch.profiler import ProfilerActivity, profile

    cpu = torch.device("cpu")
    calls = {}
    for fold in (False, True):
        guide = Guide(load_clip("tiny", cpu, fold))
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            _clip_gradient(guide, "bf16")
        width = guide.clip.model.visual.transformer.width  # kornia's 3 x 3 bmm are not CLIP's
        calls[fold] = sum(
            e.count
            for e in prof.key_averages(group_by_input_shape=True)
            if e.key == "aten::bmm" and any(width in shape for shape in e.input_shapes)
        )
    assert calls[False] > 0  # what the fold is for, still there in open_clip
    assert calls[True] == 0


def test_the_augmentations_run_in_fp32_under_a_16_bit_autocast():
    """kornia's warps come from 3 x 3 matrix products; in bf16 a demo edit's copies reached
    infinities. Under autocast the copies are exactly the fp32 ones."""
    augment = Guide(load_clip("tiny", torch.device("cpu"))).augment
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    streams = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    ref = augment(x, streams())
    with devices.autocast(torch.device("cpu"), "bf16"):
        out = augment(x, streams())
    assert out.dtype == torch.float32 and torch.equal(out, ref)
