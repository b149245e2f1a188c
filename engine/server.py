"""The engine as a service: one ROUTER socket, a job queue, one worker thread.

The socket thread is the only one touching the ROUTER: it answers hello/status/cancel/ping at
once, queues submits, forwards the worker's progress to the submitting client only, and cancels
the jobs of clients that stopped sending keep-alives (GIMP kills a cancelled plug-in; hosts
crash). The worker runs one edit at a time in submission order and reports through a queue plus
an inproc PAIR wake-up, so the socket thread sleeps in one zmq poll.
"""

from __future__ import annotations

import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from engine import __version__, protocol, region
from engine.client import default_key_dir
from engine.edit import EditSettings, run_edit
from engine.jobs import CANCELLED, DONE, FAILED, QUEUED, Cancelled, Job, JobQueue
from engine.keys import CurveKeys
from engine.models import Models
from engine.protocol import Limits, Pixels, ProtocolError, is_loopback
from engine.steptime import StepTimes

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
KEEPALIVE_INTERVAL = 1.0  # what the engine asks clients for, in seconds
_TICK_MS = 100  # the socket loop's longest sleep: bounds stop and keep-alive latency


class BindRefused(ValueError):
    """The endpoint is not safe to bind as asked."""


def check_endpoint(endpoint: str, curve: CurveKeys | None) -> None:
    if curve is None and not is_loopback(endpoint):
        raise BindRefused(
            f"refusing to bind {endpoint} without CURVE: only loopback is open to all. Create "
            "keys with `python -m engine keys` and start with --keys DIR (docs/protocol.md)"
        )


def to_array(p: Pixels) -> np.ndarray:
    """A frame as an owned HxWxC (HxW for Y8) uint8 array in RGB(A) order."""
    ch = protocol.FORMATS[p.format]
    rows = np.frombuffer(p.data, np.uint8).reshape(p.height, p.stride)[:, : p.width * ch]
    if ch == 1:
        return rows.copy()
    a = rows.reshape(p.height, p.width, ch)
    return a[..., [2, 1, 0, 3]] if p.format == "BGRA8" else a.copy()


class Server:
    def __init__(
        self,
        models: Models,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        limits: Limits | None = None,
        keepalive_timeout: float = 5.0,
        curve: CurveKeys | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        check_endpoint(endpoint, curve)
        self.models, self.endpoint, self.curve = models, endpoint, curve
        self.limits = limits or Limits()
        self.keepalive_timeout = keepalive_timeout
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.history: deque[dict[str, Any]] = deque(maxlen=1000)  # job events, for tests
        self.step_times = StepTimes()  # announced in hello: the plug-ins' time estimates
        self._queue = JobQueue()
        self._seen: dict[bytes, float] = {}  # client -> monotonic time of its last message
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # worker -> socket thread
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # socket thread -> worker
        self._stop = threading.Event()
        self._ctx: zmq.Context | None = None

    # -- life cycle --------------------------------------------------------------------------

    def bind(self) -> str:
        """Open the sockets; returns the endpoint actually bound (a `*` port resolved)."""
        self._ctx = ctx = zmq.Context()
        self._auth = None
        self._router = ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client keeps its jobs
        self._router.setsockopt(zmq.LINGER, 2000)  # last replies (cancelled) on shutdown
        if self.curve:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.curve.allowed_dir))
            self._router.curve_secretkey = self.curve.secret
            self._router.curve_publickey = self.curve.public
            self._router.curve_server = True
        if "[" in self.endpoint:
            self._router.setsockopt(zmq.IPV6, 1)
        try:
            self._router.bind(self.endpoint)
        except zmq.ZMQError as e:
            self._close()
            raise OSError(f"cannot bind {self.endpoint}: {e}") from None
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._wake_addr = f"inproc://engine-wake-{id(self)}"
        self._wake = ctx.socket(zmq.PAIR)
        self._wake.bind(self._wake_addr)
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._worker.start()
        return self.endpoint

    def stop(self) -> None:
        """Ask `run` to return (any thread, or a signal handler)."""
        self._stop.set()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(_TICK_MS):
                    if sock is self._router:
                        self._read_requests()
                    else:
                        self._read_events()
                self._expire_silent_clients()
                self._dispatch()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for job in self._queue.active():
            self._cancel(job, "shutdown")
        self._inbox.put(None)
        self._worker.join(timeout=60)
        self._read_events()
        self._close()

    def _close(self) -> None:
        for name in ("_wake", "_router"):
            if hasattr(self, name):
                getattr(self, name).close()
        if self._auth:
            self._auth.stop()
        self._ctx.term()

    # -- socket thread -----------------------------------------------------------------------

    def _send(self, client: bytes, frames: list) -> None:
        self._router.send_multipart([client, *frames], copy=False)

    def _read_requests(self) -> None:
        for _ in range(100):  # then let the worker's events through
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            client = parts[0].bytes
            self._seen[client] = time.monotonic()
            try:
                self._handle(
                    client, protocol.decode_request([p.buffer for p in parts[1:]], self.limits)
                )
            except ProtocolError as e:
                self._send(client, protocol.error(e.code, str(e), e.job))
            except Exception as e:  # a bug here must not take the engine down
                self.log(f"internal error: {traceback.format_exc()}")
                self._send(client, protocol.error(protocol.INTERNAL, f"engine error: {e}"))

    def _handle(self, client: bytes, msg: protocol.Message) -> None:
        kind, job_id = msg.type, msg.job
        if kind == "hello":
            self._send(client, protocol.encode("hello", self._hello()))
        elif kind == "ping":
            self._send(client, protocol.encode("pong"))
        elif kind == "status":
            jobs = [
                j.summary(self._queue.position(j))
                for j in self._queue.active()
                if j.client == client
            ]
            fields = {"queue": len(self._queue), "busy": self._queue.running is not None}
            self._send(client, protocol.encode("status", {**fields, "jobs": jobs}))
        elif kind == "cancel":
            job = self._queue.find(client, job_id)
            if job is None:
                raise ProtocolError(protocol.UNKNOWN_JOB, f"no active job {job_id!r}", job_id)
            self._cancel(job, "client")
        elif kind == "submit":
            self._submit(client, msg)

    def _hello(self) -> dict[str, Any]:
        return {
            "engine": __version__,
            "models": self.models.label,
            "device": str(self.models.device),
            "image_size": self.models.config.image_size,
            "limits": self.limits.to_json(),
            "keepalive": {"interval": KEEPALIVE_INTERVAL, "timeout": self.keepalive_timeout},
            "queue": len(self._queue),
            "step_seconds": self.step_times.to_json(),
        }

    def _submit(self, client: bytes, msg: protocol.Message) -> None:
        job_id = msg.job
        if self._stop.is_set():
            raise ProtocolError(protocol.SHUTTING_DOWN, "the engine is shutting down", job_id)
        if self._queue.find(client, job_id):
            raise ProtocolError(protocol.DUPLICATE_JOB, f"job {job_id!r} is already active", job_id)
        if len(self._queue) >= self.limits.max_queue:
            raise ProtocolError(
                protocol.LIMIT,
                f"the engine's queue is full ({self.limits.max_queue} jobs): try again later",
                job_id,
            )
        settings = EditSettings(**msg.header["settings"])
        try:
            settings.check()  # what the protocol cannot see alone, e.g. skip < steps
        except region.RegionError as e:
            raise ProtocolError(protocol.BAD_FIELD, str(e), job_id) from None
        image, mask = (to_array(p) for p in msg.frames)
        try:
            region.check_inputs(image, mask)  # now, not after the queue
        except region.RegionError as e:
            raise ProtocolError(protocol.BAD_INPUT, str(e), job_id) from None
        job = Job(client, job_id, msg.header["prompt"], image, mask, settings)
        job.total = settings.steps - settings.skip
        position = self._queue.add(job)
        self._send(client, protocol.encode("accepted", {"job": job_id, "position": position}))
        self.log(f"job {job_id}: queued at {position}, {image.shape[1]}x{image.shape[0]}")

    def _record(self, event: str, job: Job, **details: Any) -> None:
        self.history.append({"event": event, "job": job.id, "step": job.step, **details})

    def _cancel(self, job: Job, reason: str) -> None:
        if job.cancel.is_set():
            return
        job.cancel_reason = reason
        job.cancel.set()  # a running job stops after the step it is in
        if job.state == QUEUED:
            self._queue.remove(job)
            self._finished(job, CANCELLED, self._cancelled(job))
        else:
            self._record("cancel", job, reason=reason)

    def _cancelled(self, job: Job) -> list:
        fields = {"job": job.id, "reason": job.cancel_reason, "step": job.step}
        return protocol.encode("cancelled", fields)

    def _finished(self, job: Job, state: str, reply: list) -> None:
        job.state = state
        self._record(state, job, reason=job.cancel_reason)
        why = f" ({job.cancel_reason})" if job.cancel_reason else ""
        self.log(f"job {job.id}: {state} at step {job.step}/{job.total}{why}")
        self._send(job.client, reply)

    def _expire_silent_clients(self) -> None:
        now = time.monotonic()
        for job in self._queue.active():
            if now - self._seen.get(job.client, 0.0) > self.keepalive_timeout:
                self._cancel(job, "keepalive")
        clients = {j.client for j in self._queue.active()}
        self._seen = {
            c: t for c, t in self._seen.items() if c in clients or now - t < self.keepalive_timeout
        }

    def _dispatch(self) -> None:
        job = self._queue.start_next()
        if job is not None:
            self._record("start", job)
            self._inbox.put(job)

    def _read_events(self) -> None:
        while True:
            try:
                self._wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while True:
            try:
                kind, job, reply = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                self._send(job.client, reply)
            else:
                self._queue.finish(kind)
                self._finished(job, kind, self._cancelled(job) if kind == CANCELLED else reply)

    # -- worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        if hasattr(signal, "pthread_sigmask"):  # SIGINT/SIGTERM go to the socket thread only
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        wake = self._ctx.socket(zmq.PAIR)
        wake.connect(self._wake_addr)

        def notify(kind: str, job: Job, reply: list | None) -> None:
            self._events.put((kind, job, reply))
            try:
                wake.send(b"", zmq.NOBLOCK)
            except zmq.Again:  # wake-ups already pending: the socket thread will drain all
                pass

        try:
            while (job := self._inbox.get()) is not None:
                kind, reply = self._run(job, notify)
                notify(kind, job, reply)
        finally:
            wake.close(linger=0)

    def _run(self, job: Job, notify: Callable) -> tuple[str, list | None]:
        timed = job.settings.guidance_every == 1  # the plug-ins' case; N > 1 would mix paces
        step_time = self.step_times.timer(job.settings.guidance_mode, job.settings.variants)

        def on_step(done: int, total: int) -> None:
            job.step, job.total = done, total
            if timed:
                step_time(done)
            if job.cancel.is_set():
                raise Cancelled
            notify(
                "progress",
                job,
                protocol.encode("progress", {"job": job.id, "step": done, "total": total}),
            )

        if job.cancel.is_set():
            return CANCELLED, None
        try:
            variants = run_edit(self.models, job.image, job.mask, job.prompt, job.settings, on_step)
        except Cancelled:
            return CANCELLED, None
        except region.RegionError as e:
            return FAILED, protocol.error(protocol.BAD_INPUT, str(e), job.id)
        except Exception as e:
            self.log(f"job {job.id} failed: {traceback.format_exc()}")
            return FAILED, protocol.error(protocol.INTERNAL, f"the edit failed: {e}", job.id)
        return DONE, self._result(job, variants)

    def _result(self, job: Job, variants: list) -> list:
        frames = [
            Pixels(
                v.box.w,
                v.box.h,
                "RGBA8",
                np.ascontiguousarray(v.rgba).tobytes(),
                name=f"rank-{v.rank}",
            )
            for v in variants
        ]
        entries = [
            {
                "rank": v.rank,
                "x": v.box.x,
                "y": v.box.y,
                "width": v.box.w,
                "height": v.box.h,
                "distance": float(v.distance),
                "seed": v.seed,
            }
            for v in variants
        ]
        fields = {"job": job.id, "models": self.models.label, "variants": entries}
        return protocol.encode("result", fields, frames)


def serve(args: Any) -> int:
    """`python -m engine serve`: load the models, bind, answer until SIGINT or SIGTERM."""
    from engine import keys
    from engine.models import load_models

    curve = None
    if args.curve or not is_loopback(args.endpoint):
        curve = keys.load_server_keys(Path(args.keys) if args.keys else default_key_dir())
    check_endpoint(args.endpoint, curve)  # before minutes of model loading
    models = load_models(
        args.model, clip=args.clip, unet_checkpoint=args.unet_checkpoint, device=args.device
    )
    server = Server(
        models,
        args.endpoint,
        limits=Limits(max_side=args.max_side, max_queue=args.max_queue),
        keepalive_timeout=args.keepalive_timeout,
        curve=curve,
    )
    endpoint = server.bind()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    secured = ", CURVE" if curve else ""
    print(f"engine ready at {endpoint} ({models.label} on {models.device}{secured})", flush=True)
    server.run()
    print("engine stopped", flush=True)
    return 0
