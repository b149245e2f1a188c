"""Everything that depends on the kind of device, in one place: which device `auto` picks and why
the others were not picked, the precision each kind computes natively, autocast, generators,
synchronisation and memory queries.

Kinds, in the order `auto` tries them: `cuda` (NVIDIA, and AMD through torch's ROCm build, which
answers to the same name), `mps` (Apple Silicon), `xpu` (Intel GPUs), `cpu`. No other engine
module names a kind (tests/test_devices.py checks): they ask this one.

Only the CPU runs where this project is developed and tested; the other kinds follow torch's
documented API and are correct by construction. Before a GPU is used, `missing_ops` runs each
operation the engine needs on a few numbers and compares the result with the CPU's: a device
that lacks one (MPS lacks some) is named with the operation and never used silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

KINDS = ("cuda", "mps", "xpu", "cpu")  # the order `auto` tries them in
CHOICES = ("auto", *KINDS)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LABELS = {
    "cuda": "CUDA (NVIDIA, or AMD through ROCm)",
    "mps": "Apple MPS",
    "xpu": "Intel XPU",
    "cpu": "CPU",
}
# What each GPU kind computes natively in autocast: fp16 on CUDA/ROCm as the official code does;
# fp16 on MPS and XPU (torch's own autocast default there; bf16 needs newer hardware/macOS).
GPU_PRECISION = {"cuda": "fp16", "mps": "fp16", "xpu": "fp16"}
INSTALL_HINT = "python install.py"


def _xpu_module():
    return getattr(torch, "xpu", None)


def available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    if kind == "xpu":
        xpu = _xpu_module()
        return bool(xpu and xpu.is_available())
    return kind == "cpu"


def build() -> str:
    """Which accelerator this torch was built for, as a person reads it."""
    if torch.version.hip:
        return f"ROCm {torch.version.hip} build"
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda} build"
    if getattr(torch.version, "xpu", None):
        return f"XPU build ({torch.version.xpu})"
    if sys.platform == "darwin" and torch.backends.mps.is_built():
        return "macOS build with MPS"
    return "CPU-only build"


def why_not(kind: str) -> str:
    """Why `kind` is not available, and what to do about it."""
    if kind == "cuda":
        if not (torch.version.cuda or torch.version.hip):
            return f"this torch is a {build()}, without CUDA or ROCm"
        gpu = "AMD GPU (ROCm)" if torch.version.hip else "NVIDIA GPU"
        return (
            f"torch's {build()} sees no usable {gpu} (none installed, or its driver is missing or "
            "too old for this build)"
        )
    if kind == "mps":
        if sys.platform != "darwin":
            return "MPS exists on macOS only"
        if not torch.backends.mps.is_built():
            return "this torch was built without MPS"
        return "no Apple Silicon GPU (an Intel Mac, or macOS older than 12.3)"
    if kind == "xpu":
        if not getattr(torch.version, "xpu", None):
            return f"this torch ({build()}) has no XPU support"
        return "torch's XPU build sees no Intel GPU (driver missing?)"
    return ""


def explain() -> list[tuple[str, bool, str]]:
    """(kind, available, why not) for each kind, in the order `auto` tries them."""
    out = []
    for kind in KINDS:
        ok = available(kind)
        out.append((kind, ok, "" if ok else why_not(kind)))
    return out


def resolve(name: str = "auto", check: bool = True) -> torch.device:
    """The device for `name` (a kind, `auto`, or e.g. `cuda:1`). `auto` takes the first kind that
    is available and computes every operation the engine needs; a kind asked for by name must be
    available and complete, or this says why not."""
    if name == "auto":
        for kind in KINDS:
            if kind == "cpu" or not available(kind):
                continue
            dev = torch.device(kind)
            missing = missing_ops(dev) if check else []
            if not missing:
                return dev
            fallback(dev, "; ".join(missing), "running on the next device instead")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in KINDS:
        raise ValueError(f"unknown device {name!r}: choose one of {', '.join(CHOICES)}")
    if not available(dev.type):
        raise ValueError(
            f"--device {name} was asked for, but {why_not(dev.type)}. `{INSTALL_HINT}` installs "
            "the torch build for the GPU it finds"
        )
    missing = missing_ops(dev) if check and dev.type != "cpu" else []
    if missing:
        raise ValueError(
            f"--device {name}: {LABELS[dev.type]} lacks {'; '.join(missing)}. "
            "Use --device cpu (or auto, which skips it)"
        )
    return dev


# -- the operations the engine needs, checked on a device against the CPU -------------------


def _probe_ops() -> dict[str, Callable[[torch.device], torch.Tensor]]:
    """One small call of each kind of operation the UNet, CLIP and the augmentations use."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, 16, generator=g)
    w = torch.randn(8, 8, 3, 3, generator=g) * 0.1
    q = torch.randn(2, 4, 16, 8, generator=g)
    theta = torch.tensor([[[0.9, 0.1, 0.05], [-0.1, 0.9, 0.0]]]).repeat(2, 1, 1)
    a = torch.randn(2, 8, 8, generator=g) + 4 * torch.eye(8)
    return {
        "conv2d": lambda d: F.conv2d(x.to(d), w.to(d), padding=1),
        "group_norm": lambda d: F.silu(F.group_norm(x.to(d), 4)),
        "layer_norm": lambda d: F.gelu(F.layer_norm(x.to(d), (16,))),
        "scaled_dot_product_attention": lambda d: F.scaled_dot_product_attention(
            q.to(d), q.to(d), q.to(d)
        ),
        "interpolate": lambda d: F.interpolate(x.to(d), scale_factor=2, mode="nearest"),
        "avg_pool2d": lambda d: F.avg_pool2d(x.to(d), 2),
        # CLIP's input from the model's size (e.g. 256 -> 224): not a divisor
        "adaptive_avg_pool2d": lambda d: F.adaptive_avg_pool2d(x.to(d), 14),
        "grid_sample": lambda d: F.grid_sample(
            x.to(d),
            F.affine_grid(theta.to(d), list(x.shape), align_corners=False),
            padding_mode="border",
            align_corners=False,
        ),
        "linalg.solve": lambda d: torch.linalg.solve(a.to(d), a[..., :1].to(d)),
    }


def missing_ops(dev: torch.device) -> list[str]:
    """Each operation the device cannot run, or runs to a result other than the CPU's."""
    problems = []
    for name, op in _probe_ops().items():
        try:
            got = op(dev).float().cpu()
        except (NotImplementedError, RuntimeError, TypeError) as e:
            problems.append(f"{name} ({str(e).splitlines()[0][:120]})")
            continue
        ref = op(torch.device("cpu")).float()
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-3, atol=1e-3):
            problems.append(f"{name} (a wrong result)")
    return problems


def has_float64(device: torch.device) -> bool:
    """Metal computes no float64: MPS refuses such tensors."""
    return device.type != "mps"


def fallback(device: torch.device, missing: str, instead: str) -> None:
    """Say, where the engine's messages go, that the device lacks something and what is done."""
    print(f"engine: {LABELS[device.type]} lacks {missing}: {instead}", file=sys.stderr, flush=True)


# -- precision ----------------------------------------------------------------------------------


# oneDNN's instruction sets below the first with bf16 dot products (ONEDNN_MAX_CPU_ISA): capped
# at one of these, a CPU computes bf16 by emulation, 1000x slower than fp32 (measured here).
ONEDNN_ISAS_WITHOUT_BF16 = (
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"
)


def cpu_has_native_bf16() -> bool:
    """From the CPU's flags, unless oneDNN is capped below them (`bench --isa avx2` runs this
    machine as one without bf16 that way)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    flags = Path("/proc/cpuinfo")
    if not flags.is_file():
        return False
    text = flags.read_text()
    return "avx512_bf16" in text or "amx_bf16" in text


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: what the device computes natively (GPU_PRECISION; bf16 on a CPU that has it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type in GPU_PRECISION:
        return GPU_PRECISION[device.type]
    return "bf16" if cpu_has_native_bf16() else "fp32"


def fp16_blocks(device: torch.device) -> bool:
    """guided_diffusion's own fp16 UNet blocks, as the official code runs on CUDA (the bench's
    reference; the engine keeps fp32 weights and autocasts per job)."""
    return device.type == "cuda"


def gemm_for_wide_convs(device: torch.device) -> bool:
    """Whether wide convolutions over few pixels run faster as matrix products (accel): measured
    on a CPU without native bf16, where oneDNN's fp32 direct convolution is slow there."""
    return device.type == "cpu" and not cpu_has_native_bf16()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision: matmuls and convolutions in 16 bits, the rest in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def clip_precision(precision: str, device: torch.device) -> str:
    """CLIP runs in the job's precision, but on a CPU only in bf16 (not fp16, which a CPU does
    not compute natively). With its attention folded (accel.fold_clip_attention), ViT-B/16's
    forward and backward over 8 copies took 1.4 s in bf16 against 3.7 s in fp32 on a CPU with
    native bf16 (before the fold bf16 was the slower, 10 s). Its gradient then differs from
    fp32's by far less than two augmentation draws differ from each other (cosine 0.83 against
    0.36 for ViT-B/16, 0.94 against 0.33 for the demo CLIP, measured here)."""
    if device.type == "cpu" and precision != "bf16":
        return "fp32"
    return precision


# -- random state, timing, memory -----------------------------------------------------------------


def generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator a seed, on the device, so noise is drawn where it is used."""
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def _module(device: torch.device):
    """torch.cuda, torch.mps or torch.xpu; None for the CPU."""
    return None if device.type == "cpu" else getattr(torch, device.type, None)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously: timing needs this)."""
    module = _module(device)
    if module is not None:
        module.synchronize()


# what running out of memory raises: the host's, and the GPU's (ROCm builds raise the CUDA one)
OUT_OF_MEMORY = (MemoryError, torch.cuda.OutOfMemoryError)


def free_cached_memory(device: torch.device) -> None:
    """Give the device's cached blocks back after an out-of-memory job."""
    module = _module(device)
    if module is not None and hasattr(module, "empty_cache"):
        module.empty_cache()


# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (its mallinfo2 typed), else None."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 and newer
        libc.mallinfo2.restype = _Mallinfo2
    return libc


def keep_freed_host_memory() -> bool:
    """Keep the memory this process frees for its next allocations instead of giving it back.

    glibc returns every large block to the kernel as soon as it is freed, so each step's
    activations are faulted in and zeroed again: ADM-256's guided forward and backward (fp32,
    2-core AVX2 CPU, in a job's thread) took 42-46 s with 3.4 M page faults and 11.7 s of
    kernel time; with one arena (the job's thread allocates from the main heap), no mmap for
    large blocks and no trimming, 36-39 s and no faults once the heap has grown (its first
    steps). Transparent huge pages (torch's THP_MEM_ALLOC_ENABLE) cut the faults to 125 k but
    not the kernel's zeroing: no faster. Costs what fragments (1.2-1.5 GB more peak for
    ADM-256), which `available_memory_gb` counts as free. glibc only; True when it applied."""
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def trim_host_memory() -> None:
    """Give the heap's free memory back to the system (an evicted model's): the engine keeps
    freed memory for its next steps otherwise (keep_freed_host_memory). glibc only."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux; else None)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def heap_free_bytes() -> int:
    """Bytes freed into this process's heap and kept there for reuse (glibc; else 0)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 0
    return libc.mallinfo2().fordblks


def available_memory_gb(device: torch.device) -> float:
    """What a job can still use: the device's free memory plus what this process keeps freed
    for reuse (torch's cache on a GPU, the heap on the CPU)."""
    if device.type in ("cuda", "xpu"):
        module = _module(device)
        cached = module.memory_reserved(device) - module.memory_allocated(device)
        return (module.mem_get_info(device)[0] + cached) / 2**30
    if device.type == "mps":  # unified memory: what Metal recommends, minus what it holds
        return (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()) / 2**30
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20 + heap_free_bytes() / 2**30
    return 8.0  # no way to tell (macOS, Windows): assume a modest machine


def free_bytes(device: torch.device, free_gb: float | None = None) -> int:
    """The device's free memory in bytes: `free_gb` where it was asked already (a replica's,
    as it was when described), else asked now."""
    if free_gb is None:
        free_gb = available_memory_gb(device)
    return int(free_gb * 2**30)


def bytes_of(*modules: torch.nn.Module) -> int:
    """What the modules' weights and buffers hold on their device."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory_mb(device: torch.device) -> float | None:
    """The device's peak allocation so far (None on the CPU: the bench reports the RSS)."""
    if device.type in ("cuda", "xpu"):
        return _module(device).max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20  # Metal reports no peak: the current
    return None


def identity(device: torch.device) -> str:
    """The device as a step's time depends on it: a GPU with its model (an index names another
    GPU under another CUDA_VISIBLE_DEVICES), the CPU with its threads (a cluster's CPU replica
    gets a share of the cores)."""
    module = _module(device)
    if module is not None and hasattr(module, "get_device_name"):
        return f"{device} ({module.get_device_name(device)})"
    return f"{device}, {torch.get_num_threads()} thread(s)" if device.type == "cpu" else str(device)


def names(device: torch.device) -> list[str]:
    """The GPUs of the device's kind, by name (empty for the CPU and MPS)."""
    module = _module(device)
    if device.type not in ("cuda", "xpu") or module is None:
        return []
    return sorted({module.get_device_name(i) for i in range(module.device_count())})
