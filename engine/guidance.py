"""CLIP guidance: the spherical distance to the prompt, the extending augmentations, the range loss.

The loss the sampler differentiates is, per image of the batch,
    clip_weight * mean over augmented copies of D_clip(copy, prompt) + range_weight * range(x0_hat)
summed over the batch, as in the official code (so each image's gradient is its own).
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from engine.models import Clip


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between normalised embeddings: 2 * arcsin(|a - b| / 2)^2."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return (a - b).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def range_loss(x: torch.Tensor) -> torch.Tensor:
    """Per image: how far the prediction strays outside [-1, 1]."""
    return (x - x.clamp(-1, 1)).pow(2).mean(dim=(1, 2, 3))


def to_clip(x: torch.Tensor, size: int) -> torch.Tensor:
    """A canvas of any shape at CLIP's square input, undistorted: padded to a square with 0 (what
    the masked input holds outside the selection), then resized by area averaging."""
    h, w = x.shape[-2:]
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top))
    return F.adaptive_avg_pool2d(x, size)


class Augment(nn.Module):
    """Bring to CLIP's input (to_clip), then `copies` copies: the first as is, the others warped.

    Gradients that survive random affine and perspective warps are not adversarial pixel noise.
    """

    def __init__(self, size: int, copies: int = 8, p: float = 0.7):
        super().__init__()
        self.size, self.copies = size, copies
        self.warp = nn.Sequential(
            K.RandomAffine(degrees=15, translate=0.1, p=p, padding_mode="border"),
            K.RandomPerspective(0.7, p=p),
        )

    def forward(
        self, x: torch.Tensor, streams: Sequence[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Copy-major: rows [i * n, (i + 1) * n) are copy i of the n images. With `streams`
        (CPU generators, one per image), image j's warps come from streams[j] alone, so they
        do not depend on the rest of the batch. Always in fp32, also under a job's 16-bit
        autocast: kornia builds each warp from 3 x 3 matrix products, which 16 bits make
        inexact enough to warp a copy to infinities (a demo edit in bf16 diverged so)."""
        with torch.autocast(x.device.type, enabled=False):
            return self._copies(to_clip(x.float(), self.size), streams)

    def _copies(self, x: torch.Tensor, streams: Sequence[torch.Generator] | None) -> torch.Tensor:
        if self.copies == 1:
            return x
        if streams is None:
            return torch.cat([x, self.warp(x.repeat(self.copies - 1, 1, 1, 1))])
        warped = []
        for image, stream in zip(x, streams, strict=True):
            with torch.random.fork_rng(devices=[]):  # kornia draws from the global CPU generator
                torch.manual_seed(int(torch.randint(2**62, (), generator=stream)))
                warped.append(self.warp(image[None].repeat(self.copies - 1, 1, 1, 1)))
        return torch.cat([x, torch.stack(warped, 1).flatten(0, 1)])


class Guide:
    """A CLIP model with its preprocessing, a cache of prompt embeddings and the guidance loss."""

    def __init__(self, clip: Clip, copies: int = 8):
        self.clip = clip
        self.augment = Augment(clip.image_size, copies)
        dev = next(clip.model.parameters()).device
        self.mean = torch.tensor(clip.mean, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(clip.std, device=dev).view(1, 3, 1, 1)
        self._text: dict[str, torch.Tensor] = {}
        self._seen: list[torch.Tensor] = []  # each loss's per-image distances since take_seen

    def text(self, prompt: str) -> torch.Tensor:
        if prompt not in self._text:
            tokens = self.clip.tokenize([prompt]).to(self.mean.device)
            with torch.no_grad():
                self._text[prompt] = self.clip.model.encode_text(tokens).float()
        return self._text[prompt]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings of images in [-1, 1] already at CLIP's input size."""
        return self.clip.model.encode_image((images.add(1).div(2) - self.mean) / self.std).float()

    def loss(
        self, masked: torch.Tensor, prompt: str, streams: Sequence[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Sum over the batch of each image's mean distance over its augmented copies
        (`streams`: each image's own augmentation generator, see Augment)."""
        n = masked.shape[0]
        dists = spherical_distance(self.embed(self.augment(masked, streams)), self.text(prompt))
        per_image = dists.view(-1, n).mean(dim=0)
        self._seen.append(per_image.detach())
        return per_image.sum()

    def take_seen(self) -> torch.Tensor | None:
        """The per-image distances the losses computed since the last call, in call order (a
        step's variants: what a preview ranks by, for free), or None when none ran."""
        seen, self._seen = self._seen, []
        return torch.cat(seen) if seen else None

    @torch.no_grad()
    def rank_distance(self, masked: torch.Tensor, prompt: str) -> torch.Tensor:
        """Per image: the distance used to rank results (to_clip, unaugmented, normalised)."""
        return spherical_distance(
            self.embed(to_clip(masked, self.clip.image_size)), self.text(prompt)
        )
