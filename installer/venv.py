"""The engine's venv: created with this Python, the project installed into it with pip in the
torch build the machine's GPU needs, then asked which device that torch drives."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from installer.console import InstallError, run, say, shell_line, step, would
from installer.layout import current_layout
from installer.torch_build import TorchPlan, find_gpus, plan_torch, torch_message, torch_pins

ENGINE_PYTHON = (3, 11)  # pyproject's requires-python


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install_engine(args: argparse.Namespace, python: Path) -> str | None:
    """The venv, torch and the project; returns the warning the installer ends with: a GPU the
    engine will not use."""
    create_venv(args.venv, python, args.dry_run)
    plan = choose_torch(args.device_kind, args.torch_index)
    extras = [e for e in ("dev", "cluster") if getattr(args, e)]
    install_project(python, args.source, extras, plan, args.dry_run)
    return report_device(python, plan, args.dry_run)


def create_venv(venv: Path, python: Path, dry: bool) -> None:
    step(f"engine: virtual environment {venv}")
    if python.exists():
        say(f"    {venv} exists: reusing it")
        return
    if sys.version_info < ENGINE_PYTHON:
        raise InstallError(
            f"the engine needs Python {'.'.join(map(str, ENGINE_PYTHON))} or newer and this "
            f"is {platform.python_version()}: run install.py with a newer python3 "
            "(or use --plugins-only for the plug-ins alone)"
        )
    would(dry, f"create it with {sys.executable} -m venv")
    if not dry:
        run([sys.executable, "-m", "venv", str(venv)], "creating the venv")


def choose_torch(kind: str, index: str | None) -> TorchPlan:
    step("engine: the torch build for this machine")
    plan = plan_torch(current_layout(), find_gpus(), kind, index)
    say(f"    {plan.why}")
    if plan.index:
        say(f"    from {plan.index}")
    return plan


def install_project(
    python: Path, source: Path, extras: list[str], plan: TorchPlan, dry: bool
) -> None:
    target = f"{source}[{','.join(extras)}]" if extras else str(source)
    cmd = [str(python), "-m", "pip", "install", "-e", target]
    if plan.label:  # pinned to the build: an installed torch of another build goes
        cmd += [f"{name}=={version}+{plan.label}" for name, version in torch_pins(source)]
    if plan.index:
        cmd += ["--extra-index-url", plan.index]
    step(f"engine: installing the project into the venv (pip install -e {target})")
    if dry:
        would(dry, f"run {shell_line(cmd)}")
        return
    try:
        run(cmd, "pip install")
    except InstallError as e:
        if not plan.label:
            raise
        raise InstallError(
            f"{e}. If pip found no torch +{plan.label} build there, pass the index that "
            "has it with --torch-index URL, or --device-kind cpu"
        ) from None


def report_device(python: Path, plan: TorchPlan, dry: bool) -> str | None:
    """Says what the installed torch drives; returns the warning of a GPU left unused."""
    step("engine: torch and the device")
    if dry:
        say("    which device torch can use is checked after the install")
        return plan.warning
    code = (
        "import json,torch;x=getattr(torch,'xpu',None);print(json.dumps({'cuda':torch.version"
        ".cuda,'hip':torch.version.hip,'xpu':getattr(torch.version,'xpu',None),'cuda_ok':torch"
        ".cuda.is_available(),'mps_ok':torch.backends.mps.is_available(),'xpu_ok':bool(x and "
        "x.is_available())}))"
    )
    r = run([str(python), "-c", code], "checking torch", stdout=subprocess.PIPE, text=True)
    seen = json.loads(r.stdout.strip().splitlines()[-1])  # errors stay visible
    message, warning = torch_message(plan, seen)
    say(f"    {message}")
    return warning
