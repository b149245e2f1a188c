"""The engine's client for the plug-ins: pure Python + pyzmq, no threads, no numpy.

Hosts are not thread-safe, so nothing here runs in the background: a UI timer calls `poll()`
every ~20 ms, which never blocks, returns the events that arrived and sends the keep-alive the
engine needs to tell a live client from a killed one. The keep-alive names the active jobs; a
job the engine no longer knows (it restarted, crashed or lost it) fails with code `lost` at the
next pong. Blocking calls (`hello`, `submit`, `status`) give up after `timeout` seconds with
EngineUnreachable or Timeout, calling `idle` meanwhile where set. `submit` applies the limits
the engine announced in `hello` before sending anything, and the keep-alive goes at the interval
it announced there.

    client = Client("tcp://127.0.0.1:5557")
    client.hello()
    job = client.submit(rgba, width, height, mask, "a red ball", {"variants": 2})
    # every 20 ms: for event in client.poll(): ...
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from engine.shared import protocol
from engine.shared.protocol import Limits, Pixels, ProtocolError

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
ACTIVE = ("queued", "running")
IDLE_SECONDS = 0.05  # how often a blocking request calls `idle` while it waits


class ClientError(Exception):
    """Base of everything this client raises about the engine."""


class EngineUnreachable(ClientError):
    """Nothing answered at the endpoint: the engine is not running or not reachable."""


class Timeout(ClientError):
    """The engine answered before but not this time."""


class VersionMismatch(ClientError):
    """The engine speaks another protocol version: update the plug-in or the engine."""


class EngineError(ClientError):
    """The engine refused or failed a request: `code` (protocol error codes) and the message."""

    def __init__(self, code: str, message: str, job: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.job = code, message, job


@dataclass
class Variant:
    rank: int  # 1 = closest to the prompt
    x: int  # where the layer sits in the image
    y: int
    width: int
    height: int
    rgba: bytes  # width * height * 4 bytes, rows top first; alpha = the selection
    distance: float  # CLIP distance to the prompt (lower is closer)
    seed: int


@dataclass
class Preview:
    """A variant's estimate mid-run: the selection's box composited over the source, small."""

    variant: int  # index in seed order (not a rank: nothing is ranked until the result)
    seed: int
    distance: float | None  # CLIP distance of the estimate (lower is closer)
    step: int
    width: int
    height: int
    png: bytes  # engine/shared/png.py decodes it without numpy; Qt's QImage.fromData too
    box: tuple[int, int, int, int]  # x, y, width, height in the submitted image: what it shows


@dataclass(eq=False)
class Job:
    id: str
    state: str = "queued"  # queued -> running -> done | cancelled | failed
    position: int = 0  # jobs ahead of it when accepted
    step: int = 0
    total: int = 0  # its steps, the refinement's too (from `accepted`, then each progress)
    refine_tiles: int = 0  # the UNet forwards a refinement step makes (0: no refinement)
    plan: dict[str, Any] = field(default_factory=dict)  # accepted's geometry (scores.json's)
    variants: list[Variant] = field(default_factory=list)  # best first
    models: str = ""  # the label of the models that made it (the result's)
    model: str = ""  # the name of the model that made it
    weights: str = ""  # real | demo | random (results say which: wording.made_by)
    error: EngineError | None = None
    cancel_reason: str = ""
    previews: dict[int, Preview] = field(default_factory=dict)  # the latest of each variant

    @property
    def done(self) -> bool:
        return self.state not in ACTIVE


@dataclass
class Event:
    type: str  # progress | result | error | cancelled
    job_id: str | None
    job: Job | None  # None: not a job of this client (or an error about no job)
    step: int = 0
    total: int = 0
    error: EngineError | None = None
    previews: list[Preview] = field(default_factory=list)  # progress only, when asked for
    stage: str = ""  # progress only: what the engine does before the steps ("loading sd15...")


def load_keys(folder: str | Path, name: str = "client") -> dict[str, bytes]:
    """Keyword arguments for Client from a key folder (`python -m engine keys` made it)."""
    import zmq.auth

    folder = Path(folder)
    for file in ("server.key", f"{name}.key_secret"):
        if not (folder / file).is_file():
            raise FileNotFoundError(
                f"{folder / file} is missing: copy server.key, {name}.key and {name}.key_secret "
                "from the engine's key folder (`python -m engine keys`) into it"
            )
    server_key, _ = zmq.auth.load_certificate(folder / "server.key")
    public, secret = zmq.auth.load_certificate(folder / f"{name}.key_secret")
    return {"server_key": server_key, "public_key": public, "secret_key": secret}


def default_key_dir() -> Path:
    """Where `python -m engine keys` writes key pairs and clients look for theirs:
    $BLENDED_DIFFUSION_KEYS, else `blended-diffusion/keys` in the user's config folder (spelled
    out here because the hosts' Python has no platformdirs)."""
    override = os.environ.get("BLENDED_DIFFUSION_KEYS")
    if override:
        return Path(override)
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "blended-diffusion" / "keys"


def connect(
    endpoint: str = DEFAULT_ENDPOINT,
    *,
    key_dir: Path | None = None,
    key_name: str = "client",
    curve: bool | None = None,
    **kwargs: Any,
) -> Client:
    """A client for `endpoint`: plain on loopback, CURVE with the keys of `key_dir` (default:
    `default_key_dir()`) anywhere else, since a remote engine lets in only known keys.
    `curve=True` asks for CURVE on loopback too (an engine started with --curve)."""
    if "://" not in endpoint or endpoint.endswith("://"):  # before looking for keys for it
        raise ValueError(f"not an engine address: {endpoint!r} (e.g. {DEFAULT_ENDPOINT})")
    if not (protocol.is_loopback(endpoint) if curve is None else not curve):
        kwargs |= load_keys(key_dir or default_key_dir(), key_name)
    return Client(endpoint, **kwargs)


def rgba_to_bgra(data: bytes) -> bytes:
    """Swap red and blue (Krita's pixelData is BGRA) without numpy."""
    out = bytearray(data)
    out[0::4], out[2::4] = data[2::4], data[0::4]
    return bytes(out)


class Client:
    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout: float = 5.0,
        keepalive: float = 1.0,  # seconds between keep-alives until `hello` says the engine's
        engine_timeout: float = 10.0,
        server_key: bytes | None = None,
        public_key: bytes | None = None,
        secret_key: bytes | None = None,
    ) -> None:
        """`server_key` (and this client's allowed pair) for an engine that requires CURVE."""
        self.endpoint, self.timeout = endpoint, timeout
        self.keepalive, self.engine_timeout = keepalive, engine_timeout
        self.info: dict[str, Any] = {}  # the engine's hello
        # called every IDLE_SECONDS while a blocking request waits, so a host without threads
        # keeps its window alive (GIMP); raising gives the wait up (a cancelled submit is
        # cancelled at the engine too)
        self.idle: Callable[[], None] | None = None
        self.limits = Limits()  # the engine's, once `hello` answered
        self._jobs: dict[str, Job] = {}  # active jobs by id
        self._pending: list[Event] = []  # events that arrived while a blocking call waited
        self._heard = False  # anything ever received: tells Unreachable from Timeout
        self._last_heard = self._last_sent = time.monotonic()
        self._socket = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)  # a closing host must never wait on the engine
        self._socket.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
        # No ZMQ_IMMEDIATE: with it, libzmq drops the replies not yet read when the engine's
        # connection closes, so an engine that answered `cancelled (shutdown)` and exited lost
        # that answer whenever the host polled a little late. A request made while the engine
        # is down waits in the queue instead; a submit that got no answer is cancelled (below).
        self._socket.setsockopt(zmq.ROUTING_ID, b"c" + uuid.uuid4().bytes)  # kept on reconnect
        if server_key is not None:
            if public_key is None or secret_key is None:
                raise ValueError("a CURVE engine needs this client's public and secret keys too")
            self._socket.curve_serverkey = server_key
            self._socket.curve_publickey = public_key
            self._socket.curve_secretkey = secret_key
        if "[" in endpoint:
            self._socket.setsockopt(zmq.IPV6, 1)
        try:
            self._socket.connect(endpoint)
        except zmq.ZMQError as e:
            self._socket.close(linger=0)
            raise ValueError(f"not an engine address: {endpoint!r} ({e})") from None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close(linger=0)

    # -- blocking requests (bounded by `timeout`) --------------------------------------------

    def hello(self) -> dict[str, Any]:
        """The engine's protocol version, its models (`available`, the `default`), device and
        limits."""
        self.info = self._request("hello", {"client": "engine.shared.client"}).header
        self.limits = Limits.from_json(self.info.get("limits"))
        self.keepalive = _interval(self.info.get("keepalive"), self.keepalive)
        return self.info

    def model(self, name: str | None = None) -> dict[str, Any]:
        """hello's entry of the model `name` (None: the engine's default); raises EngineError
        (`unknown_model`, naming the ones served) when the engine does not serve it."""
        if not self.info:
            self.hello()
        name = name or self.info.get("default")
        for entry in self.info.get("available", []):
            if entry["name"] == name:
                return entry
        served = ", ".join(e["name"] for e in self.info.get("available", []))
        raise EngineError(
            protocol.UNKNOWN_MODEL, f"unknown model {name!r}: this engine serves {served}"
        )

    def status(self) -> dict[str, Any]:
        """Queue length, whether the worker is busy, and this client's active jobs."""
        return self._request("status").header

    def submit(
        self,
        image: bytes,
        width: int,
        height: int,
        mask: bytes,
        prompt: str,
        settings: dict[str, Any] | None = None,
        *,
        image_format: str = "RGBA8",
        stride: int = 0,
        previews: dict[str, int] | None = None,
        model: str | None = None,
    ) -> Job:
        """Queue an edit: `image` rows of `stride` bytes (packed RGBA8 by default), `mask` one
        byte a pixel (0 keep, 255 edit). `previews` ({} for the defaults, or `every` N steps,
        `max_side` px) asks for the variants' estimates in progress events (docs/protocol.md).
        `model`: one of hello's `available` (None: the engine's default). Returns once the
        engine accepted it; raises EngineError when it refused, or (code `limit`, nothing sent)
        when the request is over a limit the engine announced in `hello` (asked first if not
        yet), or (`unknown_model`) names a model the engine does not serve."""
        if image_format not in ("RGBA8", "BGRA8", "RGB8"):
            raise ValueError(f"image_format must be RGBA8, BGRA8 or RGB8, not {image_format!r}")
        pixels = Pixels(width, height, image_format, image, stride, "image")
        sel = Pixels(width, height, "Y8", mask, 0, "mask")
        for p in (pixels, sel):
            if len(p.data) != p.stride * p.height:
                raise ValueError(
                    f"{p.name}: {width}x{height} {p.format} with stride {p.stride} needs "
                    f"{p.stride * p.height} bytes, got {len(p.data)}"
                )
        if not self.info:
            self.hello()
        method = self.model(model)["method"]
        self._check_limits(pixels, sel, prompt, settings or {}, method)
        job = Job(uuid.uuid4().hex[:16])
        fields = {"job": job.id, "prompt": prompt, "settings": settings or {}}
        if model is not None:  # absent: the engine's default
            fields["model"] = model
        if previews is not None:  # absent otherwise: the request as before previews existed
            fields["previews"] = previews
        self._jobs[job.id] = job
        try:
            reply = self._request("submit", fields, [pixels, sel], job=job.id)
        except Exception as e:
            self._jobs.pop(job.id, None)
            # unanswered, or the wait given up (idle): if it arrives late, drop it there
            if not isinstance(e, ClientError) or isinstance(e, Timeout | EngineUnreachable):
                self._send("cancel", {"job": job.id}, wait=False)
            raise
        job.position = reply.header.get("position", 0)
        job.total = reply.header.get("total", 0)  # an older engine sends neither
        job.refine_tiles = reply.header.get("refine_tiles", 0)
        job.plan = reply.header.get("plan") or {}
        return job

    def _check_limits(
        self, image: Pixels, mask: Pixels, prompt: str, settings: dict[str, Any], method: str
    ) -> None:
        limits, side = self.limits, max(image.width, image.height)
        problem = None
        if side > limits.max_side:
            problem = (
                f"the image is {image.width}x{image.height} px, over this engine's limit of "
                f"{limits.max_side} px a side: select a smaller region, or start the engine "
                "with a larger `serve --max-side`"
            )
        elif len(image.data) + len(mask.data) > limits.max_message - limits.max_header:
            problem = (
                f"the image and mask are {len(image.data) + len(mask.data)} bytes, over this "
                f"engine's message limit of {limits.max_message}"
            )
        elif len(prompt) > limits.max_prompt:
            problem = f"the prompt is {len(prompt)} characters, over {limits.max_prompt}"
        if problem:
            raise EngineError(protocol.LIMIT, problem)
        try:  # the engine's own check of the settings (the one schema), before any pixel is sent
            protocol.check_settings(settings, limits, method)
        except ProtocolError as e:
            raise EngineError(e.code, str(e)) from None

    # -- non-blocking, for a host's UI timer ------------------------------------------------

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """The events that arrived (waiting up to `timeout` s for one); sends the keep-alive."""
        events, self._pending = self._pending, []
        deadline = time.monotonic() + timeout
        while True:
            left = 0.0 if events else max(0.0, deadline - time.monotonic())
            if not self._socket.poll(int(left * 1000)):
                break
            events += self._next_events()
        self._keep_alive()
        return events + self._lost_jobs()

    def cancel(self, job: Job) -> None:
        """Ask the engine to stop `job`; a `cancelled` event follows within one step. Never
        blocks: with the engine gone, the job fails after `engine_timeout` instead."""
        if not job.done:
            self._send("cancel", {"job": job.id}, wait=False)

    def wait(self, job: Job, timeout: float | None = None, on_event=None) -> Job:
        """Poll until `job` ends (for scripts; hosts use poll). Raises its EngineError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.done:
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"job {job.id} did not finish within {timeout} s")
            for event in self.poll(0.1):
                if on_event:
                    on_event(event)
        if job.error:
            raise job.error
        return job

    # -- internals ---------------------------------------------------------------------------

    def _send(self, kind: str, fields=None, frames=(), wait: bool = True) -> None:
        """Send a request; waits up to `timeout` for a connection unless `wait` is False."""
        try:
            flags = 0 if wait else zmq.NOBLOCK
            self._socket.send_multipart(protocol.encode(kind, fields, frames), flags, copy=False)
        except zmq.Again:
            if wait:
                raise EngineUnreachable(
                    f"engine unreachable at {self.endpoint}: no connection within "
                    f"{self.timeout:g} s (is `python -m engine serve` running there?)"
                ) from None
            return
        self._last_sent = time.monotonic()

    def _receive(self) -> protocol.Message:
        frames = self._socket.recv_multipart(zmq.NOBLOCK)
        self._heard, self._last_heard = True, time.monotonic()
        try:
            return protocol.decode_reply(frames, self.limits)
        except ProtocolError as e:
            if e.code == protocol.VERSION_MISMATCH:
                raise VersionMismatch(str(e)) from None
            text = f"unreadable reply from the engine: {e}"
            raise EngineError(e.code, text, _job_of(frames)) from None

    def _next_events(self) -> list[Event]:
        """The events of the next message; an unreadable one fails only the job it is about."""
        try:
            return self._handle_safely(self._receive())
        except EngineError as e:
            return self._unreadable(e)

    def _handle_safely(self, msg: protocol.Message) -> list[Event]:
        """`_handle`, where a reply with fields of the wrong shape fails only its job."""
        try:
            return self._handle(msg)
        except (KeyError, TypeError, ValueError) as e:
            text = f"unreadable reply from the engine: {msg.type} {e}"
            return self._unreadable(EngineError(protocol.BAD_MESSAGE, text, msg.job))

    def _unreadable(self, e: EngineError) -> list[Event]:
        job = self._jobs.pop(e.job, None) if e.job else None
        if job is not None:
            job.error, job.state = e, "failed"
        return [Event("error", e.job, job, error=e)]

    def _request(self, kind: str, fields=None, frames=(), job: str | None = None):
        """Send a request and wait for its reply, keeping other messages as events."""
        self._send(kind, fields, frames)
        answers = {"submit": "accepted", "hello": "hello", "status": "status"}[kind]
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.idle is not None:
                self.idle()
                left = min(left, IDLE_SECONDS)
            if not self._socket.poll(int(left * 1000) + 1):
                continue
            try:
                msg = self._receive()
            except EngineError as e:
                if e.job is None or e.job == job:
                    raise
                self._pending += self._unreadable(e)  # about another job: that job's event
                continue
            if msg.type == answers and msg.job == job:
                return msg
            if msg.type == "error" and msg.job == job:
                raise self._engine_error(msg)
            self._pending += self._handle_safely(msg)
        if not self._heard:
            raise EngineUnreachable(
                f"engine unreachable at {self.endpoint}: no answer within {self.timeout:g} s "
                "(is `python -m engine serve` running there?)"
            )
        raise Timeout(f"the engine at {self.endpoint} did not answer {kind} in {self.timeout:g} s")

    @staticmethod
    def _engine_error(msg: protocol.Message) -> ClientError:
        code, text = msg.header.get("code", ""), msg.header.get("message", "")
        if code == protocol.VERSION_MISMATCH:
            return VersionMismatch(text)
        return EngineError(code, text, msg.job)

    def _handle(self, msg: protocol.Message) -> list[Event]:
        """Update the job a message is about; the events it makes for the caller."""
        kind, job_id = msg.type, msg.job
        if kind == "pong":
            return self._lost(msg.header)
        if kind not in ("progress", "result", "error", "cancelled"):
            return []  # a late answer to a request that timed out
        job = self._jobs.get(job_id) if job_id else None
        event = Event(kind, job_id, job)
        if kind == "progress":
            event.step, event.total = msg.header.get("step", 0), msg.header.get("total", 0)
            event.stage = str(msg.header.get("stage", ""))
            box = msg.header.get("box") or {}
            at = tuple(box.get(k, 0) for k in ("x", "y", "width", "height"))
            event.previews = [
                Preview(
                    p["variant"],
                    p["seed"],
                    p["distance"],
                    event.step,
                    f.width,
                    f.height,
                    f.packed(),
                    at,
                )  # fmt: skip
                for p, f in zip(msg.header.get("previews", []), msg.frames, strict=True)
            ]
        elif kind == "error":
            event.error = self._engine_error(msg)
        if job is None:
            return [event]
        if kind == "progress":
            job.state, job.step, job.total = "running", event.step, event.total
            job.previews.update((p.variant, p) for p in event.previews)
        elif kind == "result":
            job.variants = [
                Variant(
                    v["rank"],
                    v["x"],
                    v["y"],
                    p.width,
                    p.height,
                    p.packed(),
                    v["distance"],
                    v["seed"],
                )
                for v, p in zip(msg.header.get("variants", []), msg.frames, strict=True)
            ]
            job.models, job.state = msg.header.get("models", ""), "done"
            job.model, job.weights = msg.header.get("model", ""), msg.header.get("weights", "")
        elif kind == "error":
            job.error, job.state = event.error, "failed"
        else:
            job.cancel_reason, job.state = msg.header.get("reason", ""), "cancelled"
        if job.done:
            del self._jobs[job.id]
        return [event]

    def _keep_alive(self) -> None:
        if self._jobs and time.monotonic() - self._last_sent >= self.keepalive:
            self._send("ping", {"jobs": list(self._jobs)}, wait=False)

    def _lost(self, pong: dict[str, Any]) -> list[Event]:
        """Fail the jobs a pong says the engine does not know. Replies come in order, so a job
        that ended before the pong was already removed by its own terminal message."""
        unknown = pong.get("unknown")
        lost = [self._jobs.pop(j) for j in unknown or [] if isinstance(j, str) and j in self._jobs]
        restarted = pong.get("instance") != self.info.get("instance", pong.get("instance"))
        why = "the engine was restarted" if restarted else "the engine no longer has it"
        for job in lost:
            job.error = EngineError(
                protocol.LOST, f"the job was lost ({why} at {self.endpoint}): generate again"
            )
            job.state = "failed"
        return [Event("error", job.id, job, error=job.error) for job in lost]

    def _lost_jobs(self) -> list[Event]:
        """Fail the active jobs once the engine has been silent too long (it answers pings)."""
        silent = time.monotonic() - self._last_heard
        if not self._jobs or silent < self.engine_timeout:
            return []
        events = []
        for job in list(self._jobs.values()):
            job.error = EngineError(
                "timeout", f"engine unreachable at {self.endpoint}: silent for {silent:.0f} s"
            )
            job.state = "failed"
            events.append(Event("error", job.id, job, error=job.error))
        self._jobs.clear()
        return events


def _interval(keepalive: Any, default: float) -> float:
    """The keep-alive interval a hello announces (`keepalive.interval`, seconds), else `default`:
    the engine drops a client's jobs after its own timeout without one."""
    interval = keepalive.get("interval") if isinstance(keepalive, dict) else None
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        return default
    return float(interval) if 0 < interval < float("inf") else default


def _job_of(frames: list) -> str | None:
    """The job id of an unreadable reply, when its header still says it."""
    try:
        job = json.loads(bytes(frames[0])).get("job")
    except (ValueError, AttributeError, IndexError):
        return None
    return job if isinstance(job, str) else None
