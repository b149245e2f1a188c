"""The model weights, fetched by the engine's venv (`python -m engine.weights`), which knows
the per-user models folder and resumes a broken download."""

from __future__ import annotations

import subprocess
from pathlib import Path

from installer import ROOT
from installer.console import InstallError, run, shell_line, step, would


def fetch_weights(python: Path, venv: Path, with_512: bool, dry: bool) -> None:
    names = ["adm256", "clip"] + ["adm512"] * with_512
    step(f"weights: {', '.join(names)} into the per-user models folder")
    if not python.exists() and not dry:
        raise InstallError(
            f"no engine venv at {venv}: run `python install.py` first (or pass --venv DIR)"
        )
    cmd = [str(python), "-m", "engine.weights", "fetch", *names]
    if dry:
        would(dry, f"run {shell_line(cmd)}")
        return
    try:
        run(cmd, "downloading the weights", cwd=ROOT)
    except InstallError as e:
        raise InstallError(
            f"{e}. `python install.py --weights-only` resumes a broken download"
        ) from None


def models_dir(python: Path) -> str:
    if not python.exists():
        return "the per-user models folder (python -m engine.weights where)"
    cmd = [str(python), "-m", "engine.weights", "where"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() or "the per-user models folder"
