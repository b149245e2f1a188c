"""pyzmq for each host's Python: the plug-ins talk to the engine over ZeroMQ and no Krita or GIMP
build ships it. Where the host's Python has it (Linux: the system python3), nothing is added;
otherwise the wheel that loads in that Python is unpacked into the plug-in's `_lib`."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from installer.console import InstallError, say
from installer.files import safe_rel, tree
from installer.layout import LIB, PLUGIN, Host

BUNDLED_PYTHON = {"krita": "3.10", "gimp": "3.12"}  # Windows and macOS builds
PYZMQ = "pyzmq>=26"


@dataclass(frozen=True)
class HostPython:
    version: str | None  # X.Y to bundle pyzmq for; None: the host's Python already imports zmq
    platforms: tuple[str, ...]  # pip platform tags, most preferred first
    why: str


def system_python3() -> str | None:
    """The python3 that Debian's (and most distributions') Krita and GIMP embed."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3")


def probe_python(exe: str) -> tuple[str | None, bool]:
    """(X.Y, whether it imports zmq) of an interpreter."""
    code = "import sys; print('%d.%d' % sys.version_info[:2]); import zmq"
    try:
        r = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    words = r.stdout.split()
    return (words[0] if words else None), r.returncode == 0


def default_platforms(system: str) -> tuple[str, ...]:
    if system == "windows":
        return ("win_arm64",) if platform.machine().lower() == "arm64" else ("win_amd64",)
    if system == "macos":
        return ("macosx_11_0_universal2",)  # pip also takes older macOS versions of it
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower() or "x86_64"
    )
    libc, version = platform.libc_ver() if sys.platform.startswith("linux") else ("", "")
    minor = int(version.split(".")[1]) if libc == "glibc" and "." in version else 28
    # pip expands no manylinux_2_X tag by itself: list what this glibc runs, newest first
    return (*(f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)), f"manylinux2014_{arch}")


def wheel_fits(filename: str, version: str) -> bool:
    """Does a wheel (by its file name) load in CPython `version`? cp3X exact, or abi3 >= cp3X."""
    parts = filename.removesuffix(".whl").split("-")
    if len(parts) < 5:
        return False
    pythons, abi = parts[-3].split("."), parts[-2]
    want = int(version.split(".")[1])
    for tag in pythons:
        m = re.fullmatch(r"cp3(\d+)", tag)
        if m and (int(m[1]) == want or ("abi3" in abi and int(m[1]) <= want)):
            return True
    return False


def unpack_wheel(wheel: Path, dest: Path) -> None:
    """A wheel is a zip: unpacking it is installing it into a folder put on sys.path."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not safe_rel(info.filename.rstrip("/")):
                raise InstallError(f"{wheel.name}: refusing the unsafe path {info.filename!r}")
            target = dest.joinpath(*PurePosixPath(info.filename).parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            executable = (info.external_attr >> 16) & 0o111
            os.chmod(target, 0o755 if executable else 0o644)


def download_pyzmq(python: HostPython, dest: Path, pip_python: str) -> Path:
    platforms = [arg for tag in python.platforms for arg in ("--platform", tag)]
    cmd = [
        pip_python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--implementation", "cp", "--python-version", python.version, *platforms,
        "--disable-pip-version-check", "-d", str(dest), PYZMQ,
    ]  # fmt: skip
    older = " or older" if len(python.platforms) > 1 else ""
    say(f"    downloading pyzmq for Python {python.version} ({python.platforms[0]}{older})")
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("pyzmq-*.whl"))
    if r.returncode or not wheels:
        detail = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise InstallError(
            f"no pyzmq wheel for Python {python.version} on {', '.join(python.platforms[:3])}: "
            f"pip said: {detail}. Pass --host-python/--platform for the host's real Python, "
            "or --pyzmq-wheel FILE"
        )
    return wheels[-1]


class PyzmqSupply:
    """Which Python each host runs, as the options tell or the system shows, and the pyzmq files
    it needs; the system python3 is probed, and each wheel fetched and unpacked, once."""

    def __init__(self, args: argparse.Namespace, tmp: Path, venv_python: Path) -> None:
        self.args, self.tmp, self.venv_python = args, tmp, venv_python
        self._wheels: dict[tuple, tuple[Path, str]] = {}  # (version, platforms) -> unpacked
        self._system: tuple[str | None, bool] | None = None

    def host_python(self, host: Host) -> HostPython:
        a = self.args
        spec = getattr(a, f"{host.key}_python") or a.host_python
        platforms = tuple(a.platform or default_platforms(a.platform_layout))
        if spec == "system":
            return HostPython(None, (), "the host's Python has pyzmq (as told): nothing to add")
        if spec:
            return HostPython(spec, platforms, f"Python {spec} (as told)")
        if a.platform_layout != "linux":
            version = BUNDLED_PYTHON[host.key]
            return HostPython(version, platforms, f"{host.label}'s bundled Python {version}")
        if self._system is None:
            exe = system_python3()
            self._system = probe_python(exe) if exe else (None, False)
        version, has_zmq = self._system
        if version is None:
            raise InstallError(
                "no system python3 found (Krita and GIMP use it on Linux): pass --host-python X.Y"
            )
        if has_zmq:
            return HostPython(
                None, (), f"the system python3 ({version}) imports zmq: nothing to add"
            )
        return HostPython(version, platforms, f"the system python3 ({version}) lacks pyzmq")

    def pip_python(self) -> str:
        if importlib.util.find_spec("pip"):
            return sys.executable
        if self.venv_python.exists():
            return str(self.venv_python)
        raise InstallError("pip is needed to download pyzmq: install pip, or pass --pyzmq-wheel")

    def files(self, python: HostPython) -> tuple[dict[str, Path], str | None]:
        """The unpacked pyzmq wheel's files as `_lib/...` entries, and the wheel's name."""
        if python.version is None:
            return {}, None
        key = (python.version, python.platforms)
        if key not in self._wheels:
            wheel = self.args.pyzmq_wheel
            if wheel is None:
                folder = self.tmp / f"download-{len(self._wheels)}"
                wheel = download_pyzmq(python, folder, self.pip_python())
            if not wheel_fits(wheel.name, python.version):
                raise InstallError(f"{wheel.name} does not load in Python {python.version}")
            unpacked = self.tmp / f"unpacked-{len(self._wheels)}"
            unpack_wheel(wheel, unpacked)
            self._wheels[key] = (unpacked, wheel.name)
        unpacked, name = self._wheels[key]
        return tree(unpacked, f"{PLUGIN}/{LIB}"), name
