"""Which torch build drives the machine's GPU: the probes (nvidia-smi, rocminfo, amd-smi, lspci,
Windows' video controllers), the plan (pip index and build label, and why), and what the
installed torch turned out to drive.

Facts for the pinned torch 2.14.1 (look them up again when the pin moves):
- PyTorch 2.14 publishes CUDA 12.6 (legacy: the only build for Maxwell, Pascal and Volta), 13.0
  and 13.2 builds (pytorch/pytorch#190355, #194367). CUDA 13 runs on Turing (compute 7.5) and
  newer only. Indexes are download.pytorch.org/whl/cuXYZ, its wheels labelled +cuXYZ (cu126
  and cu130 seen in Acly/krita-ai-diffusion's lock files for 2.13; assumed for 2.14.1).
- PyPI's Linux x86_64 torch 2.14.1 is a CUDA 13.0 build (seen: torch.version.cuda == "13.0"
  on this project's CI machine); a CUDA plan pins +cu130 all the same, as only a pinned label
  replaces another build already in the venv. PyPI's Windows torch is CPU-only (PyTorch's
  install selector); macOS's (arm64 only since 2.3) runs MPS.
- ROCm: 2.13 was built for ROCm 7.2 (whl/rocm7.2, +rocm7.2). Which ROCm index 2.14.1 is on
  could not be confirmed (#194367 lists "ROCm 7.14"): ROCM below is 2.13's; if pip finds no
  torch there, it fails saying so, and --torch-index URL takes the right one.
- Intel GPUs: whl/xpu (+xpu), Linux and Windows. No ROCm build of PyTorch's own for Windows.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from installer.layout import current_layout

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
