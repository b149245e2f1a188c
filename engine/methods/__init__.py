"""An editing method as the engine sees it: picture + selection + prompt -> ranked variants.

The server needs two things of a method, in two places:
- `Description`, where a job is admitted: what `hello` announces, the job's plan (its canvas and
  steps) and its peak memory, worked out without the models. Small and picklable: a cluster's
  replica hands its own to the front end, which loads no models.
- `Method`, where jobs run (a worker thread, a cluster replica): loaded once, it runs one job
  with progress (and previews) and cancel callbacks, and ranks the variants.

engine/methods/pixel.py is Blended Diffusion (pixel-space ADM + CLIP guidance), latent.py Blended
Latent Diffusion (VAE, text encoder, UNet, scheduler, the blend in latent space);
engine/methods/loading.py picks one by the model's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from engine.shared.geometry import Canvas, Rect, Refinement
from engine.shared.request import Settings

if TYPE_CHECKING:
    from engine.preview import Preview

# what a step reports: (done, total, previews), where previews(max_side) renders the variants'
# current estimates on demand (engine/preview.py), so a step nobody previews costs nothing more
StepReport = Callable[[int, int, Callable[[int], "list[Preview]"]], None]


@dataclass
class Variant:
    rank: int  # 1 = closest to the prompt
    box: Rect  # where `rgba` sits in the image
    rgba: np.ndarray  # h x w x 4 uint8: the edit, alpha = the selection
    distance: float  # CLIP distance of the masked result to the prompt (lower is closer)
    seed: int


class Diverged(ValueError):
    """The edit produced NaN or infinite values; the message names the likely setting."""


@dataclass(frozen=True)
class Estimate:
    """A job's peak memory, by part (a method names its own parts)."""

    parts: dict[str, int]  # bytes by part

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def held(self) -> int:
        """What the job holds while it waits in the queue: its image and mask."""
        return self.parts["input"]


@dataclass(frozen=True)
class Plan:
    """What a job will do, worked out from the selection before it runs: the memory budget,
    the step total and the time estimate read it; the method follows it."""

    settings: Settings
    canvas: Canvas  # the context box on the model's canvas
    refinement: Refinement | None = None  # the pixel method's refinement pass; None: none

    @property
    def total(self) -> int:
        """The job's steps, every pass's: progress' `total`."""
        return self.settings.total_steps(self.refinement is not None)

    @property
    def refine_tiles(self) -> int:
        """The forwards a step of the refinement makes (0: no pass), for the time estimates."""
        return len(self.refinement.tiles) if self.refinement else 0

    def to_json(self) -> dict[str, Any]:
        """The geometry `accepted` carries and scores.json keeps."""
        box = self.canvas.box
        return {
            "context_box": [box.x, box.y, box.width, box.height],
            "model_canvas": list(self.canvas.size),
            "scale": [round(s, 6) for s in self.canvas.scale],
            "refine": self.refinement.to_json() if self.refinement else None,
        }


class Description(Protocol):
    """A method as admission sees it, without its models."""

    method: str  # request.METHODS: which settings its jobs take (hello's `method`)
    label: str  # the weights loaded: hello's `models`, the result's
    step_key: dict[str, Any]  # whose kept step times are this engine's (engine/steptime.py)
    weights: str  # real | demo | random: results say which
    resident: int  # bytes the loaded models hold: the engine's memory budget counts them

    @property
    def device(self) -> Any:
        """Where the jobs run: hello's `device` (its str)."""

    @property
    def image_size(self) -> int:
        """The model canvas's side: hello's `image_size`."""

    def plan(self, mask: np.ndarray, settings: Settings) -> Plan: ...

    def memory(self, image_shape: tuple[int, ...], mask: np.ndarray, plan: Plan) -> Estimate:
        """The job's peak memory, from the same plan the run follows."""

    def advice(self, cost: Estimate, settings: Settings) -> str:
        """Which setting to lower when `cost` is over the budget."""

    def free_bytes(self) -> int:
        """The device's free memory (a replica's: as it was when described)."""


class Method(Protocol):
    """A method with its models loaded."""

    def describe(self, remote: bool = False) -> Description:
        """`remote`: for a front end on another machine, which cannot ask this device."""

    def run(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        prompt: str,
        settings: Settings,
        on_step: StepReport | None = None,
        check: Callable[[], None] | None = None,
        plan: Plan | None = None,
    ) -> list[Variant]:
        """The variants, best first, made as `plan`s (its description's plan of this mask and
        these settings; None: planned here). `on_step` follows the steps; `check()` raises to
        cancel and is called before every model forward, so a cancel stops within one. Raises
        Diverged when the values turn NaN or infinite, region.RegionError on unusable inputs."""

