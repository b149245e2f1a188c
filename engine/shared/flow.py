"""One edit, the same in both plug-ins: the selection -> the engine's hello -> the window it needs
(geometry.window_for) -> the pixels -> submit -> the estimate -> progress and previews -> the
outcome -> the result layers, one undo step.

    idle -> connecting -> submitting -> running -> done | failed | cancelled

The request is made again for the method and limits the hello names (settings.for_engine): a
setting the served method does not take is not sent.

`Edit.tick()` advances it: Krita's docker calls it from a 20 ms QTimer, GIMP's procedure from its
loop (handling its progress window's events between ticks). Neither host is thread-safe, so every
`Host` call happens in `start()`, `tick()` or `cancel()`, on the caller's thread. Only the two
calls that may wait on the engine, `hello` and `submit` (up to the client's timeout for an engine
that is not there), run in a short-lived thread that touches nothing but the client's socket,
handed back when it ends; the client's `idle` gives that wait up as soon as the user cancels, so
a Cancel while connecting ends the edit at once. A cancel while the engine works is sent to it
and its answer awaited a few seconds; a result that crosses it is not added.

The image editor is reached only through `Host`: Krita's document.KritaHost, GIMP's
adapter.GimpHost, the tests' fakes. Standard library only (the hosts' Python has no numpy); the
client, hence pyzmq, is imported when an edit connects, never here at import: GIMP registers its
procedure before any connection.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engine.shared import estimate, geometry, history, png, settings, wording
from engine.shared.geometry import Rect
from engine.shared.wording import ResultLayer

if TYPE_CHECKING:
    from engine.shared.client import Client, Job, Preview

IDLE, CONNECTING, SUBMITTING, RUNNING = "idle", "connecting", "submitting", "running"
DONE, FAILED, CANCELLED = "done", "failed", "cancelled"
ACTIVE = (CONNECTING, SUBMITTING, RUNNING)
CANCEL_WAIT = settings.TIMEOUT  # seconds for the engine to confirm a cancel (it takes one step)


class EditError(Exception):
    """Something the user must fix or know (no selection, a layer of the wrong kind): the
    message is shown as it is."""


class Cancelled(Exception):
    """Raised in the request thread, through the client's `idle`, once the user cancelled."""


@dataclass(frozen=True)
class Status:
    """What the artist sees of an edit: its state, a line to read, the steps done of all."""

    state: str
    message: str
    step: int = 0
    total: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


class Host(Protocol):
    """What an edit needs of the image editor: the picture it edits and where the artist looks."""

    source: str  # what is read, for messages: wording.source_name's "the image", "the layer ..."
    size: tuple[int, int]  # the source's, in pixels
    offsets: tuple[int, int]  # where the source's top-left pixel sits in the image
    pixel_format: str  # how `read` gives the pixels: "RGBA8", or Krita's "BGRA8"

    def selection_bounds(self) -> Rect | None: ...  # image coordinates; None: nothing selected

    # the pixels of `window` (source coordinates) in `pixel_format`, and the selection there as
    # one byte a pixel (0 keep, 255 edit)
    def read(self, window: Rect) -> tuple[bytes, bytes]: ...

    def show(self, status: Status) -> None: ...  # every change of state, message or step

    # the variants' estimates mid-run (client.Preview: a PNG of each variant's box in `window`),
    # shown without touching the document or its undo history
    def show_previews(self, window: Rect, previews: list[Preview]) -> None: ...

    def end_previews(self) -> None: ...  # they leave no trace: before the layers, at any end

    # a group of result layers right above the source, best first, in one undo step
    def add_layers(self, group: str, layers: list[ResultLayer]) -> None: ...


def open_client(endpoint: str) -> Client:
    """The shared client, imported here so that a missing pyzmq is a message, not a dead
    plug-in; with CURVE keys for a remote engine."""
    from engine.shared import client

    return client.connect(endpoint, timeout=settings.TIMEOUT)


def selection(host: Host) -> Rect:
    """The selection's bounds in the source; EditError when there is nothing to edit there."""
    bounds = host.selection_bounds()
    if bounds is None:
        raise EditError(wording.NOTHING_SELECTED)
    inside = geometry.selection_in_source(bounds, host.offsets, host.size)
    if inside is None:
        raise EditError(wording.outside(host.source))
    return inside


def closest_preview(window: Rect, previews: list[Preview]) -> tuple[Rect, int, int, bytes]:
    """The variant closest to the prompt so far (the first while none has a distance), decoded:
    the box it shows in source coordinates, its width, height and RGBA8 pixels."""
    best = history.closest(previews) or previews[0]
    width, height, rgba = png.decode(best.png)
    x, y, w, h = best.box
    return Rect(window.x + x, window.y + y, w, h), width, height, rgba


class Background:
    """One blocking call in a thread of its own; `result()` on the host's thread once `done`."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        self._thread = threading.Thread(target=self._run, args=(call,), name="blended-diffusion")
        self._thread.daemon = True  # never keeps the host from quitting
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
    """An engine's hello for a connection line, asked without blocking the UI (Krita's docker
    shows what the engine runs before any edit, and its new step times after each)."""

    def __init__(self, endpoint: str, connect: Callable[[str], Any] | None = None) -> None:
        self.endpoint = endpoint.strip()
        def ask() -> dict[str, Any]:
            client = (connect or open_client)(self.endpoint)
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


class Edit:
    """One edit of `host`'s selection: `start()`, then `tick()` until it returns False.

    `preset`: the UI's preset, for Paper's warning on a CPU engine; `run`: the host's history
    entry (engine/shared/history.py), given the previews and the result, discarded when nothing
    came of it; `connect(endpoint)`: the client (the shared one by default)."""

    def __init__(
        self,
        host: Host,
        request: settings.Request,
        *,
        preset: str = "",
        run: history.Run | None = None,
        connect: Callable[[str], Any] | None = None,
    ) -> None:
        self.host, self.request, self.preset, self.run = host, request, preset, run
        self._connect = connect
        self.status = Status(IDLE, "")
        self.job: Job | None = None  # the client's, once the engine accepted the edit
        self.info: dict[str, Any] = {}  # the engine's hello
        self._client: Client | None = None
        self._call: Background | None = None
        self._selection = self._window = Rect(0, 0, 0, 0)
        self._clock = estimate.Clock(None)
        self._cancelling = False
        self._cancel_by = 0.0  # until when the engine may answer a cancel
        self._previewed = False  # previews shown and not yet ended

    @property
    def state(self) -> str:
        return self.status.state

    @property
    def active(self) -> bool:
        return self.status.active

    def start(self) -> None:
        """Check the selection (before any connection), connect, ask the engine's hello."""
        if self.state != IDLE:
            raise RuntimeError("an edit starts once")
        self._guarded(self._start)

    def cancel(self) -> None:
        if self.active and not self._cancelling:
            self._guarded(self._cancel)

    def tick(self) -> bool:
        """Advance the edit without blocking; whether it is still active."""
        if self.state == RUNNING:
            self._guarded(self._poll)
        elif self.active and self._call is not None and self._call.done:
            self._guarded(self._connected if self.state == CONNECTING else self._submitted)
        return self.active

    # -- the steps, each on the host's thread ---------------------------------------------------

    def _start(self) -> None:
        self._selection = selection(self.host)
        endpoint = self.request.endpoint
        self._show(CONNECTING, wording.connecting(endpoint))
        self._client = client = (self._connect or open_client)(endpoint)
        client.idle = self._idle
        self._call = Background(client.hello)

    def _idle(self) -> None:
        """In the request thread, between its short waits: give the wait up once cancelled."""
        if self._cancelling:
            raise Cancelled

    def _connected(self) -> None:
        self.info = self._answer()
        try:  # the settings the served method takes, within its limits (hello's)
            self.request = settings.for_engine(self.request, self.info)
        except ValueError as e:
            raise EditError(str(e)) from None
        if self.run is not None:
            self.run.settings = dict(self.request.settings)  # as sent
        self._window = window = geometry.window_for(
            self._selection, self.host.size, self.request.settings, self.info.get("limits")
        )
        image, mask = self.host.read(window)
        if geometry.is_blank(mask):
            raise EditError(wording.blank(self.host.source))
        request, client = self.request, self._client
        self._show(SUBMITTING, wording.sending(request.endpoint))
        self._call = Background(lambda: client.submit(
            image, window.width, window.height, mask, request.prompt, request.settings,
            image_format=self.host.pixel_format, previews=settings.PREVIEWS,
        ))  # fmt: skip

    def _submitted(self) -> None:
        self.job = job = self._answer()
        asked = self.request.settings
        self._clock = estimate.Clock(estimate.plan(self.info, asked, job.total, job.refine_tiles))
        started = wording.started(self.info, asked, job, self.preset)
        self._show(RUNNING, wording.CANCELLING if self._cancelling else started, 0, job.total)

    def _answer(self) -> Any:
        """The request thread's answer; a cancel pressed meanwhile wins over its error."""
        answer, error = self._call.result()
        self._call = None
        if error is not None:
            raise Cancelled if self._cancelling else error
        if self._cancelling:
            if self.state == CONNECTING:
                raise Cancelled
            self._client.cancel(answer)  # accepted just as the user cancelled
            self._cancel_by = time.monotonic() + CANCEL_WAIT
        return answer

    def _cancel(self) -> None:
        self._cancelling = True
        if self.state == RUNNING:
            self._client.cancel(self.job)
            self._cancel_by = time.monotonic() + CANCEL_WAIT
        self._show(self.state, wording.CANCELLING)

    def _poll(self) -> None:
        if self._cancelling and time.monotonic() > self._cancel_by:
            raise Cancelled  # no answer: the engine drops the job once the client has gone
        for event in self._client.poll():
            if event.job is not self.job:
                continue
            if self.job.done:
                return self._outcome()
            if event.type == "progress" and event.total and not self._cancelling:
                self._progress(event.step, event.total, event.previews, event.stage)

    def _progress(self, step: int, total: int, previews: list[Preview], stage: str = "") -> None:
        left = self._clock.left(step, total)
        self._show(RUNNING, wording.progress(step, total, left, stage), step, total)
        if previews:
            if self.run is not None:
                self.run.preview(previews)
            self._previewed = True
            self.host.show_previews(self._window, previews)

    def _outcome(self) -> None:
        if self._cancelling:
            raise Cancelled  # a result that crossed the cancel is not wanted either
        job = self.job
        problem = wording.outcome(job)
        if problem is not None:
            raise EditError(problem)
        prompt = self.request.prompt
        origin = geometry.place(self.host.offsets, self._window, 0, 0)
        layers = wording.result_layers(prompt, job, origin)
        group = wording.group_name(prompt)
        self._end_previews()  # gone before the layers come: they are the document's change
        try:
            self.host.add_layers(group, layers)
        except Exception as e:  # e.g. the image was closed meanwhile
            raise EditError(f"The result could not be added: {e}") from None
        if self.run is not None:
            self.run.finish(group, job.variants, layers)
        self._finish(DONE, wording.added(len(layers), group))

    # -- ends ------------------------------------------------------------------------------------

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run one step; whatever it raises ends the edit with its message, never the host."""
        try:
            step()
        except Cancelled:
            self._finish(CANCELLED, wording.CANCELLED)
        except Exception as e:
            self._finish(FAILED, str(e) if isinstance(e, EditError) else wording.describe(e))

    def _finish(self, state: str, message: str) -> None:
        self._end_previews()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.run is not None and state != DONE:  # nothing of it reached the document
            history.History.discard(self.run)
        self._show(state, message)

    def _end_previews(self) -> None:
        if self._previewed:
            self._previewed = False
            self.host.end_previews()

    def _show(
        self, state: str, message: str, step: int | None = None, total: int | None = None
    ) -> None:
        old = self.status
        step, total = old.step if step is None else step, old.total if total is None else total
        self.status = Status(state, message, step, total)
        self.host.show(self.status)
