"""Blended Diffusion for Krita: edit a selection from a text prompt with a running engine.

The plug-in's `_lib` folder (filled by install.py: the shared engine client, and pyzmq when
Krita's Python lacks it) goes first on sys.path, so `import engine.shared.client` finds that copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

_LIB = Path(__file__).resolve().parent / "_lib"
if _LIB.is_dir() and str(_LIB) not in sys.path:
    sys.path.insert(0, str(_LIB))

from .docker import DOCKER_ID, TITLE, BlendedDiffusionDocker  # noqa: E402
from .document import register  # noqa: E402
from .extension import BlendedDiffusionExtension  # noqa: E402

register(BlendedDiffusionExtension, DOCKER_ID, TITLE, BlendedDiffusionDocker)
