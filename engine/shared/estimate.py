"""How long an edit takes: before a run from the step times the engine measured (its `hello`
says them: seconds a step by guidance mode and batch, for its model, device and size, and of a
tile's step in the refinement pass, whose tiles a step the engine says when it accepts the
edit), during a run from the steps seen so far."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.shared import request

REFINE = "refine"  # engine/steptime.py's figure of the refinement pass: a tile's step


def step_seconds(info: Mapping[str, Any], mode: str, variants: int) -> float | None:
    """Seconds a step for `variants` in `mode`: the engine's measurement at that batch, else at
    the nearest batch it measured, scaled per variant. None before it measured any."""
    measured = (info.get("step_seconds") or {}).get(mode) or {}
    batches = {int(b): float(s) for b, s in measured.items()}
    if not batches:
        return None
    nearest = min(batches, key=lambda b: (abs(b - variants), b))
    return batches[nearest] * variants / nearest


@dataclass(frozen=True)
class Plan:
    """An edit's steps and what they should take: the base pass's `steps`, then, where the
    engine refines, `refine_steps` of `tiles` UNet forwards each; seconds for all variants."""

    variants: int
    steps: int
    refine_steps: int = 0
    tiles: int = 0
    step_s: float | None = None
    refine_step_s: float | None = None

    @property
    def seconds(self) -> float | None:
        """The whole edit; None when a pass's step time is not known."""
        if self.step_s is None or (self.refine_steps and self.refine_step_s is None):
            return None
        return self.step_s * self.steps + (self.refine_step_s or 0.0) * self.refine_steps

    @property
    def ratio(self) -> float:
        """A refinement step's time in base steps: as measured, else its tiles (a tile is one
        UNet forward, a base step at least one)."""
        if self.step_s and self.refine_step_s:
            return self.refine_step_s / self.step_s
        return float(max(self.tiles, 1))


def plan(
    info: Mapping[str, Any], settings: Mapping[str, Any], total: int = 0, tiles: int = 0
) -> Plan:
    """The edit `settings` (the protocol's) on this engine. `total`, `tiles`: the engine's
    `accepted` (all the steps; the refinement's tiles a step, 0: no refinement), not known
    before it is sent. The engine's method (hello's) gives the settings it leaves out their
    defaults (the latent method's steps are its scheduler's)."""
    checked = request.check(settings, method=info.get("method"))
    mode, variants, steps = checked.guidance_mode, checked.variants, checked.steps_run
    refine = max(total - steps, 0) if tiles else 0
    per_tile = step_seconds(info, REFINE, variants)
    if per_tile is None:  # no pass measured yet: a fast step is one UNet forward (and CLIP's)
        per_tile = step_seconds(info, "fast", variants)
    refine_s = per_tile * tiles if refine and per_tile is not None else None
    return Plan(variants, steps, refine, tiles if refine else 0, step_seconds(info, mode, variants),
                refine_s)  # fmt: skip


class Clock:
    """Time left during a run: the engine's estimate until two steps were seen, then the pace
    of the steps themselves (this run's size and load); the refinement's steps at their own
    pace once two of them were seen, at the estimate's ratio to the base pass's until then."""

    def __init__(self, plan: Plan | None, now=time.monotonic) -> None:
        self.plan, self._now = plan, now
        self._first: tuple[float, int] | None = None  # (time, step) the pace counts from
        self.start = now()

    def left(self, step: int, total: int) -> float | None:
        now, plan = self._now(), self.plan
        ratio = plan.ratio if plan else 1.0
        fine_from = plan.steps if plan and plan.refine_steps else total  # the last base step
        if self._first is None:
            self._first = (now, step)
        t0, s0 = self._first
        pace = (now - t0) / (step - s0) if step > s0 and now > t0 else None
        if step >= fine_from > s0:  # the refinement's pace is its own: counted from its start
            self._first = (now, step)
            if pace is not None:
                return pace * ratio * (total - step)
        elif pace is not None:
            if step >= fine_from:
                return pace * (total - step)
            return pace * ((fine_from - step) + ratio * (total - fine_from))
        if plan is None or plan.seconds is None:
            return None
        return max(plan.seconds - (now - self.start), 0.0)


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
