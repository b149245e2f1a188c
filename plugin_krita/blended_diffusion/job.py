"""One Generate, from submitted pixels to result layers: a state machine with no Krita and no Qt.

    idle -> submitting -> running -> done | failed | cancelled

The docker calls `start()`, then `tick()` from a Qt timer every ~20 ms until `active` is False.
Krita is not thread-safe and the client polls without blocking, so everything runs on Krita's
GUI thread except the calls that can block: `hello` and `submit` wait up to the client's
timeout for an engine that is not there. They run in a short-lived thread that touches only the
client's socket (handed back to the GUI thread by `join`), so a dead engine never freezes Krita.
`Probe` asks an engine's state (model, device, step times) the same way, before any Generate.
Settings, geometry and wording are the shared core's (engine/shared), as in the GIMP plug-in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.shared import estimate, settings, wording
from engine.shared.geometry import Rect
from engine.shared.wording import ResultLayer

IDLE, SUBMITTING, RUNNING, DONE, FAILED, CANCELLED = (
    "idle",
    "submitting",
    "running",
    "done",
    "failed",
    "cancelled",
)
ACTIVE = (SUBMITTING, RUNNING)
TIMEOUT = settings.TIMEOUT
INTERVAL_MS = round(settings.POLL_SECONDS * 1000)


@dataclass
class Pixels:
    """What one Generate reads: a window of the canvas, in Krita's BGRA order, and its mask."""

    window: Rect  # image coordinates: results are placed relative to it
    image: bytes  # BGRA8, rows of width * 4 bytes
    mask: bytes  # Y8, one byte a pixel: 0 keep, 255 edit


@dataclass
class Progress:
    state: str = IDLE
    message: str = ""
    step: int = 0
    total: int = 0
    error: bool = False
    seed: int | None = None  # the best variant's seed of the last result
    models: str = ""  # what the engine said it runs
    previews: list = field(default_factory=list)  # the last step's (engine.shared.client.Preview)


def connect(endpoint: str):
    """The shared client; imported late so a missing pyzmq becomes a message, not a dead plug-in."""
    from engine.shared import client

    return client.connect(endpoint, timeout=TIMEOUT)  # with CURVE keys for a remote engine


class Background:
    """One blocking call in a thread of its own; `result()` on the GUI thread once it is done."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        self._thread = threading.Thread(target=self._run, args=(call,), name="blended-diffusion")
        self._thread.daemon = True  # never keeps Krita from quitting
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._outcome = (call(), None)
        except Exception as e:
            self._outcome = (None, e)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> tuple[Any, BaseException | None]:
        self._thread.join()
        return self._outcome


class Probe:
    """The engine's `hello` for the connection line, asked without blocking the GUI."""

    def __init__(self, endpoint: str, connect: Callable[[str], Any] = connect) -> None:
        self.endpoint = endpoint.strip()

        def ask() -> dict[str, Any]:
            client = connect(self.endpoint)
            try:
                return client.hello()
            finally:
                client.close()

        self._call = Background(ask)

    @property
    def done(self) -> bool:
        return self._call.done

    def result(self) -> tuple[dict[str, Any], str]:
        """The engine's hello ({} when it did not answer) and the line to show."""
        info, error = self._call.result()
        if error is not None:
            return {}, wording.describe(error)
        return info, wording.connection(self.endpoint, info)


class Controller:
    """Runs one job at a time for a docker; `on_change(progress)` after every visible change."""

    def __init__(
        self,
        on_change: Callable[[Progress], None] = lambda p: None,
        connect: Callable[[str], Any] = connect,
    ) -> None:
        self.on_change, self._connect = on_change, connect
        self.progress = Progress()
        self.job = None  # the client's Job while one is submitted
        self._client = None
        self._endpoint = ""
        self._request: settings.Request | None = None
        self._pixels: Pixels | None = None
        self._apply: Callable[[str, list[ResultLayer]], str] | None = None
        self._call: Background | None = None
        self._clock = estimate.Clock(None)
        self._cancel = False

    @property
    def state(self) -> str:
        return self.progress.state

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def start(
        self,
        request: settings.Request,
        pixels: Pixels,
        apply: Callable[[str, list[ResultLayer]], str],
    ) -> None:
        """Submit `request`; `apply(group_name, layers)` adds the result and returns a summary."""
        if self.active:
            raise RuntimeError("a job is already running")
        self._request, self._pixels, self._apply = request, pixels, apply
        self._cancel, self.job = False, None
        try:
            client = self._client_for(request.endpoint)
        except (ImportError, ValueError) as e:
            return self._finish(FAILED, wording.describe(e))
        self._update(SUBMITTING, f"Sending to {request.endpoint}…", step=0, total=0, error=False,
                     previews=[])  # fmt: skip  (the last job's are not this one's)
        self._call = Background(lambda: self._submit(client, request, pixels))

    def cancel(self) -> None:
        if not self.active or self._cancel:
            return
        self._cancel = True
        if self.state == RUNNING and self.job is not None:
            self._client.cancel(self.job)
        self._update(self.state, wording.CANCELLING)

    def tick(self) -> bool:
        """Advance the job; call it from the UI timer. Returns whether it is still active."""
        if self.state == SUBMITTING:
            self._check_submitted()
        if self.state == RUNNING:
            try:
                events = self._client.poll()
            except Exception as e:  # a broken socket or reply: fail the job, keep Krita alive
                self._drop_client()
                self._finish(FAILED, wording.describe(e))
                return False
            for event in events:
                if event.job is self.job:
                    self._on_event(event)
        return self.active

    # -- internals ---------------------------------------------------------------------------

    def _client_for(self, endpoint: str):
        if self._client is None or endpoint != self._endpoint:
            self._drop_client()
            self._client, self._endpoint = self._connect(endpoint), endpoint
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    @staticmethod
    def _submit(client, request: settings.Request, pixels: Pixels):
        """In the submit thread: the only place that may wait on the engine. A hello each
        time: the engine's step times (this run's estimate) change with every job it runs."""
        client.hello()
        w = pixels.window
        return client.submit(pixels.image, w.width, w.height, pixels.mask, request.prompt,
                             request.settings, image_format="BGRA8",
                             previews=settings.PREVIEWS)  # fmt: skip

    def _check_submitted(self) -> None:
        if self._call is None or not self._call.done:
            return
        (job, error), self._call = self._call.result(), None
        if error is not None:
            self._drop_client()  # a fresh socket next time: nothing stale queued in this one
            if self._cancel:
                return self._finish(CANCELLED, wording.CANCELLED)
            return self._finish(FAILED, wording.describe(error))
        self.job = job
        info = self._client.info
        self.progress.models = wording.short_models(info.get("models", ""))
        if self._cancel:
            self._client.cancel(job)
        asked = self._request.settings
        self._clock = estimate.Clock(estimate.plan(info, asked, job.total, job.refine_tiles))
        self._update(RUNNING, wording.started(info, asked, job))

    def _on_event(self, event) -> None:
        if event.type == "progress":
            left = self._clock.left(event.step, event.total)
            text = wording.progress(event.step, event.total, left)
            text = wording.CANCELLING if self._cancel else text
            self._update(RUNNING, text, step=event.step, total=event.total,
                         previews=event.previews)  # fmt: skip
        elif event.type == "result" and self._cancel:  # crossed the cancel: nothing asked for
            self._finish(CANCELLED, wording.CANCELLED)
        elif event.type in ("result", "error", "cancelled"):
            problem = wording.outcome(self.job)
            if problem is not None:
                return self._finish(CANCELLED if self.job.state == "cancelled" else FAILED, problem)
            self._add_results()

    def _add_results(self) -> None:
        job, request = self.job, self._request
        try:
            origin = (self._pixels.window.x, self._pixels.window.y)
            layers = wording.result_layers(request.prompt, job, origin)
            summary = self._apply(wording.group_name(request.prompt), layers)
        except Exception as e:  # e.g. the image was closed meanwhile
            return self._finish(FAILED, f"The result could not be added: {e}")
        self.progress.seed = job.variants[0].seed
        self._finish(DONE, summary)

    def _update(self, state: str, message: str, **fields: Any) -> None:
        self.progress.state, self.progress.message = state, message
        for name, value in fields.items():
            setattr(self.progress, name, value)
        self.on_change(self.progress)

    def _finish(self, state: str, message: str) -> None:
        self._update(state, message, error=(state == FAILED))
