"""How long an edit takes: before a run from the step times the engine measured (its `hello`
says them: seconds a step by guidance mode and batch, for its model, device and size), during
a run from the steps seen so far."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any


def step_seconds(info: Mapping[str, Any], mode: str, variants: int) -> float | None:
    """Seconds a step for `variants` in `mode`: the engine's measurement at that batch, else at
    the nearest batch it measured, scaled per variant. None before it measured any."""
    measured = (info.get("step_seconds") or {}).get(mode) or {}
    batches = {int(b): float(s) for b, s in measured.items()}
    if not batches:
        return None
    nearest = min(batches, key=lambda b: (abs(b - variants), b))
    return batches[nearest] * variants / nearest


def before(info: Mapping[str, Any], settings: Mapping[str, Any]) -> float | None:
    """Seconds the edit `settings` (the protocol's) should take on this engine, or None."""
    mode, variants = settings.get("guidance_mode", "full"), settings.get("variants", 4)
    per_step = step_seconds(info, mode, variants)
    if per_step is None:
        return None
    return per_step * (settings["steps"] - settings.get("skip", 0))


class Clock:
    """Time left during a run: the engine's estimate until two steps were seen, then the pace
    of the steps themselves (this run's size and load)."""

    def __init__(self, estimate: float | None, now=time.monotonic) -> None:
        self.estimate, self._now = estimate, now
        self._first: tuple[float, int] | None = None  # (time, step) of the first progress
        self.start = now()

    def left(self, step: int, total: int) -> float | None:
        now = self._now()
        if self._first is None:
            self._first = (now, step)
        t0, s0 = self._first
        if step > s0 and now > t0:
            return (now - t0) / (step - s0) * (total - step)
        if self.estimate is None:
            return None
        return max(self.estimate - (now - self.start), 0.0)


def duration(seconds: float | None) -> str:
    """'about 40 s', 'about 3 min', 'about 2 h 10 min'; '' when unknown."""
    if seconds is None:
        return ""
    if seconds < 90:
        return f"about {max(round(seconds), 1)} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"about {minutes} min"
    return f"about {minutes // 60} h {minutes % 60:02d} min"
