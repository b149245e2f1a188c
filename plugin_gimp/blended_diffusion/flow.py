"""One edit from start to end, host-independent: check the selection, read the crop, ask the
engine, wait for it while showing progress, and describe the result layers.

No gi import: GIMP is reached only through a `Host` (adapter.py in GIMP, a fake in the tests).
No threads: GIMP is not thread-safe, so the wait is a loop of short polls. GIMP never tells a
plug-in that its progress was cancelled, it kills it; the engine then misses the keep-alive
`poll()` sends and drops the job, so nothing here handles a cancel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from geometry import Box, context_crop, is_blank, layer_offsets, selection_in_drawable
from params import PADDING, Request

from engine import client as engine_client

POLL_WAIT = 0.05  # seconds per poll: short enough for a responsive progress bar
CONNECT_TIMEOUT = 5.0  # a dead engine is reported within this, never waited on forever


class EditError(Exception):
    """Something the user must fix or know: the message is shown as the procedure's error."""


@dataclass(frozen=True)
class ResultLayer:
    name: str
    x: int  # image coordinates
    y: int
    width: int
    height: int
    rgba: bytes  # R'G'B'A u8, alpha 0 outside the selection
    visible: bool  # only the best variant is


class Host(Protocol):
    """What an edit needs from the image editor; adapter.GimpHost is GIMP's."""

    name: str  # the drawable's name, for messages
    offsets: tuple[int, int]  # the drawable's position in the image
    size: tuple[int, int]

    def selection_bounds(self) -> Box | None: ...  # image coordinates; None: nothing selected

    def read(self, crop: Box) -> tuple[bytes, bytes]: ...  # RGBA8 and Y8 mask, drawable coords

    def progress(self, fraction: float, text: str) -> None: ...


Connect = Callable[[str], "engine_client.Client"]


def default_connect(endpoint: str) -> engine_client.Client:
    return engine_client.connect(endpoint, timeout=CONNECT_TIMEOUT)  # CURVE keys if remote


def read_selection(host: Host) -> tuple[Box, bytes, bytes]:
    """The crop to send, its pixels and its mask; EditError when there is nothing to edit."""
    bounds = host.selection_bounds()
    if bounds is None:
        raise EditError(
            "Nothing is selected: select the area to change first (e.g. with the Ellipse Select "
            "tool). Blended Diffusion only edits inside the selection."
        )
    selection = selection_in_drawable(bounds, host.offsets, host.size)
    if selection is None:
        raise EditError(
            f"The selection does not overlap the layer '{host.name}': select an area on it, or "
            "pick the layer the selection is on."
        )
    crop = context_crop(selection, host.size, PADDING)
    rgba, mask = host.read(crop)
    if is_blank(mask):
        raise EditError(f"The selection does not cover any pixel of the layer '{host.name}'.")
    return crop, rgba, mask


def run_edit(host: Host, request: Request, connect: Connect = default_connect) -> list[ResultLayer]:
    """The result layers, best first; EditError with the message the user needs otherwise."""
    crop, rgba, mask = read_selection(host)
    host.progress(0.0, f"Blended Diffusion: connecting to {request.endpoint}")
    try:
        client = connect(request.endpoint)
    except (ValueError, FileNotFoundError) as e:  # a malformed address; a remote's missing keys
        raise EditError(f"Blended Diffusion: {e}") from None
    try:
        job = _submit_and_wait(client, host, request, crop, rgba, mask)
    except engine_client.VersionMismatch as e:
        raise EditError(
            f"Blended Diffusion: {e}. Install the plug-in and the engine from the same version "
            "(install.py)."
        ) from None
    except engine_client.EngineError as e:
        raise EditError(f"Blended Diffusion: the engine refused the edit: {e.message}") from None
    except engine_client.ClientError as e:  # EngineUnreachable, Timeout
        raise EditError(f"Blended Diffusion: {e}") from None
    finally:
        client.close()
    layers = []
    for variant in job.variants:
        x, y = layer_offsets(host.offsets, crop, (variant.x, variant.y))
        name = engine_client.layer_name(request.prompt, variant, job.models)
        layers.append(
            ResultLayer(name, x, y, variant.width, variant.height, variant.rgba, not layers)
        )
    return layers


def _submit_and_wait(client, host: Host, request: Request, crop: Box, rgba: bytes, mask: bytes):
    client.hello()  # EngineUnreachable within CONNECT_TIMEOUT, VersionMismatch
    job = client.submit(rgba, crop.w, crop.h, mask, request.prompt, request.settings)
    host.progress(0.0, _waiting_text(job.position))
    while not job.done:
        for event in client.poll(POLL_WAIT):
            if event.job is job and event.type == "progress" and event.total:
                text = f"Blended Diffusion: step {event.step} of {event.total}"
                host.progress(event.step / event.total, text)
    if job.error is not None:
        if job.error.code == "timeout":  # the client gave up on a silent engine
            raise EditError(f"Blended Diffusion: {job.error.message}")
        raise EditError(f"Blended Diffusion: the engine failed the edit: {job.error.message}")
    if job.state == "cancelled":
        raise EditError(f"Blended Diffusion: the engine cancelled the edit ({job.cancel_reason}).")
    if not job.variants:
        raise EditError("Blended Diffusion: the engine returned no result.")
    return job


def _waiting_text(position: int) -> str:
    if not position:
        return "Blended Diffusion: starting"
    return f"Blended Diffusion: waiting, {position} job{'s' if position > 1 else ''} ahead"
