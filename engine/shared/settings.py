"""The settings an artist sets, in one table: the Krita docker, the GIMP procedure and its dialog
are built from it, and the engine's `hello` limits tighten it.

An artist sets Strength (how much of the selection may change, in %: the request's own setting,
which each method maps to its start), and picks a preset: "Draft" (fewer steps and variants:
chosen from measurements in the demo world, see README), "Paper" (the official
defaults: 4 variants, 100 steps, 75% strength) or "Custom" (the Advanced settings as set).
A preset other than Custom decides the Advanced settings it names (quality and speed); the UIs
show its values in them. The other Advanced settings (grow, feather, this layer only, the
scheduler) are the artist's whatever the preset.

Two methods serve edits (engine/methods): the pixel one (Blended Diffusion, ADM models) and the
latent one (Blended Latent Diffusion, Stable Diffusion models). The engine's `hello` names its
`method` (an older engine's names none: pixel). Each setting knows the methods that take it
(`Setting.methods`, from the request schema's field where it maps to one; the host's own
settings, prompt, preset, this layer only and the engine's address, are every method's): a UI
shows the served method's (`shown`), and `request` sends only what that method takes.

The presets for the latent method: Draft and Paper were tuned for the pixel method (its steps
are its guided sampler's), so for the latent method a preset picks only the variants and the
strength (Draft 2 at 80%, Paper 4 at 75%) and leaves the steps to the scheduler's own default
(25 for DPM++ 2M Karras, 50 DDIM, 6 LCM: `presets(LATENT, values)` shows that number in Steps,
and changing the scheduler under a preset follows it). Custom sends the Steps as set; steps
equal to the scheduler's default are left out of the request (the engine's default: the same).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from engine.shared import request as schema
from engine.shared.protocol import Limits
from engine.shared.request import LATENT, METHODS, PIXEL, SCHEDULER_STEPS

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
    methods: tuple[str, ...] = METHODS  # the methods that take it (the host's own: all)
    step: float = 1  # a number box's step and decimals
    decimals: int = 0

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
    return Setting(name, label, tooltip, default, low, high, limit=f.limit, methods=f.methods,
                   **ui)  # fmt: skip


def _taken(name: str) -> tuple[str, ...]:
    """The methods that take the request schema's setting `name`."""
    return schema.BY_NAME[name].methods


TABLE: tuple[Setting, ...] = (
    Setting("prompt", "Prompt", "What the selection should become, e.g. a red ball", ""),
    Setting(
        "negative_prompt",
        "Negative prompt",
        "What the edit should not show, e.g. blurry, text (Stable Diffusion models; unused "
        "at guidance 1 and with LCM)",
        "",
        methods=_taken("negative_prompt"),
    ),
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
        methods=_taken("seed"),
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
    _from_schema(
        "steps",
        "Steps",
        "Denoising steps: more is slower and finer (Stable Diffusion models: a preset takes "
        "the scheduler's own, 25 for DPM++, 50 DDIM, 6 LCM)",
        advanced=True,
    ),
    _from_schema(
        "scheduler",
        "Scheduler",
        "How the Stable Diffusion model steps from noise to the picture: DPM++ 2M Karras "
        "(good in 25 steps), DDIM (the paper's, 50), LCM (4-8 steps; needs an LCM model or "
        "LoRA)",
        choices=(("dpmpp_2m_karras", "DPM++ 2M Karras"), ("ddim", "DDIM"), ("lcm", "LCM")),
        advanced=True,  # no preset decides it: a preset's steps follow it
    ),
    Setting(
        "fast_guidance",
        "Fast guidance",
        "CLIP's pull without a pass back through the UNet: about 3x faster a step, rougher "
        "results (with the model's own default weight for it)",
        False,
        advanced=True,
        methods=_taken("guidance_mode"),
    ),
    _from_schema(
        "guidance_weight",
        "Guidance",
        "How strongly CLIP pulls the edit towards the prompt; -1: the model's default",
        -1.0,
        special="model default",
        advanced=True,
        step=50,
    ),
    _from_schema(
        "guidance",
        "Guidance",
        "How strongly the edit follows the prompt (and avoids the negative prompt): classifier-"
        "free guidance, 1 for none; -1: the scheduler's (7.5, LCM 1)",
        -1.0,
        special="scheduler's",
        advanced=True,  # no preset decides it
        step=0.5,
        decimals=1,
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


MODELS = {PIXEL: "ADM", LATENT: "Stable Diffusion"}  # each method's models, as artists know them


def defaults() -> dict[str, Any]:
    return {s.name: s.default for s in TABLE}


def shown(method: str | None = PIXEL) -> tuple[str, ...]:
    """The settings a UI shows for an engine serving `method` (hello's; None: an older
    engine's, the pixel method): those it takes, and the host's own."""
    method = method or PIXEL
    return tuple(s.name for s in TABLE if method in s.methods)


def only_for(setting: Setting) -> str:
    """'' for a setting every method takes, else which models take it (a UI that shows every
    setting, GIMP's dialog before it knows the engine, says it)."""
    if set(METHODS) <= set(setting.methods):
        return ""
    return " and ".join(MODELS[m] for m in setting.methods) + " models only"


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


def scheduler_steps(values: Mapping[str, Any]) -> int:
    """The steps the latent method runs when the request leaves them out: its scheduler's."""
    scheduler = values.get("scheduler")
    return SCHEDULER_STEPS.get(scheduler, SCHEDULER_STEPS[BY_NAME["scheduler"].default])


def presets(method: str | None = PIXEL, values: Mapping[str, Any] | None = None) -> dict:
    """The Advanced values each preset sets for `method`. The pixel method's: PRESETS. The
    latent method's: their variants and strength, and the steps of the scheduler in `values`
    (the module's docstring says why)."""
    if method != LATENT:
        return PRESETS
    steps = scheduler_steps(values or {})
    return {name: {"variants": p["variants"], "strength": p["strength"], "steps": steps}
            for name, p in PRESETS.items()}  # fmt: skip


def matching_preset(values: Mapping[str, Any], method: str | None = PIXEL) -> str:
    """The preset whose Advanced values these are, else Custom (a UI's preset follows edits)."""
    for name, preset in presets(method, values).items():
        if all(values.get(k) == v for k, v in preset.items()):
            return name
    return CUSTOM


def effective(values: Mapping[str, Any], method: str | None = PIXEL) -> dict[str, Any]:
    """All settings, defaults filled in, the preset's values (for `method`) over the Advanced
    ones."""
    out = defaults() | dict(values)
    return out | presets(method, out).get(out["preset"], {})


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
    method: str = PIXEL  # the engine's method `settings` are for
    # the UI's values it was made from: `for_engine` makes it again for the engine's hello
    values: dict[str, Any] | None = field(default=None, compare=False, repr=False)


NEGATIVE_MAX = int(schema.BY_NAME["negative_prompt"].high)


def request(
    values: Mapping[str, Any],
    limits: Mapping[str, Any] | None = None,
    method: str | None = PIXEL,
) -> Request:
    """The request for a UI's values to an engine serving `method` (hello's; None: an older
    engine's, the pixel method), with only the settings that method takes; ValueError says
    what to fix, in the artist's words."""
    method = method or PIXEL
    v = effective(values, method)
    prompt = " ".join(str(v["prompt"] or "").split())
    if not prompt:
        raise ValueError("Type a prompt first: what should the selection become (e.g. a red ball)?")
    max_prompt = int((limits or {}).get("max_prompt", 500))
    if len(prompt) > max_prompt:
        raise ValueError(f"The prompt is {len(prompt)} characters; the engine takes {max_prompt}.")
    for s in table(limits):
        if method in s.methods and s.low is not None and not s.low <= v[s.name] <= s.high:
            raise ValueError(
                f"{s.label} must be {s.low:g} to {s.high:g}, not {v[s.name]:g}"
                + (" (the engine's limit)" if s.limit and s.high < BY_NAME[s.name].high else "")
            )
    endpoint = str(v["endpoint"] or "").strip()
    if "://" not in endpoint or endpoint.endswith("://"):
        raise ValueError(f"The engine address must look like {DEFAULT_ENDPOINT}, not {endpoint!r}.")
    negative = " ".join(str(v["negative_prompt"] or "").split())
    settings: dict[str, Any] = {
        "variants": int(v["variants"]),
        "steps": int(v["steps"]),
        "strength": int(v["strength"]),
        "guidance_mode": "fast" if v["fast_guidance"] else "full",
        "refine": bool(v["refine"]),
    }
    scheduler = str(v["scheduler"])
    optional = {  # sent when set; absent, the engine's default (grow, feather: 0, off)
        "seed": (v["seed"] >= 0, int(v["seed"])),
        "guidance_weight": (v["guidance_weight"] >= 0, float(v["guidance_weight"])),
        "guidance": (v["guidance"] >= 0, float(v["guidance"])),
        "grow": (v["grow"] > 0, int(v["grow"])),
        "feather": (v["feather"] > 0, int(v["feather"])),
        "negative_prompt": (bool(negative), negative),
        "scheduler": (scheduler != BY_NAME["scheduler"].default, scheduler),
    }
    settings |= {name: value for name, (sent, value) in optional.items() if sent}
    if method == LATENT and settings["steps"] == scheduler_steps(v):
        del settings["steps"]  # the scheduler's own: what a preset leaves to it
    taken = schema.taken_by(method)
    settings = {name: value for name, value in settings.items() if name in taken}
    if len(settings.get("negative_prompt", "")) > NEGATIVE_MAX:
        raise ValueError(
            f"The negative prompt is {len(negative)} characters; the engine takes {NEGATIVE_MAX}."
        )
    try:  # what the table cannot see: the schema's own check, as the engine will make it
        schema.check(settings, limits, wire=True, method=method)
    except schema.SettingError as e:
        raise ValueError(str(e)) from None
    return Request(prompt, endpoint, settings, bool(v["layer_only"]), method, dict(values))


def for_engine(asked: Request, info: Mapping[str, Any]) -> Request:
    """`asked` for the engine whose hello is `info` (its method and limits): made again from the
    UI's values it came from (ValueError says what to fix), or, made from settings alone (a
    run again from the history), with those of its settings that method takes."""
    method = info.get("method") or PIXEL
    if asked.values is not None:
        return request(asked.values, info.get("limits"), method)
    taken = schema.taken_by(method)
    kept = {name: value for name, value in asked.settings.items() if name in taken}
    return replace(asked, settings=kept, method=method)


class PresetFollower:
    """Keeps a UI's preset and its Advanced settings in step: picking a preset shows its values,
    changing one of them shows the preset they match (Custom when none). `read()` gives the UI's
    values, `write(values)` sets some of them (and may call back here: ignored meanwhile);
    `method()` names the engine's method (its presets differ: `presets`). A UI calls `changed`
    with the name of each setting the artist changed, and `preset_changed` when the engine's
    method changed (the preset's values for the new one)."""

    def __init__(self, read, write, method=lambda: PIXEL) -> None:
        self.read, self.write, self.method, self._busy = read, write, method, False

    def changed(self, name: str) -> None:
        if name in ("preset", "scheduler"):  # a latent preset's steps are its scheduler's
            self.preset_changed()
        elif BY_NAME[name].advanced:
            self.advanced_changed()

    def preset_changed(self) -> None:
        def show() -> None:
            values = self.read()
            self.write(presets(self.method(), values).get(values["preset"], {}))

        self._guarded(show)

    def advanced_changed(self) -> None:
        def follow() -> None:
            values = self.read()
            preset = matching_preset(values, self.method())
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
