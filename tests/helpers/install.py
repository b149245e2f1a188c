"""install.py's test fixtures: a fake checkout, a fake pyzmq wheel, user homes as each OS lays
them out, and install.py run as a subprocess into them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from installer.layout import HOME_ENV

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "install.py"
P = "blended_diffusion"

# where each layout puts (pykrita, GIMP plug-ins, kritarc), relative to the home
PLACES = {
    "linux": (".local/share/krita/pykrita", ".config/GIMP/3.0/plug-ins", ".config/kritarc"),
    "windows": (
        "AppData/Roaming/krita/pykrita",
        "AppData/Roaming/GIMP/3.0/plug-ins",
        "AppData/Local/kritarc",
    ),
    "macos": (
        "Library/Application Support/krita/pykrita",
        "Library/Application Support/GIMP/3.0/plug-ins",
        "Library/Preferences/kritarc",
    ),
}
# variables that would move the folders away from the fake home
SCRUB = ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "APPDATA", "LOCALAPPDATA", HOME_ENV)


def fake_checkout(root: Path, top: bool = True) -> Path:
    """The plug-ins' and the shared client's sources, as install.py finds them in a checkout;
    `top`: with engine/__init__.py."""
    files = {
        f"plugin_krita/{P}.desktop": f"[Desktop Entry]\nType=Service\nX-KDE-Library={P}\n",
        f"plugin_krita/{P}/__init__.py": "from .extension import *\n",
        f"plugin_krita/{P}/extension.py": "# krita\n",
        f"plugin_krita/{P}/old.py": "# removed later\n",
        f"plugin_gimp/{P}/{P}.py": "#!/usr/bin/env python3\n",
        f"plugin_gimp/{P}/ui/dialog.py": "# gimp\n",
        f"plugin_gimp/{P}/__pycache__/x.cpython-311.pyc": "not copied",
        "engine/shared/protocol.py": "# protocol\n",
        "engine/shared/client.py": "# client\n",
    }
    if top:
        files["engine/__init__.py"] = ""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    os.chmod(root / f"plugin_gimp/{P}/{P}.py", 0o644)  # the installer makes it executable
    return root


def fake_wheel(folder: Path, tag: str = "cp311-cp311-manylinux_2_28_x86_64") -> Path:
    wheel = folder / f"pyzmq-27.3.0-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("zmq/__init__.py", "FAKE = True\n")
        z.writestr("pyzmq.libs/libzmq.so.5", b"\0")
        z.writestr("pyzmq-27.3.0.dist-info/METADATA", "Name: pyzmq\n")
    return wheel


def user_home(home: Path, layout: str) -> Path:
    """A home where the user already has other plug-ins and Krita settings."""
    krita, gimp, kritarc = (home / p for p in PLACES[layout])
    (krita / "other").mkdir(parents=True)
    (krita / "other.desktop").write_text("[Desktop Entry]\n")
    (krita / "other" / "__init__.py").write_text("# the user's\n")
    (gimp / "other").mkdir(parents=True)
    (gimp / "other" / "other.py").write_text("# the user's\n")
    kritarc.parent.mkdir(parents=True, exist_ok=True)
    kritarc.write_text("[General]\nfoo=1\n\n[python]\nenable_other=true\n\n[Zoom]\nlevel=2\n")
    return home


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file's bytes and mode, and every folder, under `root`: equal before and after."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = ("dir",) if p.is_dir() else (p.read_bytes(), p.stat().st_mode & 0o777)
    return out


def install_env(env: dict | None = None) -> dict[str, str]:
    """This process's environment without what moves the folders, plus `env`."""
    return {**{k: v for k, v in os.environ.items() if k not in SCRUB}, **(env or {})}


def run_install(
    home: Path, layout: str, *args: str, source: Path, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """install.py --plugins-only (or --uninstall) into `home`; the host's Python is `system`
    unless `args` name one."""
    cmd = [sys.executable, str(INSTALL), "--source", str(source), "--home", str(home)]
    cmd += ["--platform-layout", layout] + ([] if "--uninstall" in args else ["--plugins-only"])
    if not any(a.endswith("-python") for a in args):
        cmd += ["--host-python", "system"]
    r = subprocess.run(
        cmd + list(args), env=install_env(env), capture_output=True, text=True, timeout=300
    )
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r
