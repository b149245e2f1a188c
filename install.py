#!/usr/bin/env python3
"""Install the Blended Diffusion engine and its Krita and GIMP 3 plug-ins (`--help` for how).
The installer is the package installer/ beside this file: standard library only."""

import sys
from pathlib import Path

# the checkout first on the path, also under -I/-P (which leave this file's folder off it)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from installer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
