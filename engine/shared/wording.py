"""What the artist reads, worded once for both hosts: errors, progress, the engine's state, and
the names of the result layers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.shared import estimate
from engine.shared.request import PIXEL, skip_for
from engine.shared.settings import PAPER, PRESETS, PROMPT_SHOWN

CLIENT_MISSING = (
    "The engine client cannot load in this program's Python ({error}): it needs pyzmq and the "
    "shared client in the plug-in's _lib folder. Install the plug-in again with "
    "`python install.py --plugins-only`."
)


def describe(error: BaseException) -> str:
    """What went wrong and what to do, for any error an edit can end with."""
    try:
        from engine.shared.client import EngineError, EngineUnreachable, Timeout, VersionMismatch
    except ImportError:
        EngineError = EngineUnreachable = Timeout = VersionMismatch = ()  # noqa: N806
    if isinstance(error, ImportError):
        return CLIENT_MISSING.format(error=error)
    if isinstance(error, EngineUnreachable):  # the client's message names the address
        return _sentence(str(error))
    if isinstance(error, VersionMismatch):
        return _sentence(f"{error}. Install the plug-in and the engine from the same version")
    if isinstance(error, EngineError) and error.code == "timeout":
        return _sentence(f"Lost the engine: {error.message}. Is it still running?")
    if isinstance(error, EngineError):
        return _sentence(f"The engine refused the edit ({error.code}): {error.message}")
    if isinstance(error, Timeout):
        return _sentence(f"The engine stopped answering: {error}")
    if isinstance(error, ValueError | FileNotFoundError):  # bad input; a remote's missing keys
        return _sentence(str(error))
    return f"Unexpected error: {type(error).__name__}: {error}"


NOTHING_SELECTED = (
    "Nothing is selected: select the area to change first (Blended Diffusion only edits inside "
    "the selection)."
)


def source_name(layer: str | None = None) -> str:
    """What an edit reads, in messages: the visible picture, or `layer` alone."""
    return "the image" if layer is None else f'the layer "{layer}"'


def outside(source: str) -> str:
    return f"The selection is empty or outside {source}: select an area on it to edit."


def blank(source: str) -> str:
    return f"The selection does not cover any pixel of {source}: select an area on it to edit."


def connecting(endpoint: str) -> str:
    return f"Connecting to {endpoint}…"


def sending(endpoint: str) -> str:
    return f"Sending the selection to {endpoint}…"


def added(variants: int, group: str) -> str:
    return f"{variants} variant(s) added in the group {group}; the best one is visible."


CANCELLING = "Cancelling…"  # from the user's Cancel until the engine's answer
CANCELLED = "Cancelled."  # the user's cancel, answered


def outcome(job: Any) -> str | None:
    """Why a finished job brought nothing back (None: it has variants)."""
    if job.error is not None:
        return describe(job.error)
    if job.state == "cancelled":
        if job.cancel_reason == "client":
            return CANCELLED
        why = {"keepalive": "the plug-in stopped answering"}
        return f"Cancelled ({why.get(job.cancel_reason, job.cancel_reason)})."
    if not job.variants:
        return "The engine returned no result."
    return None


def _sentence(text: str) -> str:
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def shorten(prompt: str) -> str:
    short = " ".join(prompt.split())
    return short if len(short) <= PROMPT_SHOWN else short[: PROMPT_SHOWN - 1] + "…"


def made_by(model: str, weights: str) -> str:
    """Which model made a result, marked when its weights are a demo's or random: "sd15",
    "demo-latent [demo model]", "tiny [random weights]". The one format of the layers' names
    and scores.json."""
    mark = {"demo": " [demo model]", "random": " [random weights]"}.get(weights, "")
    return f"{model}{mark}"


def layer_name(prompt: str, rank: int, distance: float, by: str = "") -> str:
    """A result layer: `"<prompt>" #rank (<made_by>, CLIP d=...)`."""
    made = f"{by}, " if by else ""
    return f'"{shorten(prompt)}" #{rank} ({made}CLIP d={distance:.3f})'


GROUP_PREFIX = "Blended Diffusion: "  # every run's group: how a host finds a run's layers


def group_name(prompt: str) -> str:
    return f'{GROUP_PREFIX}"{shorten(prompt)}"'


@dataclass(frozen=True)
class ResultLayer:
    name: str
    x: int  # image coordinates
    y: int
    width: int
    height: int
    rgba: bytes  # alpha = the selection, 0 outside it
    visible: bool  # only the best variant is


def result_layers(prompt: str, job: Any, origin: tuple[int, int]) -> list[ResultLayer]:
    """One layer per variant of a finished job, best first; `origin`: the window's place in
    the image (the variants' x, y are in the window)."""
    return [
        ResultLayer(
            layer_name(prompt, v.rank, v.distance, made_by(job.model, job.weights)),
            origin[0] + v.x,
            origin[1] + v.y,
            v.width,
            v.height,
            v.rgba,
            visible=(i == 0),
        )
        for i, v in enumerate(job.variants)
    ]


def device_kind(device: str) -> str:
    """GPU or CPU, from the device the engine's hello names (torch's spelling: cpu, cuda:0...)."""
    return "CPU" if device.split(":")[0] == "cpu" else "GPU"


def short_models(models: str) -> str:
    """The engine's models label up to its first aside: "demo shapes-world UNet"."""
    return models.split(";")[0].split(" (")[0].strip() or "?"


def connection(endpoint: str, info: Mapping[str, Any]) -> str:
    """The engine's state in a short line: what it runs and where (the UI shows the whole
    models label as a tooltip)."""
    if not info:
        return f"Engine: not connected ({endpoint})"
    device = str(info.get("device", "?"))
    kind = device_kind(device)
    where = kind if device == kind.lower() else f"{kind} ({device})"
    queue = info.get("queue", 0)
    busy = f", {queue} job(s) queued" if queue else ""
    served = info.get("available") or []
    default = next((m for m in served if m.get("name") == info.get("default")), None)
    if default is None:  # an engine's hello without its models' list
        return f"Engine: {short_models(str(info.get('models', '')))} on {where}{busy}"
    more = f" (+{len(served) - 1} more)" if len(served) > 1 else ""
    model = made_by(default["name"], default.get("weights") or "")
    return f"Engine: {model}{more} on {where}{busy}"


def before_run(
    info: Mapping[str, Any], settings: Mapping[str, Any], preset: str, job: Any = None
) -> str:
    """The expected time of an edit, and the Paper preset's warning on a CPU engine. `job`:
    the client's, once the engine accepted it (its steps and the refinement's tiles)."""
    total, tiles = (job.total, job.refine_tiles) if job is not None else (0, 0)
    p = estimate.plan(info, settings, total, tiles)
    work = f"{p.variants} variant(s) x {p.steps} steps"
    if p.refine_steps:
        n = p.refine_steps
        work += f", then {n} refinement step{'s' * (n != 1)} over {p.tiles} tiles"
    elif settings.get("refine") and job is None:
        work += ", then a refinement pass if the selection is larger than the model's canvas"
    seconds = p.seconds
    text = f"Expected: {estimate.duration(seconds)} ({work})" if seconds is not None else (
        f"{work}; the time is known after the engine's first edit"
    )
    slow = info.get("method", PIXEL) == PIXEL  # the pixel method: hours with ADM 256 on a CPU
    if info and slow and preset == PAPER and device_kind(str(info.get("device", ""))) == "CPU":
        draft = PRESETS["draft"]
        text += (
            f". Paper on a CPU engine is slow (hours with the full-size model): Draft makes "
            f"{draft['variants']} x {draft['steps'] - skip_for(draft['steps'], draft['strength'])}"
            " steps"
        )
    return text + "."


def started(
    info: Mapping[str, Any], settings: Mapping[str, Any], job: Any, preset: str = ""
) -> str:
    """Once the engine accepted an edit (the client's `job`): what runs it, the jobs ahead, the
    expected time (and, given the preset, Paper's warning on a CPU engine)."""
    models = short_models(str(info["models"])) if info.get("models") else "the engine"
    return f"Running on {models}. {waiting(job.position)} {before_run(info, settings, preset, job)}"


def progress(step: int, total: int, left: float | None, stage: str = "") -> str:
    """The running job's line: its stage before the steps (a model loading), then its steps."""
    if stage:
        return f"{stage[0].upper()}{stage[1:]}…"
    more = f", {estimate.duration(left)} left" if left is not None else ""
    return f"Denoising: step {step} of {total}{more}"


def waiting(position: int) -> str:
    if not position:
        return "Starting…"
    return f"Waiting: {position} job{'s' if position > 1 else ''} ahead…"
