"""One fake of engine/shared/client.py's Client for the plug-ins' tests: an engine whose answers
the test scripts, which remembers what it was sent."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from engine.shared.client import EngineError, Event, Job, Variant

HELLO = {"models": "tiny UNet with random weights", "device": "cpu",
         "available": [{"name": "tiny", "method": "pixel", "weights": "random"}],
         "default": "tiny", "limits": {"max_side": 4096},
         "step_seconds": {"full": {"2": 0.5}}}  # fmt: skip
MADE_BY = "tiny [random weights]"  # what the results of HELLO's default say made them


class Submitted(NamedTuple):
    image: bytes
    width: int
    height: int
    mask: bytes
    prompt: str
    settings: dict[str, Any]
    image_format: str
    previews: dict[str, int] | None


def variants(count: int = 2) -> list[Variant]:
    """A result's variants, best first: 5 x 4 px at (1, 2) of the window, seeds 1, 2, ..."""
    return [Variant(rank, 1, 2, 5, 4, bytes(80), 0.5 + rank / 10, rank)
            for rank in range(1, count + 1)]  # fmt: skip


class FakeClient:
    """The client's interface as the edit flow uses it. `script`: what each poll() returns, an
    entry a call: ("progress", step, total[, previews[, stage]]), ("result"[, variants]),
    ("error", code, message), ("cancelled", reason); `push` adds one. `hello` answers `info`
    (HELLO by default) or raises `hello_error`; `submit` raises `submit_error`, and first waits
    for `gate` (calling `idle` meanwhile, as the real client does) when one is given."""

    def __init__(
        self,
        script: list[tuple] = (),
        *,
        info: dict[str, Any] | None = None,
        hello_error: Exception | None = None,
        submit_error: Exception | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.script, self.answer = list(script), dict(HELLO if info is None else info)
        self.hello_error, self.submit_error, self.gate = hello_error, submit_error, gate
        self.info: dict[str, Any] = {}
        self.idle: Callable[[], None] | None = None
        self.job = Job("j1")
        self.hellos = 0
        self.submitted: Submitted | None = None
        self.cancelled: list[Job] = []
        self.closed = False

    def hello(self) -> dict[str, Any]:
        self.hellos += 1
        if self.hello_error is not None:
            raise self.hello_error
        self.info = dict(self.answer)
        return self.info

    def submit(self, image, width, height, mask, prompt, settings=None, *, image_format="RGBA8",
               stride=0, previews=None) -> Job:  # fmt: skip
        while self.gate is not None and not self.gate.wait(0.01):
            if self.idle is not None:
                self.idle()
        if self.submit_error is not None:
            raise self.submit_error
        assert len(image) == width * height * 4 and len(mask) == width * height
        self.submitted = Submitted(image, width, height, mask, prompt, settings or {},
                                   image_format, previews)  # fmt: skip
        self.job.state = "queued"
        return self.job

    def push(self, *entry: Any) -> None:
        self.script.append(entry)

    def poll(self, timeout: float = 0.0) -> list[Event]:
        if not self.script:  # an engine with nothing more to say
            return []
        kind, *rest = self.script.pop(0)
        job = self.job
        # as the real client does: the job is updated before its event is returned
        if kind == "progress":
            step, total, *more = rest
            previews, stage = (*more, [], "")[:2] if len(more) < 2 else more
            job.state, job.step, job.total = "running", step, total
            return [Event("progress", job.id, job, step=step, total=total, previews=previews,
                          stage=stage)]  # fmt: skip
        if kind == "result":
            job.variants = rest[0] if rest else variants()
            job.models, job.state = self.answer.get("models", ""), "done"
            job.model, job.weights = "tiny", "random"  # the engine's result says so
        elif kind == "error":
            job.error, job.state = EngineError(*rest), "failed"
        else:
            job.cancel_reason, job.state = rest[0], "cancelled"
        return [Event(kind, job.id, job, error=job.error)]

    def cancel(self, job: Job) -> None:
        self.cancelled.append(job)

    def close(self) -> None:
        self.closed = True
