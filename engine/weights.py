"""Where model weights live, and which files the named models need.

One per-user folder (platformdirs) holds every weight file; `BLENDED_DIFFUSION_MODELS` overrides
it (tests, portable installs). Downloading belongs to the installer; this module only knows the
files and finds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_data_dir

APP_NAME = "blended-diffusion"
DOWNLOAD_COMMAND = "python install.py --weights-only"


@dataclass(frozen=True)
class WeightFile:
    name: str
    url: str
    sha256: str | None  # None: not published; recorded on first verified download
    size_hint: str


ADM256 = WeightFile(
    "256x256_diffusion_uncond.pt",
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
    "983e3de6f95c88c81b2ca7ebb2c217933be1973b1ff058776b970f901584613a",
    "2.2 GB",
)
ADM512 = WeightFile(
    "512x512_diffusion.pt",
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/512x512_diffusion.pt",
    None,
    "2.2 GB",
)


def models_dir() -> Path:
    override = os.environ.get("BLENDED_DIFFUSION_MODELS")
    return Path(override) if override else Path(user_data_dir(APP_NAME)) / "models"


class MissingWeights(FileNotFoundError):
    pass


def locate(weight: WeightFile) -> Path:
    """The path of a known weight file, or an error that says how to get it."""
    path = models_dir() / weight.name
    if not path.is_file():
        raise MissingWeights(
            f"weight file {weight.name} ({weight.size_hint}) is missing: looked for {path}. "
            f"Download it with `{DOWNLOAD_COMMAND}`, or pass --unet-checkpoint PATH."
        )
    return path
