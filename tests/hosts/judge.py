"""The demo world's own judge for the real-host demo cases: the demo CLIP reads what the artist
sees in the selection's box among the world's captions (as engine/demo/ablation.py and
tests/test_demo_edit.py do), rather than a pixel-colour threshold that presumes the shape fills
the selection."""

from __future__ import annotations

from functools import cache

import numpy as np

from engine.demo.ablation import Reader
from engine.models import load_models


@cache
def _reader() -> Reader:
    return Reader(load_models("demo", device="cpu"))


def demo_reads(rgb: np.ndarray, box: tuple[int, int, int, int]) -> str:
    """The caption the demo CLIP reads in `box` (x, y, width, height) of an HxWx3 picture."""
    x, y, w, h = box
    return _reader().read(np.ascontiguousarray(rgb[y : y + h, x : x + w, :3]))
