"""A Debian trixie root with real Krita 5.2 and GIMP 3, for the plug-ins' real-host tests.

Built once with mmdebstrap from the mirror this machine's apt already uses, cached as a tarball
outside the checkout, unpacked per test session. The root has no pyzmq: the plug-ins must bring
their own, as they do on users' machines. `python -m tests.hosts.trixie` builds the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

# xdotool: the real-GIMP test presses the plug-in's Cancel as a user would
PACKAGES = ["krita", "python3-pyqt5", "xvfb", "xauth", "gimp", "python3-gi", "gir1.2-gimp-3.0",
            "xdotool"]  # fmt: skip
CACHE = Path(os.environ.get("HOST_ROOT_CACHE", Path.home() / ".cache" / "blended-diffusion-ci"))
# named by its package list: a root cached before a package was added is built again, not reused
_PACKAGES_ID = hashlib.sha256(",".join(PACKAGES).encode()).hexdigest()[:8]
TARBALL = CACHE / f"trixie-hosts-{_PACKAGES_ID}.tar.zst"


def _mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", sources.read_text(), re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def _apt_install(*packages: str) -> None:
    missing = [p for p in packages if shutil.which(p) is None]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def build() -> Path:
    """The cached root tarball, built if absent (about a minute and a half, 460 MB)."""
    if TARBALL.is_file():
        return TARBALL
    _apt_install("mmdebstrap", "zstd")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = TARBALL.with_suffix(".partial.tar.zst")
    excludes = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("locale", "doc", "man")]
    subprocess.run(
        ["mmdebstrap", "--mode=root", "--variant=apt", f"--include={','.join(PACKAGES)}",
         *excludes, "trixie", str(partial), _mirror()],
        check=True,
    )  # fmt: skip
    partial.rename(TARBALL)
    return TARBALL


@contextlib.contextmanager
def root(binds: dict[str, Path]) -> Iterator[Path]:
    """An unpacked root with /proc, /sys, /dev and `binds` (path inside -> folder outside)."""
    tarball = build()
    with tempfile.TemporaryDirectory(prefix="trixie-") as tmp:
        top = Path(tmp)
        subprocess.run(["tar", "--zstd", "-xf", str(tarball), "-C", str(top)], check=True)
        mounts: list[Path] = []

        def mount(args: list[str], target: Path) -> None:
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *args, str(target)], check=True)
            mounts.append(target)

        try:
            mount(["-t", "proc", "proc"], top / "proc")
            mount(["-t", "sysfs", "sys"], top / "sys")
            mount(["--bind", "/dev"], top / "dev")
            mount(["--bind", "/dev/pts"], top / "dev/pts")
            mount(["-t", "tmpfs", "shm"], top / "dev/shm")
            for inside, outside in binds.items():
                mount(["--bind", str(outside)], top / inside.lstrip("/"))
            yield top
        finally:
            for target in reversed(mounts):
                subprocess.run(["umount", "-l", str(target)], check=False)


def run(
    top: Path, argv: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """Run `argv` inside the root with exactly `env` (plus PATH)."""
    full = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **env}
    cmd = ["chroot", str(top), "env", "-i", *(f"{k}={v}" for k, v in full.items()), *argv]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


if __name__ == "__main__":
    print(build())
