"""install.py's choice of torch build, from faked probes: each platform x GPU x driver gives the
index it installs from, the reason it prints and the warning that ends its output."""

from __future__ import annotations

import pytest

from installer import ROOT, cli, layout, torch_build, venv
from installer.torch_build import Gpu, find_gpus, parse_nvidia, plan_torch, torch_message

WHL = "https://download.pytorch.org/whl"

RTX4090_130 = Gpu("nvidia", "RTX 4090", (13, 0), (8, 9), "nvidia-smi")
RTX4090_132 = Gpu("nvidia", "RTX 4090", (13, 2), (8, 9), "nvidia-smi")
RTX3060_124 = Gpu("nvidia", "RTX 3060", (12, 4), (8, 6), "nvidia-smi")
RTX3060_118 = Gpu("nvidia", "RTX 3060", (11, 8), (8, 6), "nvidia-smi")
GTX1080_130 = Gpu("nvidia", "GTX 1080", (13, 0), (6, 1), "nvidia-smi")
K80 = Gpu("nvidia", "Tesla K80", (11, 4), (3, 7), "nvidia-smi")
NO_DRIVER = Gpu("nvidia", "NVIDIA Corporation AD102 [GeForce RTX 4090]", found_by="lspci")
RADEON = Gpu("amd", "Radeon RX 7900 XTX (gfx1100)", found_by="rocminfo")
RADEON_WIN = Gpu("amd", "AMD Radeon RX 7800 XT", found_by="Windows")
ARC = Gpu("intel", "Intel(R) Arc(TM) A770 Graphics", found_by="Windows")
APPLE = Gpu("apple", "Apple Silicon GPU (MPS)", found_by="arm64")

# (system, GPUs, index it installs from (None: PyPI's build), words of the reason, of the warning)
MATRIX = [
    ("linux", [RTX4090_130], f"{WHL}/cu130", "CUDA 13.0 build", None),
    ("windows", [RTX4090_130], f"{WHL}/cu130", "CUDA 13.0 build", None),
    ("windows", [RTX4090_132], f"{WHL}/cu130", "CUDA 13.0 build", None),
    ("linux", [RTX3060_124], f"{WHL}/cu126", "CUDA 12.6 build", None),
    ("windows", [RTX3060_124], f"{WHL}/cu126", "CUDA 12.6 build", None),
    ("windows", [RTX3060_118], None, "driver is too old", "update the NVIDIA driver"),
    ("linux", [GTX1080_130], f"{WHL}/cu126", "dropped GPUs older than Turing", None),
    ("windows", [GTX1080_130], f"{WHL}/cu126", "CUDA 12.6 build", None),
    ("linux", [K80], None, "too old for any torch 2.14 build", "older than torch supports"),
    ("linux", [NO_DRIVER], f"{WHL}/cu130", "install NVIDIA's driver", None),
    ("macos", [RTX4090_130], None, "CUDA does not exist on macOS", "not usable"),
    ("linux", [RADEON], f"{WHL}/rocm7.2", "ROCm build", None),
    ("windows", [RADEON_WIN], None, "ROCm for Linux only", "the engine will run on the CPU"),
    ("linux", [ARC], f"{WHL}/xpu", "XPU build", None),
    ("windows", [ARC], f"{WHL}/xpu", "XPU build", None),
    ("macos", [APPLE], None, "it runs MPS", None),
    ("linux", [RTX4090_130, ARC], f"{WHL}/cu130", "RTX 4090", None),  # the strongest first
    ("linux", [], None, "no GPU found", None),
    ("windows", [], None, "no GPU found", None),
    ("macos", [], None, "no GPU found", None),
]


@pytest.mark.parametrize("system, gpus, index, why, warning", MATRIX)
def test_the_plan_for_each_platform_gpu_and_driver(system, gpus, index, why, warning):
    machine = "arm64" if system == "macos" else "x86_64"
    plan = plan_torch(system, gpus, machine=machine)
    assert plan.index == index
    assert plan.label == (index.rsplit("/", 1)[1] if index else None)
    assert why in plan.why, plan.why
    if warning is None:
        assert plan.warning is None
    else:
        assert warning in plan.warning
    assert (plan.kind == "cpu") == (index is None and "MPS" not in why)


def test_overrides_win_over_the_probes():
    told = plan_torch("windows", [], "nvidia", machine="amd64")
    assert told.index == f"{WHL}/cu130" and "as told" in told.why
    assert plan_torch("linux", [], "intel").index == f"{WHL}/xpu"
    assert plan_torch("linux", [], "amd").label == "rocm7.2"
    cpu = plan_torch("linux", [RTX4090_130], "cpu")
    assert cpu.index == f"{WHL}/cpu" and "left unused" in cpu.warning
    assert plan_torch("macos", [], "cpu", machine="arm64").index is None  # PyPI's is it
    rosetta = plan_torch("macos", [APPLE], machine="x86_64")
    assert "Rosetta" in rosetta.warning
    custom = plan_torch("linux", [RADEON], index="https://example.org/simple")
    assert (custom.kind, custom.index, custom.label) == ("amd", "https://example.org/simple", None)
    named = plan_torch("linux", [], index=f"{WHL}/cu126/")
    assert (named.kind, named.label) == ("nvidia", "cu126")


NVIDIA_SMI = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: 13.0     |
|-----------------------------------------+------------------------+----------------------+
"""
ROCMINFO = """\
Agent 1
  Name:                    AMD Ryzen 9 7950X 16-Core Processor
  Marketing Name:          AMD Ryzen 9 7950X 16-Core Processor
  Device Type:             CPU
Agent 2
  Name:                    gfx1100
  Marketing Name:          Radeon RX 7900 XTX
  Device Type:             GPU
"""
LSPCI = """\
00:02.0 VGA compatible controller: Intel Corporation Raptor Lake-S GT1 [UHD Graphics 770]
03:00.0 VGA compatible controller: Intel Corporation DG2 [Arc A770] (rev 08)
01:00.0 Audio device: NVIDIA Corporation AD102 High Definition Audio Controller
"""


def fake_probes(monkeypatch, outputs: dict[str, str]):
    monkeypatch.setattr(torch_build, "_probe", lambda cmd, timeout=30: outputs.get(" ".join(cmd)))


def test_probes_are_read_on_each_system(monkeypatch):
    query = "nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader"
    fake_probes(monkeypatch, {"nvidia-smi": NVIDIA_SMI, query: "NVIDIA GeForce RTX 4090, 8.9\n"})
    assert find_gpus("linux") == [
        Gpu("nvidia", "NVIDIA GeForce RTX 4090", (13, 0), (8, 9), "nvidia-smi")
    ]
    fake_probes(monkeypatch, {"rocminfo": ROCMINFO, "lspci": LSPCI})
    assert [(g.vendor, g.name) for g in find_gpus("linux")] == [
        ("amd", "Radeon RX 7900 XTX (gfx1100)"),
        ("intel", "03:00.0 VGA compatible controller: Intel Corporation DG2 [Arc A770] (rev 08)"),
    ]  # the UHD integrated graphics and the NVIDIA audio device are no GPUs to drive
    fake_probes(monkeypatch, {"amd-smi list": "GPU: 0\n    BDF: 0000:03:00.0\n"})
    assert [g.found_by for g in find_gpus("linux")] == ["amd-smi"]
    names = "(Get-CimInstance Win32_VideoController).Name"
    fake_probes(
        monkeypatch,
        {f"powershell -NoProfile -Command {names}": "NVIDIA GeForce RTX 3060\r\nIntel(R) UHD\r\n"},
    )
    assert [(g.vendor, g.found_by) for g in find_gpus("windows")] == [
        ("nvidia", "Windows")  # no nvidia-smi: a card without its driver
    ]
    fake_probes(monkeypatch, {})
    assert find_gpus("linux") == [] and find_gpus("windows") == []
    monkeypatch.setattr(torch_build, "apple_silicon", lambda: True)
    assert [g.vendor for g in find_gpus("macos")] == ["apple"]


def test_an_old_driver_without_compute_cap_still_names_the_gpu():
    gpus = parse_nvidia(NVIDIA_SMI.replace("13.0", "12.2"), "Quadro P4000\n")
    assert gpus == [Gpu("nvidia", "Quadro P4000", (12, 2), None, "nvidia-smi")]
    assert plan_torch("linux", gpus).index == f"{WHL}/cu126"


SEEN_CPU = {"cuda": None, "hip": None, "xpu": None}


@pytest.mark.parametrize(
    "plan_gpu, seen, message, warns",
    [
        (None, {"cuda": "13.0"}, "no GPU found: the engine will run on the CPU", False),
        (RTX4090_130, {"cuda": "13.0", "cuda_ok": True}, "CUDA 13.0 build will use the GPU", False),
        (RTX4090_130, SEEN_CPU, "this torch is a CPU-only build, not the one planned", True),
        (RTX4090_130, {"cuda": "13.0"}, "cannot use it (driver missing or too old?)", True),
        (RADEON, {"cuda": "13.0"}, "this torch is a CUDA 13.0 build, not the one planned", True),
        (RADEON, {"hip": "7.2", "cuda_ok": True}, "ROCm 7.2 build will use the GPU", False),
        (ARC, {"xpu": "20250101", "xpu_ok": True}, "will use the GPU (XPU)", False),
        (APPLE, {"mps_ok": True}, "will use the GPU (MPS)", False),
        (RADEON_WIN, SEEN_CPU, "the engine will run on the CPU", True),
    ],
)
def test_after_the_install_a_gpu_left_unused_is_said(plan_gpu, seen, message, warns):
    system = "windows" if plan_gpu is RADEON_WIN else "macos" if plan_gpu is APPLE else "linux"
    plan = plan_torch(system, [plan_gpu] if plan_gpu else [], machine="arm64")
    text, warning = torch_message(plan, seen)
    assert message in text, text
    assert bool(warning) == warns
    if warns and plan.kind != "cpu":
        assert f"python install.py --device-kind {plan.kind}" in warning


def run_dry(monkeypatch, capsys, tmp_path, gpus, system="linux", *args):
    monkeypatch.setattr(venv, "find_gpus", lambda: gpus)
    monkeypatch.setattr(venv, "current_layout", lambda: system)
    argv = ["--dry-run", "--dev", "--no-weights", "--no-krita", "--no-gimp"]
    argv += ["--venv", str(tmp_path / "venv"), *args]
    assert cli.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_the_dry_run_prints_the_choice_and_its_pip_command(monkeypatch, capsys, tmp_path):
    out = run_dry(monkeypatch, capsys, tmp_path, [RTX3060_124], "windows")
    assert any("RTX 3060" in line and "CUDA 12.6 build" in line for line in out)
    pip = next(line for line in out if "would run" in line)
    assert "torch==2.14.1+cu126 torchvision==0.29.1+cu126" in pip
    assert pip.endswith(f"--extra-index-url {WHL}/cu126")


def test_a_gpu_the_engine_will_not_use_is_the_last_thing_said(monkeypatch, capsys, tmp_path):
    out = run_dry(monkeypatch, capsys, tmp_path, [RADEON_WIN], "windows")
    assert out[-1].startswith("    warning: AMD Radeon RX 7800 XT") and "CPU" in out[-1]


def test_without_a_gpu_the_command_is_the_plain_one(monkeypatch, capsys, tmp_path):
    """This machine's case, and CI's: pip installs the project as before, from PyPI alone."""
    out = run_dry(monkeypatch, capsys, tmp_path, [])
    pip = next(line for line in out if "would run" in line)
    python = tmp_path / "venv" / "bin" / "python"
    assert pip == f"    would run {python} -m pip install -e '{ROOT}[dev]'"
    assert "no GPU found" in "\n".join(out) and "warning" not in out[-1]


def test_cluster_adds_ray_serve_to_the_project_install(monkeypatch, capsys, tmp_path):
    out = run_dry(monkeypatch, capsys, tmp_path, [], "linux", "--cluster")
    pip = next(line for line in out if "would run" in line)
    assert pip.endswith(f"-m pip install -e '{ROOT}[dev,cluster]'")


def test_this_machine_gets_the_plan_it_had():
    if find_gpus():
        pytest.skip("this machine has a GPU")
    plan = plan_torch(layout.current_layout(), find_gpus())
    assert (plan.index, plan.label, plan.warning) == (None, None, None)


def test_doctor_names_a_gpu_the_engine_cannot_use_and_the_fix(monkeypatch, capsys):
    from engine import devices, doctor

    monkeypatch.setattr(torch_build, "find_gpus", lambda system=None: [RTX3060_124])
    monkeypatch.setattr(layout, "current_layout", lambda: "windows")
    monkeypatch.setattr(devices, "available", lambda kind: kind == "cpu")
    report = doctor.Report()
    doctor.device(report)
    out = capsys.readouterr().out
    assert report.problems == 1
    assert "RTX 3060 (driver runs CUDA 12.4" in out
    assert "the engine cannot use it; fix with `python install.py --device-kind nvidia`" in out
    assert "  device           CPU (torch " in out
