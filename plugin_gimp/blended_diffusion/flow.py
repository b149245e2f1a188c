"""One edit from start to end, host-independent: check the selection, ask the engine, read the
window it needs, wait while showing progress, and describe the result layers.

No gi import: GIMP is reached only through a `Host` (adapter.py in GIMP, a fake in the tests).
No threads: GIMP is not thread-safe, so the wait is a loop of short polls, asking the host
between them whether the user cancelled (GIMP's host then handles its progress window's events).
A cancel is sent to the engine, whose answer is awaited a few seconds, and the edit ends in
`Cancelled`, adding nothing. GIMP's own Cancel (on its status bar, runs without a window) kills
the plug-in instead; the engine then misses the keep-alive `poll()` sends and drops the job.
While the engine works, the best variant's preview is shown in the image through the host's
temporary preview layer, which is removed whatever the outcome. Settings, geometry and wording
are the shared core's (engine/shared), as in the Krita plug-in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from engine.shared import client as engine_client
from engine.shared import estimate, geometry, history, png, settings, wording
from engine.shared.geometry import Rect
from engine.shared.wording import ResultLayer

PREFIX = wording.GROUP_PREFIX  # progress and errors name the plug-in as its groups do
CANCEL_WAIT = settings.TIMEOUT  # seconds for the engine to confirm a cancel (it takes one step)


class EditError(Exception):
    """Something the user must fix or know: the message is shown as the procedure's error."""


class Cancelled(Exception):
    """The user cancelled the run (Host.cancelled): nothing was added, nothing is to be said."""


class Host(Protocol):
    """What an edit needs from the image editor; adapter.GimpHost is GIMP's."""

    name: str  # the active layer's name, for messages
    offsets: tuple[int, int]  # where the source read (the image, or the layer) sits in the image
    size: tuple[int, int]

    def selection_bounds(self) -> Rect | None: ...  # image coordinates; None: nothing selected

    def read(self, window: Rect) -> tuple[bytes, bytes]: ...  # RGBA8, Y8 mask; source coords

    def progress(self, fraction: float, text: str) -> None: ...

    def cancelled(self) -> bool: ...  # asked between polls: whether the user pressed Cancel

    # the preview: RGBA8 `width` x `height` stretched over `box` (drawable coordinates), shown
    # without an undo step; removed without one, leaving nothing
    def show_preview(self, box: Rect, width: int, height: int, rgba: bytes) -> None: ...

    def remove_preview(self) -> None: ...


Connect = Callable[[str], "engine_client.Client"]


def default_connect(endpoint: str) -> engine_client.Client:
    return engine_client.connect(endpoint, timeout=settings.TIMEOUT)  # CURVE keys if remote


def selection(host: Host) -> Rect:
    """The selection in the drawable; EditError when there is nothing to edit."""
    bounds = host.selection_bounds()
    if bounds is None:
        raise EditError(
            "Nothing is selected: select the area to change first (e.g. with the Ellipse Select "
            "tool). Blended Diffusion only edits inside the selection."
        )
    inside = geometry.selection_in_source(bounds, host.offsets, host.size)
    if inside is None:
        raise EditError(
            f"The selection does not overlap the layer '{host.name}': select an area on it, or "
            "pick the layer the selection is on."
        )
    return inside


def run_edit(
    host: Host,
    values: Mapping[str, Any],
    connect: Connect = default_connect,
    request: settings.Request | None = None,
) -> list[ResultLayer]:
    """The result layers, best first; EditError with the message the user needs otherwise.
    `request`: the values' request when the caller built it already; the engine's limits are
    applied once it answered."""
    if request is None:
        try:
            request = settings.request(values)
        except ValueError as e:
            raise EditError(str(e)) from None
    sel = selection(host)
    host.progress(0.0, f"{PREFIX}connecting to {request.endpoint}")
    try:
        client = connect(request.endpoint)
    except (ValueError, FileNotFoundError) as e:  # a malformed address; a remote's missing keys
        raise EditError(PREFIX + wording.describe(e)) from None
    client.idle = lambda: _raise_if_cancelled(host)  # the window lives while a request waits
    try:
        info = client.hello()  # EngineUnreachable within the timeout, VersionMismatch
        request = settings.request(values, info.get("limits"))  # the engine's own limits
        window = geometry.window_for(sel, host.size, request.settings, info.get("limits"))
        rgba, mask = host.read(window)
        if geometry.is_blank(mask):
            raise EditError(f"The selection does not cover any pixel of the layer '{host.name}'.")
        preset = settings.effective(values)["preset"]
        job = _submit_and_wait(client, host, request, info, preset, window, rgba, mask)
    except (ValueError, engine_client.ClientError) as e:
        raise EditError(PREFIX + wording.describe(e)) from None
    finally:
        client.close()
    origin = geometry.place(host.offsets, window, 0, 0)
    return wording.result_layers(request.prompt, job, origin)


def _submit_and_wait(client, host: Host, request, info, preset, window: Rect, rgba, mask):
    _raise_if_cancelled(host)  # while reading the picture: nothing was submitted
    job = client.submit(rgba, window.width, window.height, mask, request.prompt, request.settings,
                        previews=settings.PREVIEWS)  # fmt: skip
    clock = estimate.Clock(estimate.plan(info, request.settings, job.total, job.refine_tiles))
    host.progress(0.0, PREFIX + wording.started(info, request.settings, job, preset))
    fraction, cancel_by = 0.0, None  # cancel_by: until when the engine may answer a cancel
    try:
        while not job.done:
            if cancel_by is None and host.cancelled():
                client.cancel(job)
                cancel_by = time.monotonic() + CANCEL_WAIT
                host.progress(fraction, PREFIX + wording.CANCELLING)
            elif cancel_by is not None and time.monotonic() > cancel_by:
                break  # no answer: the engine drops the job when the client closes
            for event in client.poll(settings.POLL_SECONDS * 2):
                shown = cancel_by is None and event.job is job and event.type == "progress"
                if shown and event.total:  # once cancelled, only the job's end matters
                    left = clock.left(event.step, event.total)
                    text = wording.progress(event.step, event.total, left)
                    fraction = event.step / event.total
                    host.progress(fraction, PREFIX + text)
                    if event.previews:
                        _show_best(host, window, event.previews)
    finally:
        host.remove_preview()
    if cancel_by is not None:  # a result that crossed the cancel is not wanted either
        raise Cancelled
    problem = wording.outcome(job)
    if problem is not None:
        raise EditError(PREFIX + problem)
    return job


def _raise_if_cancelled(host: Host) -> None:
    if host.cancelled():
        raise Cancelled


def _show_best(host: Host, window: Rect, previews) -> None:
    """The closest variant so far, over the selection's box in the drawable."""
    best = history.closest(previews) or previews[0]
    width, height, rgba = png.decode(best.png)
    x, y, w, h = best.box
    host.show_preview(Rect(window.x + x, window.y + y, w, h), width, height, rgba)
