"""What the installer says, and the commands it runs: a failure is an InstallError whose message
says why and what to do, never a traceback."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys


class InstallError(Exception):
    """A step that cannot go on: the message says why and what to do."""


def say(text: str) -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"==> {title}")


def would(dry: bool, text: str) -> None:
    """An action, said as done or, in a dry run, as what would be done."""
    say(f"    {'would ' if dry else ''}{text}")


def warn(text: str) -> None:
    print(f"    warning: {text}", file=sys.stderr, flush=True)


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
