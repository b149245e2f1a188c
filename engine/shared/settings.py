"""The settings an artist sets, in one table: the Krita docker, the GIMP procedure and its dialog
are built from it, and the engine's `hello` limits tighten it.

An artist sets Strength (how much of the selection may change, in %: the request's own setting,
which each method maps to its start), and picks a preset: "Draft" (fewer steps and variants:
chosen from measurements in the demo world, see README), "Paper" (the official
defaults: 4 variants, 100 steps, 75% strength) or "Custom" (the Advanced settings as set).
A preset other than Custom decides the Advanced settings it names (quality and speed); the UIs
show its values in them. The other Advanced settings (grow, feather, this layer only) are the
artist's whatever the preset.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from engine.shared import request as schema
from engine.shared.protocol import Limits

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"  # `python -m engine serve`'s own default
TIMEOUT = 5.0  # seconds a blocking client call may take: a dead engine is reported by then
POLL_SECONDS = 0.02  # how often a host polls the client (krita-ai-diffusion polls every 20 ms)
PREVIEWS = {"every": 1}  # what the hosts ask: as often as the engine allows (one a second)
INT_MAX = 2**31 - 1  # Qt spin boxes and GIMP int arguments are 32-bit signed
PROMPT_SHOWN = 40  # characters of the prompt in layer and group names

DRAFT, PAPER, CUSTOM = "draft", "paper", "custom"


@dataclass(frozen=True)
class Setting:
    name: str  # the key everywhere: values dicts, Krita's settings store, GIMP's argument
    label: str
    tooltip: str
    default: str | bool | int | float
    low: int | float | None = None  # None: not a number
    high: int | float | None = None
    special: str = ""  # what the minimum means, shown instead of it ("random")
    choices: tuple[tuple[str, str], ...] = ()  # (id, label) of a choice
    advanced: bool = False  # under "Advanced": set by the preset unless it is Custom
    limit: str = ""  # the engine's `hello` limit that caps `high`

    @property
    def kind(self) -> type:
        return str if self.choices else type(self.default)


def _from_schema(name: str, label: str, tooltip: str, default: Any = None, **ui: Any) -> Setting:
    """A request setting as the UIs show it: its range and limit from the request schema
    (capped by a default engine's limits until one says its own), its default the schema's
    unless the UI needs a value where the schema has None (-1: the special choice)."""
    f = schema.BY_NAME[name]
    low = -1 if f.optional and default == -1 else f.low
    high = schema.high_for(f, Limits().to_json())
    default = f.default if default is None else default
    return Setting(name, label, tooltip, default, low, high, limit=f.limit, **ui)


TABLE: tuple[Setting, ...] = (
    Setting("prompt", "Prompt", "What the selection should become, e.g. a red ball", ""),
    Setting(
        "preset",
        "Preset",
        "Draft: quick, fewer steps and variants. Paper: the paper's settings "
        "(4 variants, 100 steps, 75% strength), slow on a CPU. Custom: the Advanced settings.",
        DRAFT,
        choices=((DRAFT, "Draft"), (PAPER, "Paper"), (CUSTOM, "Custom")),
    ),
    Setting(
        "seed",
        "Seed",
        "Random seed: the same seed and settings give the same result; -1 picks one",
        -1,
        -1,
        INT_MAX,  # the schema's seeds go to 2**32 - 1: the UIs' spin boxes stop here
        special="random",
    ),
    _from_schema(
        "variants",
        "Variants",
        "How many results to make, one layer each: the best is shown",
        advanced=True,
    ),
    _from_schema(
        "strength",
        "Strength %",
        "How much of the selection may change: 100 repaints it all, lower keeps more of its "
        "colours and layout (the paper's 75%)",
        advanced=True,
    ),
    _from_schema("steps", "Steps", "Denoising steps: more is slower and finer", advanced=True),
    Setting(
        "fast_guidance",
        "Fast guidance",
        "CLIP's pull without a pass back through the UNet: about 3x faster a step, rougher "
        "results (with the model's own default weight for it)",
        False,
        advanced=True,
    ),
    _from_schema(
        "guidance_weight",
        "Guidance",
        "How strongly CLIP pulls the edit towards the prompt; -1: the model's default",
        -1.0,
        special="model default",
        advanced=True,
    ),
    _from_schema(
        "grow",
        "Grow px",
        "Grow the selection by this many pixels before the edit (0: the selection as it is)",
        special="off",
        advanced=True,
    ),
    _from_schema(
        "feather",
        "Feather px",
        "Soften a hard selection's edge over about this many pixels, so the edit fades into "
        "the picture (0: the selection as it is)",
        special="off",
        advanced=True,
    ),
    Setting(
        "layer_only",
        "This layer only",
        "Send only the active layer's pixels to the engine (its transparent parts as grey), "
        "not the visible picture; the active layer must then be an 8-bit RGB layer",
        False,
        advanced=True,
    ),
    _from_schema(
        "refine",
        "Refine large selections",
        "A selection larger than the model's canvas (256 px for ADM 256) is edited at the model's "
        "size, then refined at its own resolution over tiles: sharper, and slower the larger "
        "the selection (the expected time says how much)",
        advanced=True,  # no preset decides it: it trades time for detail at any quality
    ),
    Setting("endpoint", "Engine", "Where the engine listens (`python -m engine serve`)",
            DEFAULT_ENDPOINT),  # fmt: skip
)
BY_NAME = {s.name: s for s in TABLE}

# The Advanced values each preset sets. Paper: the official defaults. Draft: measured in the
# demo world (README, "Presets"): the prompt still obeyed in a fraction of Paper's time. Fast
# guidance, and 25 steps at 75%, obeyed on a grey picture but not over a blue layer in real
# Krita; 50 steps at 80% did (the real-Krita demo test).
PRESETS: dict[str, dict[str, Any]] = {
    PAPER: {"variants": 4, "strength": 75, "steps": 100, "fast_guidance": False,
            "guidance_weight": -1.0},  # fmt: skip
    DRAFT: {"variants": 2, "strength": 80, "steps": 50, "fast_guidance": False,
            "guidance_weight": -1.0},  # fmt: skip
}


def defaults() -> dict[str, Any]:
    return {s.name: s.default for s in TABLE}


def table(limits: Mapping[str, Any] | None = None) -> tuple[Setting, ...]:
    """The settings with the engine's limits (its `hello`) applied to their ranges."""
    limits = limits or {}
    out = []
    for s in TABLE:
        cap = limits.get(s.limit) if s.limit else None
        if isinstance(cap, int) and not isinstance(cap, bool) and s.low <= cap < s.high:
            s = replace(s, high=cap)
        out.append(s)
    return tuple(out)


def matching_preset(values: Mapping[str, Any]) -> str:
    """The preset whose Advanced values these are, else Custom (a UI's preset follows edits)."""
    for name, preset in PRESETS.items():
        if all(values.get(k) == v for k, v in preset.items()):
            return name
    return CUSTOM


def effective(values: Mapping[str, Any]) -> dict[str, Any]:
    """All settings, defaults filled in, the preset's values over the Advanced ones."""
    out = defaults() | dict(values)
    return out | PRESETS.get(out["preset"], {})


def coerce(setting: Setting, raw: Any) -> Any:
    """A stored value (text from Krita's store, JSON) as the setting's type, in its range; the
    default when it cannot be (an older or hand-edited store must never break the UI)."""
    try:
        if setting.kind is bool:
            value = raw if isinstance(raw, bool) else str(raw).strip().lower() == "true"
        elif setting.kind is int:
            value = int(float(raw))
        elif setting.kind is float:
            value = float(raw)
        else:
            value = str(raw)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite int
        return setting.default
    if setting.choices and value not in dict(setting.choices):
        return setting.default
    if setting.low is not None and not setting.low <= value <= setting.high:
        return setting.default
    return value


def dumps(values: Mapping[str, Any]) -> str:
    return json.dumps({s.name: values[s.name] for s in TABLE if s.name in values})


def loads(text: str) -> dict[str, Any]:
    """Values saved by `dumps`, each checked by `coerce`; unknown or unreadable ones dropped."""
    try:
        stored = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(stored, dict):
        return {}
    return {k: coerce(BY_NAME[k], v) for k, v in stored.items() if k in BY_NAME}


@dataclass(frozen=True)
class Request:
    """One edit as the engine takes it (docs/protocol.md, Settings), before the pixels."""

    prompt: str
    endpoint: str
    settings: dict[str, Any]
    layer_only: bool = False  # read the active layer's pixels, not the visible picture


def request(values: Mapping[str, Any], limits: Mapping[str, Any] | None = None) -> Request:
    """The request for a UI's values; ValueError says what to fix, in the artist's words."""
    v = effective(values)
    prompt = " ".join(str(v["prompt"] or "").split())
    if not prompt:
        raise ValueError("Type a prompt first: what should the selection become (e.g. a red ball)?")
    max_prompt = int((limits or {}).get("max_prompt", 500))
    if len(prompt) > max_prompt:
        raise ValueError(f"The prompt is {len(prompt)} characters; the engine takes {max_prompt}.")
    for s in table(limits):
        if s.low is not None and not s.low <= v[s.name] <= s.high:
            raise ValueError(
                f"{s.label} must be {s.low:g} to {s.high:g}, not {v[s.name]:g}"
                + (" (the engine's limit)" if s.limit and s.high < BY_NAME[s.name].high else "")
            )
    endpoint = str(v["endpoint"] or "").strip()
    if "://" not in endpoint or endpoint.endswith("://"):
        raise ValueError(f"The engine address must look like {DEFAULT_ENDPOINT}, not {endpoint!r}.")
    settings: dict[str, Any] = {
        "variants": int(v["variants"]),
        "steps": int(v["steps"]),
        "strength": int(v["strength"]),
        "guidance_mode": "fast" if v["fast_guidance"] else "full",
        "refine": bool(v["refine"]),
    }
    if v["seed"] >= 0:
        settings["seed"] = int(v["seed"])
    if v["guidance_weight"] >= 0:
        settings["guidance_weight"] = float(v["guidance_weight"])
    for name in ("grow", "feather"):  # done by the engine; 0 (off) is its default
        if v[name] > 0:
            settings[name] = int(v[name])
    try:  # what the table cannot see: the schema's own check, as the engine will make it
        schema.check(settings, limits, wire=True)
    except schema.SettingError as e:
        raise ValueError(str(e)) from None
    return Request(prompt, endpoint, settings, bool(v["layer_only"]))


class PresetFollower:
    """Keeps a UI's preset and its Advanced settings in step: picking a preset shows its values,
    changing one of them shows the preset they match (Custom when none). `read()` gives the UI's
    values, `write(values)` sets some of them (and may call back here: ignored meanwhile)."""

    def __init__(self, read, write) -> None:
        self.read, self.write, self._busy = read, write, False

    def preset_changed(self) -> None:
        self._guarded(lambda: self.write(PRESETS.get(self.read()["preset"], {})))

    def advanced_changed(self) -> None:
        def follow() -> None:
            values = self.read()
            preset = matching_preset(values)
            if preset != values["preset"]:
                self.write({"preset": preset})

        self._guarded(follow)

    def _guarded(self, change) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            change()
        finally:
            self._busy = False
