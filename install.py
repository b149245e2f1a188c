#!/usr/bin/env python3
"""Install the Blended Diffusion engine and its Krita and GIMP 3 plug-ins.

    python install.py                   engine venv (.venv), both plug-ins, the weights
    python install.py --plugins-only    only the plug-ins (the engine runs on another machine)
    python install.py --weights-only    only the weights (resumes a broken download)
    python install.py --uninstall       removes the plug-ins it installed, nothing else
    python install.py --dry-run         prints the plan, changes nothing
    python install.py --cluster         with Ray Serve, for `serve --cluster` (several GPUs/boxes)

The plug-ins talk to the engine over ZeroMQ, so each host's Python needs pyzmq, which no Krita or
GIMP build ships. Where the host's Python already has it (Linux: the system python3, checked with
`python3 -c "import zmq"`), nothing is added; otherwise the matching pyzmq wheel is downloaded with
pip and unpacked into the plug-in's `_lib` folder. Assumed hosts' Pythons: Linux the system
python3; Windows and macOS Krita 5.2's bundled 3.10 and GIMP 3's bundled 3.12. Override them with
--host-python / --krita-python / --gimp-python X.Y (or `system`: the host's Python has pyzmq) and
--platform TAG (pip platform tags, e.g. win_amd64, manylinux_2_28_x86_64,
macosx_11_0_universal2), e.g. for a Krita AppImage (bundled 3.10) or a Flatpak GIMP.

Standard library only: this runs before the engine's venv exists (Python 3.10+).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent
PLUGIN = "blended_diffusion"
LIB = "_lib"  # inside each installed plug-in: the shared client (+ pyzmq); first on sys.path
MANIFEST = "INSTALLED.json"
MANIFEST_FORMAT = 1
# engine/ files the plug-ins import: the package top and engine/shared/ (wire, client, core)
CLIENT_FILES = ("__init__.py",)
CORE = "shared"
SKIP = {"__pycache__", ".DS_Store", LIB}  # never copied from a source tree
KRITA_KEY = f"enable_{PLUGIN}"
KRITA_SECTION = "[python]"
BUNDLED_PYTHON = {"krita": "3.10", "gimp": "3.12"}  # Windows and macOS builds
PYZMQ = "pyzmq>=26"
ENGINE_PYTHON = (3, 11)  # pyproject's requires-python
HOME_ENV = "BLENDED_DIFFUSION_HOME"
LAYOUTS = ("linux", "windows", "macos")


class InstallError(Exception):
    """A step that cannot go on: the message says why and what to do."""


def say(text: str) -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"==> {title}")


def warn(text: str) -> None:
    print(f"    warning: {text}", file=sys.stderr, flush=True)


# -- where the hosts look for plug-ins ------------------------------------------------------


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


def read_manifest(path: Path) -> dict | None:
    """An install record written by this installer, or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def _safe_rel(rel: str) -> bool:
    """A manifest path stays inside the host's folder (a damaged manifest must not reach out)."""
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and ":" not in rel


# -- what goes into a plug-in folder ------------------------------------------------------


def tree(folder: Path, prefix: str) -> dict[str, Path]:
    """Every file under `folder` as {prefix/relative path: source}, minus caches."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not SKIP.intersection(rel.parts) and path.suffix != ".pyc":
            files[f"{prefix}/{rel.as_posix()}"] = path
    return files


def plugin_files(key: str, source: Path) -> dict[str, Path]:
    """The plug-in's own files, by path relative to the host's plug-in folder."""
    if key == "krita":
        base = source / "plugin_krita"
        desktop, package = base / f"{PLUGIN}.desktop", base / PLUGIN
        if not desktop.is_file() or not package.is_dir():
            raise InstallError(
                f"the Krita plug-in is missing from {base}: expected {desktop.name} and {PLUGIN}/"
            )
        return {desktop.name: desktop, **tree(package, PLUGIN)}
    base = source / "plugin_gimp" / PLUGIN
    if not (base / f"{PLUGIN}.py").is_file():
        raise InstallError(f"the GIMP plug-in is missing: expected {base / (PLUGIN + '.py')}")
    return tree(base, PLUGIN)


def client_files(source: Path) -> dict[str, Path]:
    """The shared pure-Python client and core, as `_lib/engine/...` of each plug-in."""
    files = {}
    core = sorted(p.relative_to(source / "engine").as_posix()
                  for p in (source / "engine" / CORE).glob("*.py"))  # fmt: skip
    for name in (*CLIENT_FILES, *core):
        path = source / "engine" / name
        if path.is_file():
            files[f"{PLUGIN}/{LIB}/engine/{name}"] = path
        else:
            warn(f"{path} does not exist (yet): the plug-ins get no copy of it")
    return files


# -- pyzmq for the hosts' Python ------------------------------------------------------------


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
            if not _safe_rel(info.filename.rstrip("/")):
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


# -- kritarc: enable the plug-in without disturbing the rest ---------------------------------


def section_span(lines: list[str]) -> tuple[int, int] | None:
    start = next((i for i, line in enumerate(lines) if line.strip() == KRITA_SECTION), None)
    if start is None:
        return None
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines)
    )
    return start, end


def key_line(lines: list[str], start: int, end: int) -> int | None:
    return next(
        (i for i in range(start + 1, end) if lines[i].split("=", 1)[0].strip() == KRITA_KEY), None
    )


def _ending(line: str) -> str:
    return line[len(line.rstrip("\r\n")) :]


def enable_text(text: str) -> tuple[str, dict]:
    """kritarc text with the plug-in enabled, and a record of how to undo exactly that."""
    nl = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines(keepends=True)
    record = {"previous": None, "added_section": False, "blank_before": False}
    record["added_newline"] = bool(text) and not text.endswith(("\n", "\r"))
    if record["added_newline"]:
        lines[-1] += nl
    entry = f"{KRITA_KEY}=true"
    sec = section_span(lines)
    if sec is None:
        record["added_section"] = True
        record["blank_before"] = any(line.strip() for line in lines)
        lines += [nl] * record["blank_before"] + [KRITA_SECTION + nl, entry + nl]
    elif (i := key_line(lines, *sec)) is not None:
        record["previous"] = lines[i].rstrip("\r\n")
        lines[i] = entry + _ending(lines[i])
    else:
        lines.insert(sec[0] + 1, entry + nl)
    return "".join(lines), record


def disable_text(text: str, record: dict) -> str:
    """Undo `enable_text`: the plug-in's line (or its earlier value) and what was added for it."""
    lines = text.splitlines(keepends=True)
    sec = section_span(lines)
    if sec is not None:
        start, end = sec
        i = key_line(lines, start, end)
        if i is not None and record.get("previous") is not None:
            lines[i] = record["previous"] + _ending(lines[i])
        elif i is not None:
            del lines[i]
            end -= 1
        if record.get("added_section") and not any(x.strip() for x in lines[start + 1 : end]):
            del lines[start:end]
            if record.get("blank_before") and start > 0 and not lines[start - 1].strip():
                del lines[start - 1]
    result = "".join(lines)
    if record.get("added_newline"):
        result = result.rstrip("\r\n") if result.endswith(("\n", "\r")) else result
    return result


def _read_text(path: Path) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write(text)


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist, deepest first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def remove_empty(dirs: list[str] | list[Path]) -> None:
    for d in sorted((Path(x) for x in dirs), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass  # not empty (the user's files) or already gone: leave it


def enable_in_kritarc(path: Path, old: dict | None) -> dict:
    created = not path.exists()
    parents = [str(p) for p in missing_dirs(path.parent)]
    text, record = enable_text("" if created else _read_text(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, text)
    if old and old.get("path") == str(path):
        return old  # an update: keep what the first install found there
    return {"path": str(path), "created_file": created, "parents": parents, **record}


def disable_in_kritarc(record: dict) -> None:
    path = Path(record["path"])
    if not path.is_file():
        return
    text = disable_text(_read_text(path), record)
    if record.get("created_file") and not text.strip():
        path.unlink()
        remove_empty(record.get("parents", []))
    else:
        _write_text(path, text)


# -- installing into and removing from a host's folder ---------------------------------------


def _ancestors(rel: str) -> list[str]:
    return [p.as_posix() for p in PurePosixPath(rel).parents if p.as_posix() != "."]


def _drop_bytecode(folder: Path) -> None:
    """The host compiles our files into __pycache__: that is ours to remove too."""
    cache = folder / "__pycache__"
    if cache.is_dir() and all(f.suffix == ".pyc" for f in cache.iterdir()):
        shutil.rmtree(cache)


def _prune(root: Path, dirs: set[str]) -> None:
    for d in dirs:
        if (root / d).is_dir():
            _drop_bytecode(root / d)
    remove_empty([root / d for d in dirs])


def write_files(root: Path, files: dict[str, Path], executable: set[str]) -> None:
    for rel, src in files.items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        mode = 0o755 if rel in executable or os.stat(src).st_mode & 0o111 else 0o644
        os.chmod(dst, mode)


def remove_install(host: Host, manifest: dict) -> list[str]:
    """Delete what a manifest lists (files, then the folders the install created); returns the
    outer folders it created, which another host's install may still share (~/.config)."""
    for rel in manifest.get("files", []):
        if _safe_rel(rel):
            (host.root / rel).unlink(missing_ok=True)
    _prune(host.root, {d for d in manifest.get("dirs", []) if _safe_rel(d)})
    parents = list(manifest.get("parents", []))
    if manifest.get("kritarc"):
        disable_in_kritarc(manifest["kritarc"])
        parents += manifest["kritarc"].get("parents", [])
    remove_empty(parents)
    return parents


# -- the engine's venv -------------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


# -- which torch build: the machine's GPU -----------------------------------------------------
#
# Facts for the pinned torch 2.14.1 (look them up again when the pin moves):
# - PyTorch 2.14 publishes CUDA 12.6 (legacy: the only build for Maxwell, Pascal and Volta), 13.0
#   and 13.2 builds (pytorch/pytorch#190355, #194367). CUDA 13 runs on Turing (compute 7.5) and
#   newer only. Indexes are download.pytorch.org/whl/cuXYZ, its wheels labelled +cuXYZ (cu126
#   and cu130 seen in Acly/krita-ai-diffusion's lock files for 2.13; assumed for 2.14.1).
# - PyPI's Linux x86_64 torch 2.14.1 is a CUDA 13.0 build (seen: torch.version.cuda == "13.0"
#   on this project's CI machine); a CUDA plan pins +cu130 all the same, as only a pinned label
#   replaces another build already in the venv. PyPI's Windows torch is CPU-only (PyTorch's
#   install selector); macOS's (arm64 only since 2.3) runs MPS.
# - ROCm: 2.13 was built for ROCm 7.2 (whl/rocm7.2, +rocm7.2). Which ROCm index 2.14.1 is on
#   could not be confirmed (#194367 lists "ROCm 7.14"): ROCM below is 2.13's; if pip finds no
#   torch there, it fails saying so, and --torch-index URL takes the right one.
# - Intel GPUs: whl/xpu (+xpu), Linux and Windows. No ROCm build of PyTorch's own for Windows.
TORCH_WHL = "https://download.pytorch.org/whl"
CUDA_BUILDS = ((13, 0), (12, 6))  # newest first; 13.2 exists but 13.0 serves every 13.x driver
ROCM = "rocm7.2"
DEVICE_KINDS = ("auto", "nvidia", "amd", "intel", "apple", "cpu")
GPU_PROBES = ("nvidia-smi", "rocminfo", "amd-smi", "lspci", "Windows' video controllers")


@dataclass(frozen=True)
class Gpu:
    vendor: str  # nvidia | amd | intel | apple
    name: str
    cuda: tuple[int, int] | None = None  # NVIDIA: the newest CUDA its driver runs (nvidia-smi)
    compute: tuple[int, int] | None = None  # NVIDIA: compute capability
    found_by: str = ""

    def describe(self) -> str:
        extra = [f"driver runs CUDA {self.cuda[0]}.{self.cuda[1]}"] if self.cuda else []
        extra += [f"compute {self.compute[0]}.{self.compute[1]}"] if self.compute else []
        extra += [f"found by {self.found_by}"] if self.found_by else []
        return f"{self.name} ({', '.join(extra)})" if extra else self.name


@dataclass(frozen=True)
class TorchPlan:
    kind: str  # the GPU vendor torch will drive (nvidia, amd, intel, apple) or cpu
    index: str | None  # the extra pip index; None: PyPI's own build
    label: str | None  # the build's local version label (cu126, rocm7.2, xpu, cpu): pins it
    why: str
    warning: str | None = None  # a GPU the engine will not use: repeated in the last lines


def _probe(cmd: list[str], timeout: float = 30) -> str | None:
    """A probe's output, or None when it is not there or fails."""
    exe = shutil.which(cmd[0])
    if not exe:
        return None
    try:
        r = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _version(text: str) -> tuple[int, int] | None:
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2])) if m else None


def parse_nvidia(table: str | None, query: str | None) -> list[Gpu]:
    """GPUs from `nvidia-smi` (its header names the driver's CUDA version) and
    `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`."""
    if not query:
        return []
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", table or "")
    cuda = (int(m[1]), int(m[2])) if m else None
    gpus = []
    for line in query.strip().splitlines():
        name, _, cap = line.rpartition(",") if "," in line else (line, "", "")
        gpus.append(Gpu("nvidia", name.strip(), cuda, _version(cap), "nvidia-smi"))
    return gpus


def parse_rocminfo(text: str | None) -> list[Gpu]:
    """AMD GPU agents of `rocminfo` (gfx names; their marketing names where given)."""
    gpus, name = [], None
    for line in (text or "").splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "Name":
            name = value if value.startswith("gfx") else None
        elif key == "Marketing Name" and name:
            gpus.append(Gpu("amd", f"{value} ({name})", found_by="rocminfo"))
            name = None
    return gpus


def parse_display_names(names: list[str], found_by: str, nvidia: bool = False) -> list[Gpu]:
    """GPUs among display adapters' names (lspci lines, Windows' controllers); NVIDIA's only when
    asked (nvidia-smi found none: no driver). Intel's XPU build drives Arc and Data Center GPUs;
    older integrated graphics are left out."""
    gpus = []
    for name in names:
        low = name.lower()
        if "nvidia" in low:
            if nvidia:
                gpus.append(Gpu("nvidia", name.strip(), found_by=found_by))
        elif "amd" in low or "radeon" in low or "advanced micro devices" in low:
            gpus.append(Gpu("amd", name.strip(), found_by=found_by))
        elif "intel" in low and ("arc" in low or "data center gpu" in low):
            gpus.append(Gpu("intel", name.strip(), found_by=found_by))
    return gpus


def find_gpus(system: str | None = None) -> list[Gpu]:
    """The machine's GPUs that a torch build can drive, strongest vendor first."""
    system = system or current_layout()
    query = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    table = _probe(["nvidia-smi"])
    gpus = parse_nvidia(
        table, _probe(query) or _probe(query[:1] + ["--query-gpu=name"] + query[2:])
    )
    if system == "macos":
        return (
            [Gpu("apple", "Apple Silicon GPU (MPS)", found_by="arm64")] if apple_silicon() else []
        )
    if system == "linux":
        amd = parse_rocminfo(_probe(["rocminfo"]))
        if not amd and re.search(r"^GPU:\s*\d", _probe(["amd-smi", "list"]) or "", re.M):
            amd = [Gpu("amd", "AMD GPU", found_by="amd-smi")]
        lspci = (_probe(["lspci"]) or "").splitlines()
        adapters = [ln for ln in lspci if re.search(r"VGA|3D|Display", ln)]
        seen = parse_display_names(adapters, "lspci", nvidia=not gpus)
        gpus += [g for g in seen if g.vendor == "nvidia"]
        gpus += amd or [g for g in seen if g.vendor == "amd"]
        gpus += [g for g in seen if g.vendor == "intel"]
    elif system == "windows":
        names = "(Get-CimInstance Win32_VideoController).Name"
        adapters = (_probe(["powershell", "-NoProfile", "-Command", names]) or "").splitlines()
        gpus += parse_display_names(adapters, "Windows", nvidia=not gpus)
    order = ("nvidia", "amd", "intel")
    return sorted(gpus, key=lambda g: order.index(g.vendor) if g.vendor in order else 9)


def apple_silicon() -> bool:
    if platform.machine().lower() == "arm64":
        return True
    return (_probe(["sysctl", "-n", "sysctl.proc_translated"]) or "").strip() == "1"  # Rosetta


def _cuda_plan(system: str, gpu: Gpu | None) -> TorchPlan:
    name = gpu.describe() if gpu else "an NVIDIA GPU (as told)"
    if system == "macos":
        return TorchPlan("cpu", None, None, "CUDA does not exist on macOS", f"{name}: not usable")
    cuda = gpu.cuda if gpu and gpu.cuda else CUDA_BUILDS[0]  # told, not seen: assume recent
    old_arch = bool(gpu and gpu.compute and gpu.compute < (7, 5))
    if gpu and gpu.compute and gpu.compute < (5, 0):
        return TorchPlan(
            "cpu", None, None, f"{name}: too old for any torch 2.14 build (Maxwell or newer)",
            f"{name} is older than torch supports: the engine will run on the CPU",
        )  # fmt: skip
    fits = [b for b in CUDA_BUILDS if b <= cuda and not (old_arch and b >= (13, 0))]
    if not fits and cuda >= (12, 0):  # CUDA's minor-version compatibility runs 12.6 on 12.x
        fits = [(12, 6)]
    if not fits:
        need = "12.0" if old_arch else "13.0 (driver 580 or newer)"
        return TorchPlan(
            "cpu", None, None, f"{name}: its driver is too old for every torch 2.14 CUDA build",
            f"{name}: update the NVIDIA driver (CUDA {need}), then rerun install.py",
        )  # fmt: skip
    major, minor = fits[0]
    tag = f"cu{major}{minor}"
    why = f"{name}: torch's CUDA {major}.{minor} build"
    if gpu and gpu.found_by != "nvidia-smi":
        why += " (no nvidia-smi: install NVIDIA's driver)"
    if old_arch:
        why += " (CUDA 13 builds dropped GPUs older than Turing)"
    # PyPI's Linux build is CUDA 13.0 too, but only a pinned +cuXYZ replaces another build
    return TorchPlan("nvidia", f"{TORCH_WHL}/{tag}", tag, why)


def plan_torch(
    system: str,
    gpus: list[Gpu],
    kind: str = "auto",
    index: str | None = None,
    machine: str | None = None,
) -> TorchPlan:
    """Which torch build to install for `system` (a layout) with `gpus`, and why. `kind` forces a
    vendor (auto: the strongest found); `index` forces a pip index."""
    machine = (machine or platform.machine()).lower()
    if index:  # as told; the build's label, where the address names one, pins it
        m = re.search(r"/(cu\d+|rocm[\d.]+|xpu|cpu)/?$", index)
        label = m[1] if m else None
        named = {"cu": "nvidia", "ro": "amd", "xp": "intel", "cp": "cpu"}.get((label or "")[:2])
        vendor = named or (kind if kind != "auto" else gpus[0].vendor if gpus else "cpu")
        return TorchPlan(vendor, index, label, f"the torch build of {index} (as told)")
    gpu = next((g for g in gpus if kind in ("auto", g.vendor)), None)
    vendor = gpu.vendor if gpu else "cpu" if kind == "auto" else kind
    found = ", ".join(g.describe() for g in gpus)
    if vendor == "cpu":
        if kind == "cpu" and gpus:
            return TorchPlan("cpu", f"{TORCH_WHL}/cpu", "cpu", "the CPU build (as told)",
                             f"{found} left unused (--device-kind cpu)")  # fmt: skip
        if kind == "cpu" and system != "macos":
            return TorchPlan("cpu", f"{TORCH_WHL}/cpu", "cpu", "the CPU build (as told)")
        return TorchPlan("cpu", None, None, "no GPU found: PyPI's torch, run on the CPU")
    if vendor == "nvidia":
        return _cuda_plan(system, gpu)
    name = gpu.describe() if gpu else f"{vendor} GPU (as told)"
    if vendor == "amd":
        if system != "linux":
            return TorchPlan("cpu", None, None, f"{name}: PyTorch builds ROCm for Linux only",
                             f"{name}: no torch build for it on {system}, the engine will run on "
                             "the CPU")  # fmt: skip
        note = "" if gpu and gpu.found_by != "lspci" else " (no rocminfo: install ROCm's driver)"
        return TorchPlan("amd", f"{TORCH_WHL}/{ROCM}", ROCM, f"{name}: torch's ROCm build{note}")
    if vendor == "intel":
        if system == "macos":
            return TorchPlan("cpu", None, None, f"{name}: no XPU build for macOS",
                             f"{name}: not usable on macOS")  # fmt: skip
        return TorchPlan("intel", f"{TORCH_WHL}/xpu", "xpu", f"{name}: torch's XPU build")
    if system != "macos":  # apple
        return TorchPlan(
            "cpu",
            None,
            None,
            "Apple GPUs exist on macOS only",
            "--device-kind apple on another system: the engine will run on the CPU",
        )
    if machine not in ("arm64", "aarch64"):
        return TorchPlan("apple", None, None, f"{name}: PyPI's torch (it runs MPS)",
                         "this Python runs under Rosetta (x86_64): torch 2.14 has no such macOS "
                         "build; use an arm64 Python")  # fmt: skip
    return TorchPlan("apple", None, None, f"{name}: PyPI's torch (it runs MPS)")


def torch_message(plan: TorchPlan, seen: dict) -> tuple[str, str | None]:
    """What the installed torch drives, against the plan: (message, warning for the last lines).
    `seen`: the venv's torch's {cuda, hip, xpu} builds and {cuda_ok, mps_ok, xpu_ok}."""
    build = (
        f"ROCm {seen['hip']}" if seen.get("hip") else f"CUDA {seen['cuda']}" if seen.get("cuda")
        else "XPU" if seen.get("xpu") else "CPU-only"
    )  # fmt: skip
    if seen.get("cuda_ok") or seen.get("mps_ok") or seen.get("xpu_ok"):
        gpu = "MPS" if seen.get("mps_ok") else "XPU" if seen.get("xpu_ok") else build
        return f"torch's {build} build will use the GPU ({gpu})", None
    if plan.kind == "cpu":
        if plan.warning:
            return f"torch's {build} build: the engine will run on the CPU", plan.warning
        return "no GPU found: the engine will run on the CPU", None
    fix = f"python install.py --device-kind {plan.kind}"
    if build == "CPU-only" or (plan.kind == "amd") != bool(seen.get("hip")):
        why = f"this torch is a {build} build, not the one planned ({plan.why})"
    else:
        why = f"torch's {build} build cannot use it (driver missing or too old?)"
    warning = f"GPU found, but the engine will run on the CPU: {why}. Fix: `{fix}`"
    return warning, warning


def torch_pins(source: Path) -> list[tuple[str, str]]:
    """(name, version) of torch and torchvision as pyproject.toml pins them."""
    text = (source / "pyproject.toml").read_text(encoding="utf-8")
    return re.findall(r'"(torch|torchvision)==([\w.]+)"', text)


def shell_line(cmd: list[str]) -> str:
    return subprocess.list2cmdline(cmd) if os.name == "nt" else shlex.join(cmd)


def run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, **kw)
    except OSError as e:
        raise InstallError(f"{what}: cannot run {cmd[0]}: {e}") from e
    if r.returncode:
        raise InstallError(f"{what} failed (exit {r.returncode}): see the output above")
    return r


# -- the installer -------------------------------------------------------------------------


class Installer:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp, self.dry = args, tmp, args.dry_run
        self.layout = layout_for(args.platform_layout, args.home)
        hosts = hosts_for(self.layout, args.krita_dir, args.gimp_dir)
        self.hosts = [h for h in hosts if not getattr(args, f"no_{h.key}")]
        self.python = venv_python(args.venv)
        self._wheels: dict[tuple, tuple[Path, str]] = {}  # (version, platforms) -> unpacked
        self._system: tuple[str | None, bool] | None = None

    def would(self, text: str) -> None:
        say(f"    {'would ' if self.dry else ''}{text}")

    # engine -------------------------------------------------------------------------------

    def engine(self) -> None:
        self.create_venv()
        self.choose_torch()
        self.install_project()
        self.report_device()

    def choose_torch(self) -> None:
        a = self.args
        step("engine: the torch build for this machine")
        self.plan = plan_torch(current_layout(), find_gpus(), a.device_kind, a.torch_index)
        say(f"    {self.plan.why}")
        if self.plan.index:
            say(f"    from {self.plan.index}")
        self.device_warning = self.plan.warning

    def create_venv(self) -> None:
        venv = self.args.venv
        step(f"engine: virtual environment {venv}")
        if self.python.exists():
            say(f"    {venv} exists: reusing it")
            return
        if sys.version_info < ENGINE_PYTHON:
            raise InstallError(
                f"the engine needs Python {'.'.join(map(str, ENGINE_PYTHON))} or newer and this "
                f"is {platform.python_version()}: run install.py with a newer python3 "
                "(or use --plugins-only for the plug-ins alone)"
            )
        self.would(f"create it with {sys.executable} -m venv")
        if not self.dry:
            run([sys.executable, "-m", "venv", str(venv)], "creating the venv")

    def install_project(self) -> None:
        src = self.args.source
        extras = ",".join(e for e in ("dev", "cluster") if getattr(self.args, e))
        target = f"{src}[{extras}]" if extras else str(src)
        cmd = [str(self.python), "-m", "pip", "install", "-e", target]
        if self.plan.label:  # pinned to the build: an installed torch of another build goes
            cmd += [f"{name}=={version}+{self.plan.label}" for name, version in torch_pins(src)]
        if self.plan.index:
            cmd += ["--extra-index-url", self.plan.index]
        step(f"engine: installing the project into the venv (pip install -e {target})")
        if self.dry:
            self.would(f"run {shell_line(cmd)}")
            return
        try:
            run(cmd, "pip install")
        except InstallError as e:
            if not self.plan.label:
                raise
            raise InstallError(
                f"{e}. If pip found no torch +{self.plan.label} build there, pass the index that "
                "has it with --torch-index URL, or --device-kind cpu"
            ) from None

    def report_device(self) -> None:
        step("engine: torch and the device")
        if self.dry:
            say("    which device torch can use is checked after the install")
            return
        code = (
            "import json,torch;x=getattr(torch,'xpu',None);print(json.dumps({'cuda':torch.version"
            ".cuda,'hip':torch.version.hip,'xpu':getattr(torch.version,'xpu',None),'cuda_ok':torch"
            ".cuda.is_available(),'mps_ok':torch.backends.mps.is_available(),'xpu_ok':bool(x and "
            "x.is_available())}))"
        )
        r = run([str(self.python), "-c", code], "checking torch", stdout=subprocess.PIPE, text=True)
        seen = json.loads(r.stdout.strip().splitlines()[-1])  # errors stay visible
        message, self.device_warning = torch_message(self.plan, seen)
        say(f"    {message}")

    # plug-ins -----------------------------------------------------------------------------

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
        if self.python.exists():
            return str(self.python)
        raise InstallError("pip is needed to download pyzmq: install pip, or pass --pyzmq-wheel")

    def pyzmq(self, python: HostPython) -> tuple[dict[str, Path], str | None]:
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

    def plugins(self) -> None:
        shared = client_files(self.args.source)
        for host in self.hosts:
            step(f"{host.label} plug-in: {host.folder}")
            files = {**plugin_files(host.key, self.args.source), **shared}
            python = self.host_python(host)
            say(f"    pyzmq: {python.why}")
            if self.dry and python.version:
                self.would(f"add pyzmq for Python {python.version} ({python.platforms[0]})")
                zmq_files, wheel = {}, None
            else:
                zmq_files, wheel = self.pyzmq(python)
                if wheel:
                    say(f"    pyzmq: {wheel} unpacked into {LIB}/")
            files.update(zmq_files)
            pyzmq = {"bundled": wheel is not None, "wheel": wheel, "python": python.version}
            pyzmq |= {"platforms": list(python.platforms), "why": python.why}
            self.install_host(host, files, pyzmq)

    def install_host(self, host: Host, files: dict[str, Path], pyzmq: dict) -> None:
        """Copy the files in, drop what an older install had and this one has not, record it."""
        old = read_manifest(host.manifest) or {}
        new = set(files) | {f"{PLUGIN}/{LIB}/{MANIFEST}"}
        stale = {r for r in old.get("files", []) if _safe_rel(r)} - new
        removed = f", remove {len(stale)} old ones" if stale else ""
        self.would(f"{'update' if old else 'install'} {len(new)} files{removed}")
        kritarc = self.layout.kritarc if host.key == "krita" else None
        if kritarc:
            self.would(f"enable it in {kritarc} ({KRITA_SECTION} {KRITA_KEY}=true)")
        if self.dry:
            return
        needed = {d for rel in new for d in _ancestors(rel)}
        dirs = {d for d in needed if not (host.root / d).exists()}  # this run creates them
        dirs |= {d for d in old.get("dirs", []) if (host.root / d).is_dir()}
        parents = old.get("parents") or [str(p) for p in missing_dirs(host.root)]
        write_files(host.root, files, {f"{PLUGIN}/{PLUGIN}.py"} if host.key == "gimp" else set())
        for rel in stale:
            (host.root / rel).unlink(missing_ok=True)
        _prune(host.root, dirs - needed)
        manifest = {
            "format": MANIFEST_FORMAT,
            "host": host.key,
            "root": str(host.root),
            "installed": time.strftime("%Y-%m-%d %H:%M:%S"),
            "source": str(self.args.source),
            "files": sorted(new),
            "dirs": sorted(d for d in dirs if (host.root / d).is_dir()),
            "parents": parents,
            "pyzmq": pyzmq,
            "kritarc": enable_in_kritarc(kritarc, old.get("kritarc")) if kritarc else None,
        }
        host.manifest.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")

    def uninstall(self) -> None:
        parents: list[str] = []
        for host in self.hosts:
            step(f"{host.label} plug-in: removing {host.folder}")
            manifest = read_manifest(host.manifest)
            if manifest is None:
                say(f"    nothing installed by install.py there ({host.manifest} not found)")
                continue
            kritarc = manifest.get("kritarc")
            self.would(f"remove {len(manifest.get('files', []))} files it installed")
            if kritarc:
                self.would(f"remove {KRITA_KEY} from {kritarc['path']}")
            if not self.dry:
                parents += remove_install(host, manifest)
        remove_empty(parents)  # once the last host left a shared folder empty
        step("kept")
        say(f"    the engine venv ({self.args.venv}) and the model weights: delete them by hand")

    # weights --------------------------------------------------------------------------------

    def weights(self) -> None:
        names = ["adm256", "clip"] + ["adm512"] * self.args.with_512
        step(f"weights: {', '.join(names)} into the per-user models folder")
        if not self.python.exists() and not self.dry:
            raise InstallError(
                f"no engine venv at {self.args.venv}: run `python install.py` first "
                "(or pass --venv DIR)"
            )
        cmd = [str(self.python), "-m", "engine.weights", "fetch", *names]
        if self.dry:
            self.would(f"run {shell_line(cmd)}")
            return
        try:
            run(cmd, "downloading the weights", cwd=ROOT)
        except InstallError as e:
            raise InstallError(
                f"{e}. `python install.py --weights-only` resumes a broken download"
            ) from None

    def models_dir(self) -> str:
        if not self.python.exists():
            return "the per-user models folder (python -m engine.weights where)"
        cmd = [str(self.python), "-m", "engine.weights", "where"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        return r.stdout.strip() or "the per-user models folder"

    def summary(self, engine: bool, plugins: bool, weights: bool) -> None:
        step("dry run: nothing was changed" if self.dry else "done")

        def row(label: str, value: str) -> None:
            say(f"    {label + ':':<20}{value}")

        if engine or weights:
            row("start the engine", f"{self.python} -m engine serve")
            row("check everything", f"{self.python} -m engine doctor")
        elif plugins:
            row("start the engine", "python -m engine serve, where the engine runs")
        if plugins:
            for host in self.hosts:
                extra = f" (enabled in {self.layout.kritarc})" if host.key == "krita" else ""
                row(f"{host.label} plug-in", f"{host.folder}{extra}; restart {host.label}")
        if weights:
            row("model weights", self.models_dir())
        if engine and self.device_warning:  # the last thing said: a GPU the engine will not use
            say(f"    warning: {self.device_warning}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python install.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plugins-only", action="store_true", help="only the Krita/GIMP plug-ins")
    mode.add_argument("--weights-only", action="store_true", help="only the weights")
    mode.add_argument("--uninstall", action="store_true", help="remove the installed plug-ins")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--no-weights", action="store_true", help="skip the weights (CI)")
    p.add_argument("--with-512", action="store_true", help="also the 512x512 model (2.2 GB)")
    p.add_argument("--dev", action="store_true", help="pip install -e '.[dev]' (tests, ruff, Ray)")
    p.add_argument("--cluster", action="store_true", help="Ray Serve, for `serve --cluster`")
    p.add_argument("--venv", type=Path, default=ROOT / ".venv", help="default: .venv here")
    p.add_argument("--torch-index", metavar="URL", help="extra pip index for torch's wheels")
    p.add_argument("--device-kind", choices=DEVICE_KINDS, default="auto",
                   help="the GPU to install torch for (default: the one found)")  # fmt: skip
    g = p.add_argument_group("plug-in folders")
    g.add_argument("--krita-dir", type=Path, metavar="DIR", help="Krita's pykrita folder")
    g.add_argument("--gimp-dir", type=Path, metavar="DIR", help="GIMP 3's plug-ins folder")
    g.add_argument("--no-krita", action="store_true", help="leave Krita alone")
    g.add_argument("--no-gimp", action="store_true", help="leave GIMP alone")
    g.add_argument("--platform-layout", choices=LAYOUTS, default=current_layout())
    g.add_argument("--home", type=Path, default=Path(os.environ.get(HOME_ENV) or Path.home()),
                   help=f"the user's home (default: ${HOME_ENV} or ~)")  # fmt: skip
    g.add_argument("--source", type=Path, default=ROOT, help="checkout to install from")
    z = p.add_argument_group("pyzmq for the hosts' Python (X.Y, or `system`: it has pyzmq)")
    z.add_argument("--host-python", metavar="X.Y", help="both hosts' Python")
    z.add_argument("--krita-python", metavar="X.Y", help="Krita's Python")
    z.add_argument("--gimp-python", metavar="X.Y", help="GIMP's Python")
    z.add_argument("--platform", action="append", metavar="TAG", help="pip platform tag (repeat)")
    z.add_argument("--pyzmq-wheel", type=Path, metavar="FILE", help="use this wheel, no download")
    args = p.parse_args(argv)
    for name in ("host_python", "krita_python", "gimp_python"):
        value = getattr(args, name)
        if value and value != "system" and not re.fullmatch(r"3\.\d+", value):
            p.error(f"--{name.replace('_', '-')} takes X.Y (e.g. 3.10) or `system`, not {value!r}")
    if args.weights_only and args.no_weights:
        p.error("--weights-only and --no-weights contradict each other")
    if args.pyzmq_wheel and not args.pyzmq_wheel.is_file():
        p.error(f"--pyzmq-wheel: {args.pyzmq_wheel} is not a file")
    args.home, args.source = args.home.expanduser(), args.source.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = not (args.plugins_only or args.weights_only or args.uninstall)
    plugins = not (args.weights_only or args.uninstall)
    weights = not (args.plugins_only or args.no_weights or args.uninstall)
    try:
        with tempfile.TemporaryDirectory(prefix="bd-install-") as tmp:
            installer = Installer(args, Path(tmp))
            if args.uninstall:
                installer.uninstall()
                return 0
            if engine:
                installer.engine()
            if plugins:
                installer.plugins()
            if weights:
                installer.weights()
            installer.summary(engine, plugins, weights)
    except (InstallError, OSError) as e:  # a step that failed: its reason, not a traceback
        print(f"install.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("install.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
