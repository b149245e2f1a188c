"""Where Krita and GIMP 3 look for a user's plug-ins on Linux, Windows and macOS, and kritarc."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PLUGIN = "blended_diffusion"
LIB = "_lib"  # inside each installed plug-in: the shared client (+ pyzmq); first on sys.path
MANIFEST = "INSTALLED.json"
HOME_ENV = "BLENDED_DIFFUSION_HOME"
LAYOUTS = ("linux", "windows", "macos")


def current_layout() -> str:
    return {"win32": "windows", "darwin": "macos"}.get(sys.platform, "linux")


@dataclass(frozen=True)
class Layout:
    krita: Path  # pykrita
    gimp: Path  # GIMP 3 plug-ins
    kritarc: Path


def _xdg(env: Mapping[str, str], var: str, default: Path) -> Path:
    value = env.get(var, "")
    return Path(value) if os.path.isabs(value) else default  # the spec ignores relative values


def layout_for(system: str, home: Path, env: Mapping[str, str] = os.environ) -> Layout:
    """The per-user folders of Krita and GIMP 3 on `system` for a user whose home is `home`."""
    if system == "windows":
        roaming = Path(env.get("APPDATA") or home / "AppData" / "Roaming")
        local = Path(env.get("LOCALAPPDATA") or home / "AppData" / "Local")
        return Layout(
            roaming / "krita" / "pykrita", roaming / "GIMP" / "3.0" / "plug-ins", local / "kritarc"
        )
    if system == "macos":
        support = home / "Library" / "Application Support"
        return Layout(
            support / "krita" / "pykrita",
            support / "GIMP" / "3.0" / "plug-ins",
            home / "Library" / "Preferences" / "kritarc",
        )
    data = _xdg(env, "XDG_DATA_HOME", home / ".local" / "share")
    config = _xdg(env, "XDG_CONFIG_HOME", home / ".config")
    return Layout(
        data / "krita" / "pykrita", config / "GIMP" / "3.0" / "plug-ins", config / "kritarc"
    )


@dataclass(frozen=True)
class Host:
    key: str  # krita | gimp
    label: str
    root: Path  # the host's plug-in folder

    @property
    def folder(self) -> Path:
        return self.root / PLUGIN

    @property
    def manifest(self) -> Path:
        return self.folder / LIB / MANIFEST


def hosts_for(
    layout: Layout, krita_dir: Path | None = None, gimp_dir: Path | None = None
) -> list[Host]:
    return [
        Host("krita", "Krita", krita_dir or layout.krita),
        Host("gimp", "GIMP 3", gimp_dir or layout.gimp),
    ]
