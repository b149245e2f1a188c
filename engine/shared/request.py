"""The request schema: every edit setting once, with its type, default, range and unit, and the
figures derived from them. The plug-ins, the client, the server, the cluster and the command line
all check a request with `check`; an error names the setting and its range.

Standard library only: it is shipped inside both plug-ins (their hosts' Python has no numpy).
A range's upper end may be capped lower by the engine's limit named in `limit` (`hello`'s
`limits`, engine/shared/protocol.py `Limits`): the schema's own bound is what any engine may
allow, the limit what this one does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Any

SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Field:
    name: str
    kind: type  # int, float, bool or str
    default: Any
    help: str
    low: float | None = None  # None: not a number
    high: float | None = None
    unit: str = ""
    choices: tuple[str, ...] = ()
    optional: bool = False  # None allowed (and the default): the help says what None means
    limit: str = ""  # the engine's limit (`Limits` field) that may cap `high`
    wire: bool = True  # False: the engine's own option (the command line), not a client's
    zero_or_from: float | None = None  # 0, or at least this (a cap whose 0 means none)
    methods: tuple[str, ...] = ("pixel", "latent")  # the methods that take it (METHODS)

    def range_text(self, high: float | None = None) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return f"text of at most {self.high:g} characters"
        hi = self.high if high is None else high
        unit = f" {self.unit}" if self.unit else ""
        if self.zero_or_from is not None:
            return f"0 or {self.zero_or_from:g} to {hi:g}{unit}"
        return f"{self.low:g} to {hi:g}{unit}"


PIXEL, LATENT = "pixel", "latent"
METHODS = (PIXEL, LATENT)  # engine/methods: Blended Diffusion, Blended Latent Diffusion
SCHEDULERS = ("dpmpp_2m_karras", "ddim", "lcm")  # the latent method's
# each scheduler's default steps and guidance: DDIM's are the paper's; DPM++ 2M reaches DDIM-50's
# quality in about half the steps; LCM (an LCM checkpoint or LoRA) in 4-8, with guidance 1 (its
# guidance is distilled into the weights: no unconditional half, so no negative prompt)
SCHEDULER_STEPS = {"dpmpp_2m_karras": 25, "ddim": 50, "lcm": 6}
SCHEDULER_GUIDANCE = {"dpmpp_2m_karras": 7.5, "ddim": 7.5, "lcm": 1.0}
_PX, _LT = (PIXEL,), (LATENT,)

# fmt: off
FIELDS: tuple[Field, ...] = (
    Field("variants", int, 4, "results made, one layer each", 1, 64, limit="max_variants"),
    Field("seed", int, None, "variant i's noise is seed + i; None: a random seed, reported back",
          0, SEED_MAX, optional=True),
    # guided_diffusion's schedule needs two timesteps (its posterior variance reads t = 1)
    Field("steps", int, 100, "denoising steps of the whole schedule (the latent method's "
          "default: its scheduler's)", 2, 1000, limit="max_steps"),
    Field("strength", int, 75, "how much of the selection may change: the share of the "
          "schedule that runs (the papers' 75%)", 1, 100, unit="%"),
    Field("skip", int, None, "the pixel method's own start: steps left out at the beginning "
          "(the official code's name), over strength; None: from strength", 0, 999,
          optional=True, methods=_PX),
    Field("guidance_weight", float, None, "lambda_clip, CLIP's pull towards the prompt; "
          "None: the model's default for the guidance mode", 0, 1e6, optional=True,
          methods=_PX),
    Field("range_weight", float, 50.0, "the range loss keeping the estimate in [-1, 1]", 0, 1e6,
          methods=_PX),
    Field("augmentations", int, 8, "augmented copies CLIP judges each step", 1, 64,
          limit="max_augmentations", methods=_PX),
    Field("sampler", str, "ddpm", "the sampler", choices=("ddpm", "ddim"), methods=_PX),
    Field("guidance_mode", str, "full", "full: CLIP's gradient through the UNet; fast: without",
          choices=("full", "fast"), methods=_PX),
    Field("guidance_every", int, 1, "guide one step in N: faster, further from the paper", 1, 100,
          methods=_PX),
    Field("scheduler", str, SCHEDULERS[0], "the scheduler (lcm needs an LCM checkpoint or "
          "LoRA)", choices=SCHEDULERS, methods=_LT),
    Field("guidance", float, None, "classifier-free guidance scale (1: none, the negative "
          "prompt unused); None: the scheduler's (7.5, LCM 1)", 0, 30, optional=True,
          methods=_LT),
    Field("negative_prompt", str, "", "what the edit should not show", high=500, methods=_LT),
    Field("mask_shrink", int, None, "progressive mask shrinking: the latent mask starts grown by "
          "this many cells and shrinks to the selection; None: 2 for a selection with parts "
          "thinner than a latent cell, else 0", 0, 8, optional=True, methods=_LT),
    Field("padding", float, 0.25, "context on each side, as a fraction of the selection", 0, 4),
    Field("grow", int, 0, "pixels the selection grows by before the edit", 0, 1000, unit="px"),
    Field("feather", int, 0, "pixels of feathering added to a hard selection's edge", 0, 1000,
          unit="px"),
    Field("refine", bool, True, "refine a selection larger than the model's canvas at its own "
          "resolution, over tiles of the model's size", methods=_PX),
    Field("refine_strength", float, 0.1, "the share of the schedule the refinement runs again",
          0.01, 1, methods=_PX),
    Field("refine_overlap", float, 0.5, "the share of a tile's side neighbours share", 0, 0.75,
          methods=_PX),
    Field("refine_cap", float, None, "the refinement canvas's largest side in model sides, 0 for "
          "the image's own scale; None: as large as keeps the pass's work within the base "
          "edit's", 0, 16, optional=True, zero_or_from=1, methods=_PX),
    Field("refine_guidance", float, 0.0, "CLIP's pull in the refinement, as a share of the "
          "edit's (fast mode)", 0, 10, methods=_PX),
    Field("precision", str, "auto", "the device's number format (auto: what it computes "
          "natively)", choices=("auto", "fp32", "bf16", "fp16"), wire=False),
    Field("recompute", str, "auto", "drop UNet activations and recompute them when memory is "
          "short", choices=("auto", "on", "off"), wire=False, methods=_PX),
    # 1 makes a variant's seed reproduce it alone; costs nothing on a CPU (one fills its cores)
    Field("batch", int, 1, "variants through the models together", 1, 64, wire=False),
)
# fmt: on
BY_NAME = {f.name: f for f in FIELDS}
WIRE = tuple(f.name for f in FIELDS if f.wire)


def taken_by(method: str, wire: bool = True) -> tuple[str, ...]:
    """The settings `method` takes (hello's `settings`: what a plug-in shows and sends)."""
    return tuple(f.name for f in FIELDS if method in f.methods and (f.wire or not wire))


def skip_for(steps: int, strength: int) -> int:
    """The pixel method's start for a strength in %: the steps left out (at least 1 runs)."""
    return min(max(steps - round(steps * strength / 100), 0), steps - 1)


class _Derived:
    """The figures every reader of a request computes the same way."""

    steps: int
    strength: int
    skip: int | None
    refine_strength: float
    scheduler: str
    guidance: float | None

    @property
    def start(self) -> int:
        """The steps left out at the beginning: `skip` where given, else from `strength`."""
        return self.skip if self.skip is not None else skip_for(self.steps, self.strength)

    @property
    def steps_run(self) -> int:
        if self.scheduler == "lcm":  # LCM spreads all its steps over the strength's share
            return self.steps
        return self.steps - self.start

    @property
    def refine_steps(self) -> int:
        return max(1, round(self.refine_strength * self.steps))

    def total_steps(self, refines: bool) -> int:
        """The job's steps, the refinement pass's included when it runs (progress' `total`)."""
        return self.steps_run + (self.refine_steps if refines else 0)

    @property
    def guidance_scale(self) -> float:
        """The latent method's classifier-free guidance: `guidance`, else its scheduler's."""
        return self.guidance if self.guidance is not None else SCHEDULER_GUIDANCE[self.scheduler]

    def wire(self, method: str | None = None) -> dict[str, Any]:
        """The settings a client sends: those not at their default (the engine's own options
        never), and only those `method` takes when it is given (hello's)."""
        return {
            f.name: getattr(self, f.name)
            for f in FIELDS
            if f.wire
            and getattr(self, f.name) != f.default
            and (method is None or method in f.methods)
        }


# one field a setting, from FIELDS: a new setting is added there alone
Settings = make_dataclass(
    "Settings",
    [(f.name, f.kind | None if f.optional else f.kind, field(default=f.default)) for f in FIELDS],
    bases=(_Derived,),
)
Settings.__doc__ = "One edit's settings, checked (`check`); defaults from FIELDS."


class SettingError(ValueError):
    """A setting out of its type or range: `name` names it, `limit` says an engine's limit
    (not the schema's own range) refused it."""

    def __init__(self, name: str, message: str, limit: bool = False) -> None:
        super().__init__(message)
        self.name, self.limit = name, limit


def high_for(f: Field, caps: Mapping[str, Any] | None) -> float | None:
    """`f`'s upper bound under an engine's `caps` (its limits): the lower of the two."""
    cap = (caps or {}).get(f.limit) if f.limit else None
    if isinstance(cap, int) and not isinstance(cap, bool) and f.high is not None:
        return min(f.high, cap)
    return f.high


def _value(f: Field, value: Any, caps: Mapping[str, Any] | None) -> Any:
    if value is None and f.optional:
        return None
    name = f"settings.{f.name}"
    if f.kind is str and not f.choices:
        if not isinstance(value, str) or len(value) > f.high:
            raise SettingError(f.name, f"{name} must be {f.range_text()}, got {value!r:.40}")
        return value
    if f.kind is bool or f.choices:
        ok = isinstance(value, bool) if f.kind is bool else value in f.choices
        if not ok or (f.choices and not isinstance(value, str)):
            raise SettingError(f.name, f"{name} must be {f.range_text()}, got {value!r:.40}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingError(f.name, f"{name} must be a number, {f.range_text()}, got {value!r:.40}")
    if f.kind is int and not isinstance(value, int):
        raise SettingError(f.name, f"{name} must be an integer, {f.range_text()}, got {value!r}")
    if not math.isfinite(value):
        raise SettingError(f.name, f"{name} must be finite, {f.range_text()}, got {value}")
    high = high_for(f, caps)
    if f.zero_or_from is not None and 0 < value < f.zero_or_from:
        raise SettingError(f.name, f"{name} must be {f.range_text()}, got {value:g}")
    if not f.low <= value <= high:
        over = bool(f.limit)  # a setting an engine limits (its code: `limit`)
        where = " (this engine's limit)" if high != f.high and value > high else ""
        raise SettingError(
            f.name, f"{name} must be {f.range_text(high)}{where}, got {value:g}", over
        )
    return f.kind(value)


def check(
    values: Mapping[str, Any],
    caps: Mapping[str, Any] | None = None,
    wire: bool = False,
    method: str | None = None,
) -> Settings:
    """The settings in `values` (absent ones their defaults), each checked against its range
    (capped by the engine's `caps`) and against each other; raises SettingError. `wire`: only
    the settings a client may send. `method`: the one that will run them, which refuses another
    method's settings set away from their defaults and gives its own defaults (the latent
    method's steps are its scheduler's)."""
    if not isinstance(values, Mapping):
        raise SettingError("settings", "settings must be an object")
    known = WIRE if wire else tuple(BY_NAME)
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise SettingError(
            unknown[0], f"unknown settings {', '.join(unknown)[:200]}; known: {', '.join(known)}"
        )
    checked = {k: _value(BY_NAME[k], v, caps) for k, v in values.items()}
    if method is not None:
        other = sorted(
            k for k, v in checked.items() if method not in BY_NAME[k].methods
            and v != BY_NAME[k].default
        )  # fmt: skip
        if other:
            raise SettingError(
                other[0], f"the {method} method does not take {', '.join(other)}; it takes "
                f"{', '.join(taken_by(method, wire))}",
            )  # fmt: skip
        if method == LATENT and "steps" not in checked:
            steps = SCHEDULER_STEPS[checked.get("scheduler", BY_NAME["scheduler"].default)]
            checked["steps"] = min(steps, high_for(BY_NAME["steps"], caps))
    out = Settings(**checked)
    if out.skip is not None and out.skip >= out.steps:
        raise SettingError(
            "skip", f"settings.skip must be 0 to steps - 1 ({out.steps - 1}), got {out.skip}"
        )
    return out
