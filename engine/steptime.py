"""The seconds a denoising step takes on this engine, measured on its own jobs.

The plug-ins estimate an edit's time from these before they send it (issue 16): a step's time
depends on the model, device and size (fixed for one engine) and on the guidance mode and the
batch (the job's variants), the keys kept here. The first step of a job is left out (it holds
the job's setup and warm-up); the latest job of a key replaces the earlier figure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class StepTimes:
    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # the worker writes, the socket thread reads
        self._seconds: dict[tuple[str, int], float] = {}

    def timer(self, mode: str, batch: int) -> Callable[[int], None]:
        """A callback for each step done (`done` counts from 1); records the mean step after
        the first once a job has made two steps or more."""
        marks: list[tuple[int, float]] = []

        def step(done: int) -> None:
            marks.append((done, self._clock()))
            if len(marks) >= 2:
                (d0, t0), (d1, t1) = marks[0], marks[-1]
                with self._lock:
                    self._seconds[(mode, batch)] = (t1 - t0) / (d1 - d0)

        return step

    def for_job(self, settings: Any) -> Callable[[int], None]:
        """`timer` for a job's settings (engine.edit.EditSettings): its guidance mode and its
        variants; a no-op when it guides one step in N > 1, whose steps mix two paces (the
        plug-ins guide every step)."""
        if settings.guidance_every != 1:
            return lambda done: None
        return self.timer(settings.guidance_mode, settings.variants)

    def to_json(self) -> dict[str, dict[str, float]]:
        """{"full": {"4": 1.25}, "fast": {...}}: seconds a step by mode and batch."""
        with self._lock:
            out: dict[str, dict[str, float]] = {}
            for (mode, batch), seconds in sorted(self._seconds.items()):
                out.setdefault(mode, {})[str(batch)] = round(seconds, 4)
            return out
