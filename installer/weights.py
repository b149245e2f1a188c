"""The models, fetched, listed and removed by the engine's venv (`python -m engine.weights`),
which knows the per-user models folder, resumes a broken download and checks the disks' room
first."""

from __future__ import annotations

import subprocess
from pathlib import Path

from installer import ROOT
from installer.console import InstallError, run, say, shell_line, step, would

# The latent method's model (the one the engine picks by default when installed) and the pixel
# method's, the paper's; CLIP ViT-B/16 ranks every real model's results, so it always comes.
DEFAULT_MODELS = ("sd15", "adm256")
CLIP = "clip"


def weight_names(models: list[str] | None) -> list[str]:
    """What `--models` names (else the default), with CLIP."""
    return list(dict.fromkeys([*(models or DEFAULT_MODELS), CLIP]))


def _engine(python: Path, venv: Path, dry: bool) -> None:
    if not python.exists() and not dry:
        raise InstallError(
            f"no engine venv at {venv}: run `python install.py` first (or pass --venv DIR)"
        )


def fetch_weights(python: Path, venv: Path, models: list[str] | None, dry: bool) -> None:
    names = weight_names(models)
    step(f"weights: {', '.join(names)} into the per-user models folder")
    _engine(python, venv, dry)
    try:
        _weights_command(python, ["fetch", *names], "downloading the weights", dry)
    except InstallError as e:
        again = ["python", "install.py", "--weights-only", "--models", ",".join(names)]
        raise InstallError(
            f"{e}. `{shell_line(again)}` fetches what is missing; the rest is installed"
        ) from None


def list_models(python: Path, venv: Path) -> None:
    _engine(python, venv, dry=False)
    run([str(python), "-m", "engine.weights", "list"], "listing the models", cwd=ROOT)
    say(f"without --models: {', '.join(weight_names(None))}")


def remove_models(python: Path, venv: Path, names: list[str], dry: bool) -> None:
    step(f"removing {', '.join(names)} from the per-user models folder")
    _engine(python, venv, dry)
    _weights_command(python, ["remove", *names], "removing models", dry)


def _weights_command(python: Path, args: list[str], what: str, dry: bool) -> None:
    """`python -m engine.weights ARGS` in the engine's venv, or what it would run."""
    cmd = [str(python), "-m", "engine.weights", *args]
    if dry:
        would(dry, f"run {shell_line(cmd)}")
        return
    run(cmd, what, cwd=ROOT)


def models_dir(python: Path) -> str:
    if not python.exists():
        return "the per-user models folder (python -m engine.weights where)"
    cmd = [str(python), "-m", "engine.weights", "where"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() or "the per-user models folder"
