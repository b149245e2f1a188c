"""`python -m tests.recording_engine serve ...`: the real engine, which also keeps what each job
it ran received, for the real-host tests to check what a plug-in sent (the visible picture of the
artist's document), not only what came back; and which holds a job mid-run when a test asks, so
the test acts while the job surely runs (grabs the screen, presses Cancel, kills the plug-in)
rather than racing its end.

BD_RECEIVED=DIR: for job N, DIR/N-image.npy (HxWx4 RGBA as the engine decoded it), DIR/N-mask.npy
and a line in DIR/jobs.jsonl (N, prompt, settings). While DIR/hold names a prompt (`holding`),
each job of that prompt stops right after each progress that carried previews, adds a line to
DIR/held (`holds` counts them) and goes on once DIR/release holds that count (a test inside a
host writes it: tests/krita_driver/), DIR/hold is gone (`stop_holding`), or the job is cancelled
(its client cancelled it or went away).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine import __main__ as cli
from engine.serve import runner

HOLD, HELD, RELEASE = "hold", "held", "release"
HOLD_LIMIT = 300.0  # seconds a job is held at most: a test that died never wedges the engine
count = itertools.count()


def received(folder: Path, prompt: str) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """(image, mask, settings) of every job run with `prompt`, in order."""
    path = folder / "jobs.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    return [
        (np.load(folder / f"{j['n']}-image.npy"), np.load(folder / f"{j['n']}-mask.npy"),
         j["settings"])
        for j in lines
        if j["prompt"] == prompt
    ]  # fmt: skip


@contextlib.contextmanager
def holding(folder: Path, prompt: str) -> Iterator[None]:
    """The engine recording into `folder` holds each job of `prompt` after each progress with
    previews while the block runs (until `stop_holding`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (HELD, RELEASE):
        (folder / name).unlink(missing_ok=True)
    (folder / HOLD).write_text(prompt)
    try:
        yield
    finally:
        for name in (HOLD, HELD, RELEASE):
            (folder / name).unlink(missing_ok=True)


def holds(folder: Path) -> int:
    """The holds so far: each came right after a progress with previews."""
    path = folder / HELD
    return len(path.read_text().splitlines()) if path.is_file() else 0


def stop_holding(folder: Path) -> None:
    """The held job goes on, and no job is held again."""
    (folder / HOLD).unlink(missing_ok=True)


def _released(folder: Path) -> int:
    try:
        return int((folder / RELEASE).read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return 0


def _record(folder: Path, job) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = next(count)
    np.save(folder / f"{n}-image.npy", job.image)
    np.save(folder / f"{n}-mask.npy", job.mask)
    settings = job.settings
    asked = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings
    with open(folder / "jobs.jsonl", "a") as f:
        f.write(json.dumps({"n": n, "prompt": job.prompt, "settings": asked}) + "\n")


def _hold(folder: Path, job) -> None:
    with open(folder / HELD, "a") as f:
        f.write(job.prompt + "\n")
    n, deadline = holds(folder), time.monotonic() + HOLD_LIMIT
    while (folder / HOLD).is_file() and _released(folder) < n and not job.cancel.is_set():
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)  # the engine's worker thread: its socket thread answers meanwhile


def recording_run(self, job, progress):
    """Runner.run, recording the job's inputs and holding it after its progress with previews
    while a test asks."""
    folder = Path(os.environ["BD_RECEIVED"])
    _record(folder, job)
    hold = folder / HOLD

    def sent(message: list) -> None:
        progress(message)
        asked = hold.is_file() and hold.read_text() == job.prompt
        if asked and "previews" in json.loads(bytes(message[0])):
            _hold(folder, job)

    return real_run(self, job, sent)


real_run = runner.Runner.run

if __name__ == "__main__":
    runner.Runner.run = recording_run  # where the engine runs every job it accepted
    sys.exit(cli.main())
