"""Build the zip that Krita's Tools > Scripts > Import Python Plugin from File accepts.

    python plugin_krita/build_zip.py [--out FILE] [--pyzmq-wheel WHEEL]

Krita's importer takes each `.desktop` file's X-KDE-Library, extracts the folder of that name
(it must hold `__init__.py`) into pykrita/ and `<name>.action` into actions/. So the zip holds,
at its top level, `blended_diffusion.desktop` and the package, with the shared engine client in
the package's `_lib/engine/`. Krita ships no pyzmq: pass the wheel matching Krita's Python
(e.g. cp310 win_amd64 for Krita 5.2 on Windows) to put it into `_lib/` as well; without one the
plug-in works only where Krita's Python already has pyzmq. Standard library only.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAME = "blended_diffusion"
SKIP = {"__pycache__", "_lib"}


def entries(source: Path = ROOT) -> dict[str, bytes]:
    """Zip member name -> content, without any pyzmq."""
    plugin = source / "plugin_krita"
    files = {f"{NAME}.desktop": (plugin / f"{NAME}.desktop").read_bytes()}
    for path in sorted((plugin / NAME).rglob("*")):
        rel = path.relative_to(plugin)
        if path.is_file() and not SKIP.intersection(rel.parts) and path.suffix != ".pyc":
            files[rel.as_posix()] = path.read_bytes()
    sys.path.insert(0, str(ROOT))  # installer/: what of engine/ the plug-ins take
    try:
        from installer.plugins import client_files
    finally:
        sys.path.remove(str(ROOT))
    files.update({name: path.read_bytes() for name, path in client_files(source).items()})
    return files


def wheel_entries(wheel: Path) -> dict[str, bytes]:
    """A wheel's importable files (a wheel is a zip laid out like site-packages)."""
    with zipfile.ZipFile(wheel) as z:
        return {
            f"{NAME}/_lib/{info.filename}": z.read(info)
            for info in z.infolist()
            if not info.is_dir() and ".dist-info/" not in info.filename
        }


def build(out: Path, wheel: Path | None = None, source: Path = ROOT) -> Path:
    files = entries(source)
    if wheel is not None:
        files.update(wheel_entries(wheel))
    # Krita's importer finds the package by its directory entry ("blended_diffusion/"), so
    # every folder gets one, as zip tools write them.
    folders = {name[: i + 1] for name in files for i, c in enumerate(name) if c == "/"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(folders | set(files)):
            z.writestr(name, files.get(name, b""))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / f"{NAME}_krita.zip")
    parser.add_argument("--pyzmq-wheel", type=Path, help="a pyzmq wheel for Krita's Python")
    args = parser.parse_args(argv)
    out = build(args.out, args.pyzmq_wheel)
    print(f"{out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
