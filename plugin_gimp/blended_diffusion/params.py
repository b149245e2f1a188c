"""The procedure's arguments: one table for GIMP's registration, the dialog and validation.

No gi import: GIMP reads the table when it registers the procedure, the tests read it directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# engine.client.DEFAULT_ENDPOINT, repeated here because registration must work without pyzmq
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
# Context around the selection, as a fraction of its size: sent to the engine explicitly so the
# crop the plug-in reads (geometry.context_crop) always holds the context the engine uses.
PADDING = 0.25
MAX_PROMPT = 500  # the engine's max_prompt
INT_MAX = 2**31 - 1  # GIMP's int arguments are 32-bit signed


@dataclass(frozen=True)
class Arg:
    name: str  # GObject property name of the procedure's config
    label: str  # the dialog's label, with its mnemonic
    blurb: str  # the tooltip and the PDB description
    default: str | bool | int | float
    low: int | float | None = None  # None: a string argument
    high: int | float | None = None

    @property
    def title(self) -> str:
        """The label without its mnemonic and hint, for messages."""
        return self.label.split(" (")[0].replace("_", "")


ARGS: tuple[Arg, ...] = (
    Arg("prompt", "_Prompt", "What the selection should become, e.g. 'a red circle'", ""),
    Arg("variants", "_Variants", "Results to make, one layer each (the best is shown)", 4, 1, 8),
    Arg(
        "seed",
        "_Seed (-1: random)",
        "Random seed; -1 picks one (a result's seed reproduces it)",
        -1,
        -1,
        INT_MAX,
    ),
    Arg("steps", "S_teps", "Denoising steps: more is slower and finer", 100, 1, 1000),
    Arg("skip", "S_kip", "Steps skipped at the start: more keeps more of the original", 25, 0, 999),
    Arg(
        "guidance-weight",
        "_Guidance weight (-1: the model's)",
        "How hard CLIP pulls toward the prompt; -1 takes the model's default",
        -1.0,
        -1.0,
        1e6,
    ),
    Arg(
        "fast-guidance",
        "_Fast guidance",
        "CLIP's gradient without a backward pass through the UNet: about 3x faster a step, "
        "rougher results (with the model's own default weight for it)",
        False,
    ),
    Arg(
        "endpoint",
        "_Engine",
        "Where the engine listens (`python -m engine serve`)",
        DEFAULT_ENDPOINT,
    ),
)


@dataclass(frozen=True)
class Request:
    prompt: str
    endpoint: str
    settings: dict[str, Any] = field(default_factory=dict)  # the protocol's settings


def request(values: Mapping[str, Any]) -> Request:
    """The engine request for the procedure's argument values; ValueError says what is wrong."""
    prompt = str(values.get("prompt") or "").strip()
    if not prompt:
        raise ValueError("Type a prompt: what should the selection become (e.g. 'a red circle')?")
    if len(prompt) > MAX_PROMPT:
        raise ValueError(f"The prompt is {len(prompt)} characters; at most {MAX_PROMPT} fit.")
    for arg in ARGS:
        if arg.low is not None and not arg.low <= values[arg.name] <= arg.high:
            raise ValueError(
                f"{arg.title} must be {arg.low:g} to {arg.high:g}, not {values[arg.name]:g}"
            )
    steps, skip = int(values["steps"]), int(values["skip"])
    if skip >= steps:
        raise ValueError(f"Skip ({skip}) must be less than Steps ({steps}).")
    endpoint = str(values.get("endpoint") or "").strip()
    if "://" not in endpoint:
        raise ValueError(f"The engine address must look like {DEFAULT_ENDPOINT}, not {endpoint!r}.")
    settings: dict[str, Any] = {
        "variants": int(values["variants"]),
        "steps": steps,
        "skip": skip,
        "padding": PADDING,
    }
    if values["seed"] >= 0:
        settings["seed"] = int(values["seed"])
    if values["guidance-weight"] >= 0:
        settings["guidance_weight"] = float(values["guidance-weight"])
    settings["guidance_mode"] = "fast" if values.get("fast-guidance") else "full"
    return Request(prompt, endpoint, settings)
