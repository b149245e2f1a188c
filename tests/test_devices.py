"""Device choice, precision and the operations check, with availability faked: only the CPU is
here. And the rule that no other engine module names a device kind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from engine import devices

ENGINE = Path(__file__).resolve().parents[1] / "engine"


@pytest.fixture
def fake(monkeypatch):
    """fake(*kinds): those kinds (and the CPU) are available and complete."""

    def set_available(*kinds: str, lacking: dict[str, list[str]] | None = None) -> None:
        monkeypatch.setattr(devices, "available", lambda k: k == "cpu" or k in kinds)
        monkeypatch.setattr(devices, "missing_ops", lambda d: (lacking or {}).get(d.type, []))

    return set_available


@pytest.mark.parametrize(
    "kinds, chosen",
    [
        (("cuda", "mps", "xpu"), "cuda"),
        (("mps", "xpu"), "mps"),
        (("xpu",), "xpu"),
        (("cuda", "xpu"), "cuda"),
        ((), "cpu"),
    ],
)
def test_auto_takes_cuda_then_mps_then_xpu_then_the_cpu(fake, kinds, chosen):
    fake(*kinds)
    assert devices.resolve("auto") == torch.device(chosen)


def test_auto_skips_a_device_that_lacks_an_operation_and_says_which(fake, capsys):
    fake("mps", "xpu", lacking={"mps": ["adaptive_avg_pool2d (not implemented)"]})
    assert devices.resolve("auto") == torch.device("xpu")
    err = capsys.readouterr().err
    assert "Apple MPS lacks adaptive_avg_pool2d" in err and "next device" in err


def test_a_device_asked_for_must_be_there_and_complete(fake):
    fake("xpu", lacking={"xpu": ["grid_sample (a wrong result)"]})
    with pytest.raises(ValueError, match="--device cuda was asked for, but"):
        devices.resolve("cuda")
    with pytest.raises(ValueError, match="lacks grid_sample"):
        devices.resolve("xpu")
    with pytest.raises(ValueError, match="unknown device"):
        devices.resolve("tpu")
    assert devices.resolve("cpu") == torch.device("cpu")


def test_why_not_names_a_cpu_only_build_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "xpu", None, raising=False)
    assert "CPU-only build" in devices.why_not("cuda")
    with pytest.raises(ValueError, match="CPU-only build.*`python install.py`"):
        devices.resolve("cuda")
    monkeypatch.setattr(torch.version, "hip", "7.2.0")
    assert devices.build() == "ROCm 7.2.0 build"
    assert "AMD GPU" in devices.why_not("cuda")
    assert "no XPU support" in devices.why_not("xpu")


@pytest.mark.parametrize("kind, native", [("cuda", "fp16"), ("mps", "fp16"), ("xpu", "fp16")])
def test_precision_per_device_kind_and_the_override(kind, native):
    dev = torch.device(kind)
    assert devices.resolve_precision("auto", dev) == native
    for asked in ("fp32", "bf16", "fp16"):
        assert devices.resolve_precision(asked, dev) == asked
    assert devices.clip_precision("fp16", dev) == "fp16"
    with pytest.raises(ValueError, match="precision"):
        devices.resolve_precision("int8", dev)


def test_the_cpu_runs_bf16_only_where_it_is_native(monkeypatch):
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda n=native: n)
        assert devices.resolve_precision("auto", cpu) == expected
    # oneDNN capped below its bf16 instruction sets computes bf16 by emulation: not native
    monkeypatch.undo()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert devices.cpu_has_native_bf16() is False
    assert devices.resolve_precision("auto", cpu) == "fp32" and devices.gemm_for_wide_convs(cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert devices.cpu_has_native_bf16() is ("avx512_bf16" in flags or "amx_bf16" in flags)
    # CLIP in bf16 on a CPU (faster there once its attention folds), never in fp16
    assert devices.clip_precision("bf16", cpu) == "bf16"
    assert devices.clip_precision("fp16", cpu) == "fp32"
    assert devices.clip_precision("fp16", torch.device("cuda")) == "fp16"
    assert devices.fp16_blocks(cpu) is False and devices.fp16_blocks(torch.device("cuda"))


def test_the_operations_check_names_a_missing_op_and_a_wrong_result(monkeypatch):
    cpu = torch.device("cpu")
    assert devices.missing_ops(cpu) == []  # each probe runs and agrees with itself
    calls = []

    def drifting(d):  # the device's answer (first call) differs from the CPU's
        calls.append(d)
        return torch.ones(3) * len(calls)

    def missing(d):
        raise NotImplementedError("aten::foo is not implemented for the device\nmore")

    monkeypatch.setattr(devices, "_probe_ops", lambda: {"foo": missing, "bar": drifting})
    assert devices.missing_ops(cpu) == [
        "foo (aten::foo is not implemented for the device)",
        "bar (a wrong result)",
    ]


def test_on_this_machine_everything_runs_on_the_cpu_as_before():
    if any(devices.available(k) for k in ("cuda", "mps", "xpu")):
        pytest.skip("this machine has a GPU")
    dev = devices.resolve("auto")
    assert dev == torch.device("cpu")
    torch.manual_seed(1)  # the global state plays no part
    a = torch.randn(2, generator=devices.generators([5], dev)[0])
    b = torch.randn(2, generator=devices.generators([5], dev)[0])
    assert torch.equal(a, b)
    assert devices.available_memory_gb(dev) > 0 and devices.peak_memory_mb(dev) is None
    devices.synchronize(dev)  # nothing to wait for


KIND = re.compile(
    r"""["'](cuda|mps|xpu)(:\d+)?["']|torch\.(cuda|mps|xpu|backends\.mps|version\.(cuda|hip|xpu))\b"""
)


def test_only_the_devices_module_names_a_device_kind():
    offenders = []
    for path in sorted(ENGINE.rglob("*.py")):
        if path.name == "devices.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if KIND.search(code):
                offenders.append(f"{path.relative_to(ENGINE.parent)}:{n}: {line.strip()}")
    assert offenders == []


def test_without_float64_the_schedule_runs_in_float32_and_it_is_said(capsys):
    import numpy as np

    from engine.models import CONFIGS, make_diffusion

    ref = make_diffusion(CONFIGS["tiny"], 10)
    f32 = make_diffusion(CONFIGS["tiny"], 10, torch.device("mps"))  # built, never run on MPS
    assert "Apple MPS lacks float64: the diffusion schedule runs in float32" in (
        capsys.readouterr().err
    )
    assert ref.sqrt_alphas_cumprod.dtype == np.float64
    assert f32.sqrt_alphas_cumprod.dtype == np.float32
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = torch.tensor([9, 3])
    assert torch.allclose(ref.q_sample(x, t, noise), f32.q_sample(x, t, noise), atol=1e-5)
    assert make_diffusion(CONFIGS["tiny"], 10, torch.device("cpu")).betas.dtype == np.float64


_REUSE = """
import resource, sys, torch
from engine import devices
if sys.argv[1] == "keep":
    assert devices.keep_freed_host_memory()
def step():  # what a step does over and over: large temporaries, written, then freed
    x = torch.ones(2**26)  # 256 MB
    y = x * 2
    return float(y.sum())
for _ in range(12):  # the heap grows to its steady size over the first steps (8 here)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step(), step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
big = torch.ones(2**28)  # 1 GiB
del big
print(faults, devices.heap_free_bytes())
"""


@pytest.mark.skipif(devices._glibc() is None, reason="glibc's malloc only")
def test_freed_host_memory_is_kept_for_the_next_step_and_counted_as_free():
    """glibc gives each large freed block back, so the next step faults it in page by page again
    (65,536 pages of 4 KiB a 256 MB tensor); the engine keeps it, and counts it as free."""
    import subprocess
    import sys

    out = {
        mode: subprocess.run(
            [sys.executable, "-c", _REUSE, mode],
            capture_output=True, text=True, check=True, cwd=ENGINE.parent,
        ).stdout.split()
        for mode in ("default", "keep")
    }  # fmt: skip
    faults = {mode: int(v[0]) for mode, v in out.items()}
    assert faults["default"] > 4 * 60_000  # two tensors a step, two steps
    assert faults["keep"] < faults["default"] / 20
    assert int(out["keep"][1]) >= 2**30 > int(out["default"][1])
