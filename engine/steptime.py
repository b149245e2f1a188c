"""The seconds a denoising step takes on this engine, measured on its own jobs.

The plug-ins estimate an edit's time from these before they send it (issue 16): a step's time
depends on the model, device and size (fixed for one engine) and on the guidance mode and the
batch (the job's variants), the keys kept here. The first step of a job is left out (it holds
the job's setup and warm-up); the latest job of a key replaces the earlier figure. The
refinement pass (engine/tiles.py) is timed apart, per tile: its steps cost as many UNet forwards
as the canvas has tiles, which the engine tells a job's client when it accepts it.

The figures outlive the engine in a small JSON file (`serve --step-times`, by default in the
per-user state folder), so a restarted engine announces them before its first job: a list of
{"key": engine_key(...), "step_seconds": to_json()}, one entry an engine key, of which an engine
reads and writes its own only.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from engine import devices
from engine.shared.estimate import REFINE

if TYPE_CHECKING:
    from engine.models import Models

FILE_NAME = "step-times.json"
LOCK_SECONDS = 10  # another engine holds the lock for milliseconds (the OS frees a dead one's)


def engine_key(models: Models) -> dict[str, Any]:
    """What a step's time depends on besides the job: the configuration and its canvas (about
    image_size² pixels whatever the selection's shape), the label of the weights loaded (the
    UNet's checkpoint unless the configuration's own, the CLIP's name and weights: hello's
    `models`), the device and the precision jobs run at. Asked where the models are loaded (a
    cluster's replica): the precision and threads are that machine's."""
    return {
        "model": models.config.name,
        "image_size": models.config.image_size,
        "models": models.label,
        "device": devices.identity(models.device),
        "precision": devices.resolve_precision("auto", models.device),
    }


class StepTimes:
    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        *,
        key: dict[str, Any] | None = None,
        path: Path | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        """`key`: the engine's (engine_key); `path`: the file its figures are kept in (None:
        kept in memory only)."""
        self._clock = clock
        self._lock = threading.Lock()  # the worker writes, the socket thread reads
        self._seconds: dict[tuple[str, int], float] = {}
        self.key, self.path, self._log = key, path, log
        # a job asking another precision than the engine's own steps at another pace
        self._precisions = {"auto", key["precision"]} if key else {"auto"}
        if path is not None:
            self._load()
        self._saved = self.to_json()

    def timer(
        self, mode: str, batch: int, steps: int | None = None, tiles: int = 0
    ) -> Callable[[int], None]:
        """A callback for each step done (`done` counts from 1); records the mean step after
        the first once a job has made two steps or more. After the base pass's `steps` (None:
        all of them), the refinement's steps, each `tiles` UNet forwards, are timed apart as
        REFINE: the seconds of one tile's step, from the base pass's last step on (a pass of
        one step has a figure too; the pass's setup is small beside its tiles)."""
        base: list[tuple[int, float]] = []
        fine: list[tuple[int, float]] = []

        def record(key: str, marks: list[tuple[int, float]], per: int) -> None:
            if len(marks) >= 2:
                (d0, t0), (d1, t1) = marks[0], marks[-1]
                with self._lock:
                    self._seconds[(key, batch)] = (t1 - t0) / (d1 - d0) / per

        def step(done: int) -> None:
            if steps is None or done <= steps:
                base.append((done, self._clock()))
                record(mode, base, 1)
            elif tiles:
                if not fine:  # the pass's first step counts from the base pass's last
                    fine.extend(base[-1:])
                fine.append((done, self._clock()))
                record(REFINE, fine, tiles)

        return step

    def for_job(self, settings: Any, tiles: int = 0) -> Callable[[int], None]:
        """`timer` for a job's settings (engine/shared/request.py): its guidance mode and its
        variants, its refinement's `tiles` a step; a no-op when it guides one step in N > 1,
        whose steps mix two paces (the plug-ins guide every step), or asks a precision other
        than the engine's (the key's). A refinement guided by CLIP is not timed (the plug-ins'
        is not)."""
        if settings.guidance_every != 1 or settings.precision not in self._precisions:
            return lambda done: None
        tiles = tiles if not settings.refine_guidance else 0
        steps = settings.steps_run
        return self.timer(settings.guidance_mode, settings.variants, steps, tiles)

    def to_json(self) -> dict[str, dict[str, float]]:
        """{"full": {"4": 1.25}, "fast": {...}, "refine": {...}}: seconds a step by mode and
        batch (REFINE's: a tile's step)."""
        with self._lock:
            out: dict[str, dict[str, float]] = {}
            for (mode, batch), seconds in sorted(self._seconds.items()):
                out.setdefault(mode, {})[str(batch)] = round(seconds, 4)
            return out

    # -- the file ------------------------------------------------------------------------------

    def _load(self) -> None:
        """This key's figures from the file; whatever is wrong with it, the engine starts
        without them and says why."""
        try:
            entry = next((e for e in _read(self.path) if e["key"] == self.key), None)
            if entry is not None:
                self._seconds = _parse(entry["step_seconds"])
        except FileNotFoundError:
            self._log(f"step times: none kept yet ({self.path})")
        except (OSError, ValueError) as e:
            self._log(f"step times: ignoring {self.path}: {e}")
        else:
            found = f"{len(self._seconds)} kept" if self._seconds else "none kept for this engine"
            self._log(f"step times: {found} ({self.path})")

    def save(self) -> None:
        """Write this key's figures if they changed since read or written (after a job): to a
        temporary file first, so a reader never sees half of one. Other keys' entries stay,
        also those another engine on the same file writes meanwhile: the read and the write
        hold a lock file beside it."""
        seconds = self.to_json()
        if self.path is None or seconds == self._saved:
            return
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(self.path.with_name(f"{self.path.name}.lock"), timeout=LOCK_SECONDS):
                try:
                    others = [e for e in _read(self.path) if e["key"] != self.key]
                except (OSError, ValueError):  # nothing there, or nothing worth keeping
                    others = []
                entries = [*others, {"key": self.key, "step_seconds": seconds}]
                tmp.write_text(json.dumps(entries, indent=1) + "\n")
                os.replace(tmp, self.path)
        except (OSError, Timeout) as e:
            tmp.unlink(missing_ok=True)
            self._log(f"step times: cannot write {self.path}: {e}")
            return
        self._saved = seconds


def _read(path: Path) -> list[dict[str, Any]]:
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and "key" in e and "step_seconds" in e for e in entries
    ):
        raise ValueError("not a list of {key, step_seconds} entries")
    return entries


def _parse(by_mode: Any) -> dict[tuple[str, int], float]:
    """to_json's form back: batches of 1 or more, each a positive number of seconds."""
    if not isinstance(by_mode, dict) or not all(isinstance(b, dict) for b in by_mode.values()):
        raise ValueError("step_seconds is not a table of modes, batches and seconds")
    out: dict[tuple[str, int], float] = {}
    for mode, by_batch in by_mode.items():
        for batch, seconds in by_batch.items():
            figure = f"step_seconds[{mode!r}][{batch!r}]"
            if not (str(batch).isdigit() and int(batch) >= 1):
                raise ValueError(f"{figure}: not a batch")
            if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"{figure}: not seconds ({seconds!r})")
            out[(mode, int(batch))] = float(seconds)
    return out
