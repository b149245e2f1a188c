"""One Generate, from submitted pixels to result layers: a state machine with no Krita and no Qt.

    idle -> submitting -> running -> done | failed | cancelled

The docker calls `start()`, then `tick()` from a Qt timer every ~20 ms until `active` is False.
Krita is not thread-safe and the client polls without blocking, so everything runs on Krita's
GUI thread except the one call that can block: `submit` waits up to the client's timeout for an
engine that is not there. It runs in a short-lived thread that touches only the client's socket
(handed back to the GUI thread by `join`), so a dead engine never freezes Krita.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IDLE, SUBMITTING, RUNNING, DONE, FAILED, CANCELLED = (
    "idle",
    "submitting",
    "running",
    "done",
    "failed",
    "cancelled",
)
ACTIVE = (SUBMITTING, RUNNING)
TIMEOUT = 5.0  # seconds a blocking client call may take: the dead-engine message comes by then
INTERVAL_MS = 20  # the docker's polling timer (what krita-ai-diffusion uses)


@dataclass
class Request:
    """What one Generate sends: a window of the layer, in Krita's BGRA order, and its mask."""

    prompt: str
    settings: dict[str, Any]
    image: bytes  # BGRA8, rows of width * 4 bytes
    mask: bytes  # Y8, one byte a pixel: 0 keep, 255 edit
    width: int
    height: int
    x: int = 0  # where the window sits in the image: results are placed relative to it
    y: int = 0


@dataclass
class ResultLayer:
    """A paint layer to add, in image coordinates, pixels already in Krita's BGRA order."""

    name: str
    x: int
    y: int
    width: int
    height: int
    bgra: bytes
    visible: bool


@dataclass
class Progress:
    state: str = IDLE
    message: str = ""
    step: int = 0
    total: int = 0
    error: bool = False
    seed: int | None = None  # the best variant's seed of the last result
    models: str = ""  # what the engine said it runs


def connect(endpoint: str):
    """The shared client; imported late so a missing pyzmq becomes a message, not a dead plug-in."""
    from engine import client

    return client.connect(endpoint, timeout=TIMEOUT)  # with CURVE keys for a remote engine


def group_name(prompt: str) -> str:
    short = " ".join(prompt.split())
    short = short if len(short) <= 40 else short[:39] + "…"
    return f'Blended Diffusion: "{short}"'


def result_layers(request: Request, job) -> list[ResultLayer]:
    """One layer per variant, best first, named by the shared client; only the best visible."""
    from engine.client import layer_name, rgba_to_bgra

    return [
        ResultLayer(
            layer_name(request.prompt, v, job.models),
            request.x + v.x,
            request.y + v.y,
            v.width,
            v.height,
            rgba_to_bgra(v.rgba),
            visible=(i == 0),
        )
        for i, v in enumerate(job.variants)
    ]


def describe(error: BaseException) -> str:
    """A message for the docker: what went wrong and what to do."""
    try:
        from engine.client import EngineError, EngineUnreachable, Timeout, VersionMismatch
    except ImportError:
        EngineError = EngineUnreachable = Timeout = VersionMismatch = ()
    if isinstance(error, ImportError):
        return (
            f"The engine client cannot load in Krita's Python ({error}). Reinstall the plug-in "
            "with install.py: it adds pyzmq and the client to the plug-in's _lib folder."
        )
    if isinstance(error, EngineUnreachable):  # the client's message names the address
        text = str(error)
        return text[:1].upper() + text[1:] + "."
    if isinstance(error, VersionMismatch):
        return f"{error}. Update the plug-in or the engine so both speak the same protocol."
    if isinstance(error, EngineError) and error.code == "timeout":
        return f"Lost the engine: {error.message}. Is it still running?"
    if isinstance(error, EngineError):
        return f"The engine refused the edit ({error.code}): {error.message}"
    if isinstance(error, Timeout):
        return f"The engine stopped answering: {error}"
    if isinstance(error, ValueError | FileNotFoundError):  # bad input; a remote's missing keys
        return str(error)
    return f"Unexpected error: {type(error).__name__}: {error}"


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
        self._request: Request | None = None
        self._apply: Callable[[str, list[ResultLayer]], str] | None = None
        self._thread: threading.Thread | None = None
        self._submitted: tuple[Any, BaseException | None] = (None, None)
        self._cancel = False

    @property
    def state(self) -> str:
        return self.progress.state

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def start(
        self, endpoint: str, request: Request, apply: Callable[[str, list[ResultLayer]], str]
    ) -> None:
        """Submit `request`; `apply(group_name, layers)` adds the result and returns a summary."""
        if self.active:
            raise RuntimeError("a job is already running")
        self._request, self._apply, self._cancel, self.job = request, apply, False, None
        try:
            client = self._client_for(endpoint.strip())
        except (ImportError, ValueError) as e:
            return self._finish(FAILED, describe(e))
        self._update(SUBMITTING, f"Sending to {endpoint.strip()}…", step=0, total=0, error=False)
        self._thread = threading.Thread(
            target=self._submit, args=(client, request), name="blended-diffusion-submit"
        )
        self._thread.daemon = True  # never keeps Krita from quitting
        self._thread.start()

    def cancel(self) -> None:
        if not self.active or self._cancel:
            return
        self._cancel = True
        if self.state == RUNNING and self.job is not None:
            self._client.cancel(self.job)
        self._update(self.state, "Cancelling…")

    def tick(self) -> bool:
        """Advance the job; call it from the UI timer. Returns whether it is still active."""
        if self.state == SUBMITTING:
            self._check_submitted()
        if self.state == RUNNING:
            try:
                events = self._client.poll()
            except Exception as e:  # a broken socket or reply: fail the job, keep Krita alive
                self._drop_client()
                self._finish(FAILED, describe(e))
                return False
            for event in events:
                if event.job is self.job:
                    self._on_event(event)
        return self.active

    def close(self) -> None:
        """Let go of the engine (the docker is going away)."""
        if self.state == RUNNING and self.job is not None:
            self._client.cancel(self.job)
        if self._thread is None or not self._thread.is_alive():
            self._drop_client()

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

    def _submit(self, client, request: Request) -> None:
        """In the submit thread: the only place that may wait on the engine."""
        try:
            if not client.info:
                client.hello()
            job = client.submit(
                request.image,
                request.width,
                request.height,
                request.mask,
                request.prompt,
                request.settings,
                image_format="BGRA8",
            )
            self._submitted = (job, None)
        except Exception as e:
            self._submitted = (None, e)

    def _check_submitted(self) -> None:
        if self._thread is None or self._thread.is_alive():
            return
        self._thread.join()
        (job, error), self._submitted, self._thread = self._submitted, (None, None), None
        if error is not None:
            self._drop_client()  # a fresh socket next time: nothing stale queued in this one
            if self._cancel:
                return self._finish(CANCELLED, "Cancelled.")
            return self._finish(FAILED, describe(error))
        self.job = job
        self.progress.models = self._client.info.get("models", "")
        if self._cancel:
            self._client.cancel(job)
        where = f", {job.position} job(s) ahead" if job.position else ""
        self._update(RUNNING, f"Running on {self.progress.models or 'the engine'}{where}…")

    def _on_event(self, event) -> None:
        if event.type == "progress":
            text = "Cancelling…" if self._cancel else f"Denoising: step {event.step}/{event.total}"
            self._update(RUNNING, text, step=event.step, total=event.total)
        elif event.type == "cancelled":
            self._finish(CANCELLED, "Cancelled.")
        elif event.type == "error":
            self._finish(FAILED, describe(event.error or self.job.error))
        elif event.type == "result":
            if self._cancel:  # the result crossed the cancel: the user asked for nothing
                return self._finish(CANCELLED, "Cancelled.")
            self._add_results()

    def _add_results(self) -> None:
        job, request = self.job, self._request
        try:
            layers = result_layers(request, job)
            summary = self._apply(group_name(request.prompt), layers)
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
