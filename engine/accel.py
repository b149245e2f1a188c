"""What makes a guided step cheaper without changing the method: fused attention, recomputed
activations, lower precision where the hardware computes it natively. Each is measured by
`python -m engine bench`; each keeps the step's parity tests green.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from guided_diffusion.unet import AttentionBlock, QKVAttentionLegacy, ResBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine import devices

RECOMPUTE = ("auto", "on", "off")
# Activations one variant keeps for the guided backward through the ADM-256 UNet in fp32
# (measured by `python -m engine bench`: 9 GB, and 1.5 GB more peak since the engine keeps its
# freed memory, devices.keep_freed_host_memory); other models scale it by pixels x channels.
ADM256_ACTIVATIONS_GB = 10.5


class FusedLegacyAttention(nn.Module):
    """QKVAttentionLegacy's math (heads split before q, k, v) through torch's fused
    scaled_dot_product_attention, which never materialises the T x T weights."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        # Fused kernels need each head's channels contiguous (stride 1 in the last dimension);
        # the conv's (channels, tokens) layout would send SDPA to its unfused math kernel. One
        # copy of qkv (3 x C x T) is far smaller than the T x T weights it saves.
        qkv = qkv.reshape(bs * self.n_heads, ch * 3, length).transpose(1, 2).contiguous()
        q, k, v = qkv.split(ch, dim=2)
        a = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(ch))
        return a.transpose(1, 2).reshape(bs, -1, length)


def fuse_attention(unet: nn.Module) -> None:
    for block in unet.modules():
        if isinstance(block, AttentionBlock) and isinstance(block.attention, QKVAttentionLegacy):
            block.attention = FusedLegacyAttention(block.attention.n_heads)


# A 3 x 3 convolution this wide over this few pixels is one matrix product on a CPU (see
# _gemm_conv); measured on ADM-256's shapes here (fp32, AVX2, batch 1), forward / backward:
# 1024 channels at 8 x 8 from 44 / 44 ms to 15 / 24, at 16 x 16 from 68 / 65 to 45 / 66,
# 2048 at 8 x 8 from 70 / 77 to 26 / 44. 512 channels at 16 x 16 gain nothing.
GEMM_MIN_INPUTS, GEMM_MAX_PIXELS = 1024 * 9, 16 * 16


def _gemm_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution as unfold + one matrix product where the output has few pixels: oneDNN's
    direct convolution re-reads its (up to 75 MB of) weights for every few pixels there, while
    a GEMM streams them once. Autograd differentiates it as it is (fold + matrix products)."""
    h, w = x.shape[-2:]
    if h * w > GEMM_MAX_PIXELS:
        return conv._conv_forward(x, conv.weight, conv.bias)
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding)  # (n, inputs x 9, h x w)
    out = conv.weight.flatten(1) @ cols + conv.bias[:, None]
    return out.unflatten(-1, (h, w))


def gemm_wide_convs(unet: nn.Module) -> int:
    """Route the UNet's wide same-size 3 x 3 convolutions through _gemm_conv when their input is
    small; returns how many may take it."""
    wide = [
        m
        for m in unet.modules()
        if isinstance(m, nn.Conv2d)
        and m.kernel_size == (3, 3)
        and m.stride == (1, 1)
        and m.padding == (1, 1)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.bias is not None
        and m.in_channels * 9 >= GEMM_MIN_INPUTS
    ]
    for conv in wide:
        conv.forward = functools.partial(_gemm_conv, conv)
    return len(wide)


def prepare(unet: nn.Module, device: torch.device) -> None:
    """The engine's UNet: fused attention, recompute available, convolutions in channels-last
    (oneDNN's preferred layout on a CPU, tensor cores' on CUDA; measured on ADM-256's ResBlocks
    in fp32 here: 5-10% less time forward + backward), wide convolutions over few pixels as
    matrix products where the device's convolutions are slow there."""
    fuse_attention(unet)
    allow_recompute(unet)
    unet.to(memory_format=torch.channels_last)
    if devices.gemm_for_wide_convs(device):
        gemm_wide_convs(unet)


def _sequence_first(
    forward: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch-first MultiheadAttention run on contiguous sequence-first inputs."""
    q = query.transpose(0, 1).contiguous()
    k = q if key is query else key.transpose(0, 1).contiguous()
    v = q if value is query else k if value is key else value.transpose(0, 1).contiguous()
    out, weights = forward(q, k, v, *args, **kwargs)
    return out.transpose(0, 1), weights


def fold_clip_attention(model: nn.Module) -> int:
    """CLIP's attention with its input projection as one matrix product. A batch-first
    nn.MultiheadAttention transposes its input to sequence-first as a view; a linear layer over
    that view, needing grad, cannot fold its batch into one GEMM, so under bf16 autocast torch
    ran it as a batched product over a copy of the weight per token (ViT-B/16 over 8 copies:
    197 x 768 x 2304 values copied a layer: 8.5 s of a 13.5 s forward + backward, profiled).
    Run on a contiguous sequence-first copy of the (much smaller) input instead; the same values in
    fp32 (measured here: forward + backward 4.3 -> 3.7 s in fp32, 10 -> 1.4 s in bf16).
    Returns how many attentions it changed."""
    changed = 0
    for mha in model.modules():
        if isinstance(mha, nn.MultiheadAttention) and mha.batch_first:
            mha.forward = functools.partial(_sequence_first, mha.forward)
            mha.batch_first = False
            changed += 1
    return changed


def _maybe_checkpointed(block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    if block.recompute and torch.is_grad_enabled():
        return checkpoint(block._forward, *args, use_reentrant=False)
    return block._forward(*args)


def allow_recompute(unet: nn.Module) -> None:
    """Let each ResBlock and AttentionBlock drop its activations in the forward and recompute
    them in the backward (switched per job by `recompute`). guided_diffusion's own
    `use_checkpoint` cannot serve: its backward asks for gradients of the frozen weights."""
    for block in unet.modules():
        if isinstance(block, ResBlock | AttentionBlock):
            block.recompute = False
            block.forward = functools.partial(_maybe_checkpointed, block)


@contextlib.contextmanager
def recompute(unet: nn.Module, enabled: bool) -> Iterator[None]:
    blocks = [b for b in unet.modules() if hasattr(b, "recompute")]
    for b in blocks:
        b.recompute = enabled
    try:
        yield
    finally:
        for b in blocks:
            b.recompute = False


def in_precision(unet: Callable, device: torch.device, precision: str) -> Callable:
    """The UNet under autocast, its output back in fp32 for the diffusion's arithmetic."""
    if precision == "fp32":
        return unet

    def run(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        with devices.autocast(device, precision):
            return unet(x, t, **kwargs).float()

    return run


def activations_gb(arch: dict, batch: int, precision: str) -> float:
    """An estimate of what the guided backward keeps alive, from the ADM-256 measurement."""
    scale = (arch["image_size"] / 256) ** 2 * arch["num_channels"] / 256
    return ADM256_ACTIVATIONS_GB * scale * batch * (1.0 if precision == "fp32" else 0.5)


def resolve_recompute(
    setting: str,
    arch: dict,
    batch: int,
    precision: str,
    device: torch.device,
    free_gb: float | None = None,
) -> bool:
    """auto: recompute only when the batch's activations would not fit in 80% of free memory
    (`free_gb`, else asked of the device now); recomputing costs about one more UNet forward
    per step."""
    if setting != "auto":
        return setting == "on"
    free = devices.available_memory_gb(device) if free_gb is None else free_gb
    return activations_gb(arch, batch, precision) > 0.8 * free
