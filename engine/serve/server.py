"""The engine as a service: one ROUTER socket, a job queue, one worker thread.

The socket thread is the only one touching ZeroMQ: it answers hello/status/cancel/ping at once,
checks each submit against the limits and the memory budget before queueing it, forwards the
worker's progress to the submitting client only, and cancels the jobs of clients that are gone:
at once when the ROUTER's monitor reports a disconnect and a probe finds the client unreachable
(GIMP kills a cancelled plug-in), else when their keep-alives stop (a host that hangs). The worker
runs one edit at a time, round-robin across clients, and reports through a queue plus a
socketpair wake-up, so the socket thread sleeps in one poll and the worker owns no socket that
could stop the context from closing. Every job the engine accepts gets exactly one terminal
message (result, error or cancelled), whatever fails, and the worker lives on.
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from engine import __version__, budget, devices, preview, region, weights
from engine.edit import Diverged, plan, run_edit
from engine.jobs import CANCELLED, DONE, FAILED, QUEUED, Cancelled, Job, JobQueue
from engine.keys import CurveKeys
from engine.models import Models
from engine.shared import protocol
from engine.shared.client import default_key_dir
from engine.shared.protocol import Limits, Pixels, ProtocolError, is_loopback
from engine.steptime import FILE_NAME, StepTimes, engine_key

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
KEEPALIVE_INTERVAL = 1.0  # what the engine asks clients for, in seconds
_TICK_MS = 100  # the socket loop's longest sleep: bounds stop and keep-alive latency
_PROBE_S = 1.0  # after a disconnect, how long clients with jobs are probed for reachability


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
        models: Models | budget.Facts,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        limits: Limits | None = None,
        keepalive_timeout: float = 5.0,
        memory_budget: int | None = None,
        shutdown_grace: float = 10.0,
        curve: CurveKeys | None = None,
        log: Callable[[str], None] | None = None,
        step_file: Path | None = None,
    ) -> None:
        """`memory_budget`: bytes one job may use at its peak plus what waiting jobs hold
        (default: 80% of the device's free memory when the engine binds). `shutdown_grace`:
        how long a stop waits for the running job to reach its next cancel check. `step_file`:
        where the measured step times outlive the engine (None: they do not)."""
        check_endpoint(endpoint, curve)
        self.models, self.endpoint, self.curve = models, endpoint, curve
        # what the budget needs of the models, once (a cluster's front end has only that)
        self.facts = models if isinstance(models, budget.Facts) else budget.Facts.of(models)
        self.limits = limits or Limits()
        self.keepalive_timeout = keepalive_timeout
        self.memory_budget = memory_budget
        self.shutdown_grace = shutdown_grace
        self.instance = uuid.uuid4().hex[:16]  # tells a client this engine from a restarted one
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.history: deque[dict[str, Any]] = deque(maxlen=1000)  # job events, for tests
        # announced in hello: the plug-ins' time estimates
        self.step_times = StepTimes(key=self._step_key(), path=step_file, log=self.log)
        self._queue = JobQueue()
        self._seen: dict[bytes, float] = {}  # client -> monotonic time of its last message
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # worker -> socket thread
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # socket thread -> worker
        self._stop = threading.Event()
        self._deadline: float | None = None  # set when a stop begins
        self._probe_until = 0.0  # clients with jobs are probed until then (after a disconnect)
        self._probed = 0.0  # when they last were
        self._ctx: zmq.Context | None = None

    def _step_key(self) -> dict[str, Any]:
        """Which of the file's step times are this engine's (a cluster's replica says it)."""
        return engine_key(self.models)

    # -- life cycle --------------------------------------------------------------------------

    def bind(self) -> str:
        """Open the sockets; returns the endpoint actually bound (a `*` port resolved)."""
        self._ctx = ctx = zmq.Context()
        self._auth = None
        self._router = ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client keeps its jobs
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send tells a vanished client
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
        # ZMQ_ROUTER_NOTIFY would name the peer but is a draft API missing from released pyzmq:
        # the monitor says that some peer left, a probe (ROUTER_MANDATORY) says which
        self._monitor = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._wake, self._wake_send = socket.socketpair()
        self._wake.setblocking(False)
        self._wake_send.setblocking(False)
        if self.memory_budget is None:
            self.memory_budget = int(0.8 * budget.available_bytes(self.models))
        self._start_worker()
        return self.endpoint

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Ask `run` to return (any thread, or a signal handler): the running job is cancelled
        at its next check, every client told, and `run` returns within `shutdown_grace`."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        try:
            while self._deadline is None or self._queue.running:
                if self._stop.is_set() and self._deadline is None:
                    self._begin_shutdown()
                if self._deadline is not None and time.monotonic() > self._deadline:
                    self._abandon_running_job()
                    break
                for sock, _ in poller.poll(_TICK_MS):
                    if sock is self._router:
                        self._read_requests()
                    elif sock is self._monitor:
                        self._read_disconnects()
                    else:
                        self._read_events()
                self._probe_clients()
                self._expire_silent_clients()
                self._watch_worker()
                self._dispatch()
        finally:
            self._close()

    def _begin_shutdown(self) -> None:
        """Cancel every job; the loop keeps answering until the running one has stopped."""
        self._deadline = time.monotonic() + self.shutdown_grace
        self.log("stopping: cancelling every job")
        for job in self._queue.active():
            self._cancel(job, "shutdown")

    def _abandon_running_job(self) -> None:
        """The running step did not reach a cancel check in time: answer for it and leave."""
        for job in list(self._queue.running):
            self.log(f"job {job.id}: its step did not stop within {self.shutdown_grace:g} s")
            self._end(job, CANCELLED)

    def _close(self) -> None:
        self._inbox.put(None)
        if hasattr(self, "_monitor"):
            self._router.disable_monitor()
            self._monitor.close(linger=0)
        if hasattr(self, "_router"):
            self._router.close()  # LINGER: the last replies still go out
        for end in ("_wake", "_wake_send"):
            if hasattr(self, end):
                getattr(self, end).close()
        if self._auth:
            self._auth.stop()
        self._ctx.term()

    # -- socket thread -----------------------------------------------------------------------

    def _send(self, client: bytes, frames: list) -> bool:
        """False when the client is gone (or its pipe is full): the message is dropped."""
        try:
            self._router.send_multipart([client, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return False
        return True

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
        elif kind == "ping":  # answers which of the named jobs this engine does not know
            unknown = [j for j in msg.header.get("jobs", []) if not self._queue.find(client, j)]
            self._send(client, self._pong(unknown))
        elif kind == "status":
            jobs = [
                j.summary(self._queue.position(j))
                for j in self._queue.active()
                if j.client == client
            ]
            fields = {"queue": len(self._queue), "busy": bool(self._queue.running)}
            self._send(client, protocol.encode("status", {**fields, "jobs": jobs}))
        elif kind == "cancel":
            job = self._queue.find(client, job_id)
            if job is None:
                raise ProtocolError(protocol.UNKNOWN_JOB, f"no active job {job_id!r}", job_id)
            self._cancel(job, "client")
        elif kind == "submit":
            self._submit(client, msg)

    def _pong(self, unknown: list[str] | None = None) -> list:
        return protocol.encode("pong", {"instance": self.instance, "unknown": unknown or []})

    def _hello(self) -> dict[str, Any]:
        return {
            "engine": __version__,
            "instance": self.instance,
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
        if self._queue.count(client) >= self.limits.max_client_queue:
            raise ProtocolError(
                protocol.LIMIT,
                f"this client already has {self.limits.max_client_queue} jobs queued or running "
                "(max_client_queue): wait for one to finish",
                job_id,
            )
        if len(self._queue) >= self.limits.max_queue:
            raise ProtocolError(
                protocol.LIMIT,
                f"the engine's queue is full ({self.limits.max_queue} jobs): try again later",
                job_id,
            )
        settings = msg.header["settings"]  # checked by the schema
        image, mask = (to_array(p) for p in msg.frames)
        try:
            region.check_inputs(image, mask)  # now, not after the queue
        except region.RegionError as e:
            raise ProtocolError(protocol.BAD_INPUT, str(e), job_id) from None
        native, factor = self.facts.config.image_size, self.facts.downsampling
        planned = plan(native, factor, mask, settings)
        cost = budget.estimate(self.facts, image.shape, mask, planned)
        held = sum(j.held for j in self._queue.waiting)
        if cost.total + held > self.memory_budget:
            raise ProtocolError(
                protocol.LIMIT,
                f"this edit needs about {cost.total / 2**30:.1f} GiB, over the engine's memory "
                f"budget ({(self.memory_budget - held) / 2**30:.1f} GiB free of "
                f"{self.memory_budget / 2**30:.1f}): lower {budget.advice(cost, settings)}",
                job_id,
            )
        job = Job(client, job_id, msg.header["prompt"], image, mask, settings, held=cost.held)
        job.previews = msg.header["previews"]
        job.refine_tiles, job.total = planned.refine_tiles, planned.total
        position = self._queue.add(job)
        accepted = {"job": job_id, "position": position, "total": job.total,
                    "refine_tiles": job.refine_tiles, "plan": planned.to_json()}  # fmt: skip
        self._send(client, protocol.encode("accepted", accepted))
        fine = f", refined over {job.refine_tiles} tiles a step" if job.refine_tiles else ""
        self.log(f"job {job_id}: queued at {position}, {image.shape[1]}x{image.shape[0]}{fine}")

    def _record(self, event: str, job: Job, **details: Any) -> None:
        entry = {"event": event, "job": job.id, "step": job.step, "t": time.monotonic()}
        self.history.append({**entry, **details})

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

    def _end(self, job: Job, state: str, reply: list | None = None) -> None:
        """A running job's end: it leaves the queue and gets its one answer (`reply`, or for a
        cancelled job the cancel's)."""
        self._queue.finish(job, state)
        self._finished(job, state, self._cancelled(job) if state == CANCELLED else reply)
        self.step_times.save()  # its steps' figure, once the job has its answer

    def _finished(self, job: Job, state: str, reply: list) -> None:
        job.state = state
        self._record(state, job, reason=job.cancel_reason)
        why = f" ({job.cancel_reason})" if job.cancel_reason else ""
        self.log(f"job {job.id}: {state} at step {job.step}/{job.total}{why}")
        self._send(job.client, reply)

    def _read_disconnects(self) -> None:
        while self._monitor.poll(0):
            recv_monitor_message(self._monitor)
            self._probe_until = time.monotonic() + _PROBE_S

    def _probe_clients(self) -> None:
        """After a disconnect: a client with jobs that a pong cannot reach is gone."""
        now = time.monotonic()
        if now > self._probe_until or now - self._probed < _TICK_MS / 2000:
            return
        self._probed = now
        for client in {j.client for j in self._queue.active()}:
            if not self._send(client, self._pong()):
                for job in self._queue.active():
                    if job.client == client:
                        self._cancel(job, "disconnected")

    def _expire_silent_clients(self) -> None:
        now = time.monotonic()
        for job in self._queue.active():
            if now - self._seen.get(job.client, 0.0) > self.keepalive_timeout:
                self._cancel(job, "keepalive")
        clients = {j.client for j in self._queue.active()}
        self._seen = {
            c: t for c, t in self._seen.items() if c in clients or now - t < self.keepalive_timeout
        }

    def _watch_worker(self) -> None:
        """A worker that died (it never should) fails its job and is replaced."""
        if self._worker.is_alive():
            return
        for job in list(self._queue.running):  # the worker's one job
            self._end(job, FAILED, protocol.error(protocol.INTERNAL, "worker died", job.id))
        self.log("the worker thread died: starting another")
        self._start_worker()

    def _dispatch(self) -> None:
        if self._deadline is not None:  # stopping: nothing new starts
            return
        while (job := self._queue.start_next()) is not None:
            self._record("start", job)
            self._begin(job)

    def _begin(self, job: Job) -> None:
        """Where a job runs: the worker thread (engine/cluster.py: a Ray Serve replica)."""
        self._inbox.put(job)

    def _read_events(self) -> None:
        try:
            while self._wake.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                kind, job, reply = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                self._send(job.client, reply)
            else:
                self._end(job, kind, reply)

    # -- worker thread -----------------------------------------------------------------------

    def _notify(self, kind: str, job: Job, reply: list | None) -> None:
        self._events.put((kind, job, reply))
        try:
            self._wake_send.send(b"!")
        except (BlockingIOError, OSError):  # wake-ups pending (or closing): all get drained
            pass

    def _work(self) -> None:
        if hasattr(signal, "pthread_sigmask"):  # SIGINT/SIGTERM go to the socket thread only
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        while (job := self._inbox.get()) is not None:
            try:
                kind, reply = self._run(job)
            except Exception as e:  # a bug: still the job's one answer, and the worker lives
                self.log(f"job {job.id} failed: {traceback.format_exc()}")
                reply = protocol.error(protocol.INTERNAL, f"engine error: {e}", job.id)
                kind = FAILED
            self._notify(kind, job, reply)

    def _run(self, job: Job) -> tuple[str, list | None]:
        """The job's terminal message, whatever happens in preparing, sampling, ranking or
        encoding; a cancel is seen before every UNet forward and between the other phases."""

        step_time = self.step_times.for_job(job.settings, job.refine_tiles)

        def check() -> None:
            if job.cancel.is_set():
                raise Cancelled

        shown = {"step": 0, "t": -protocol.PREVIEW_INTERVAL}  # the last preview sent

        def on_step(done: int, total: int, previews: Callable) -> None:
            job.step, job.total = done, total
            step_time(done)
            check()
            progress: dict[str, Any] = {"job": job.id, "step": done, "total": total}
            frames: list[Pixels] = []
            asked, now = job.previews, time.monotonic()
            if (
                asked
                and done - shown["step"] >= asked["every"]
                and now - shown["t"] >= protocol.PREVIEW_INTERVAL
            ):
                shown.update(step=done, t=now)
                shown_now = previews(asked["max_side"])
                progress["previews"], frames = self._previews(shown_now)
                box = shown_now[0].box
                progress["box"] = {"x": box.x, "y": box.y, "width": box.width, "height": box.height}
                self._record("preview", job, t=now)
            self._notify("progress", job, protocol.encode("progress", progress, frames))

        s = job.settings
        try:
            check()
            variants = run_edit(self.models, job.image, job.mask, job.prompt, s, on_step, check)
            check()
            return DONE, self._result(job, variants)
        except Cancelled:
            return CANCELLED, None
        except region.RegionError as e:
            return FAILED, protocol.error(protocol.BAD_INPUT, str(e), job.id)
        except Diverged as e:
            self.log(f"job {job.id}: {e}")
            return FAILED, protocol.error(protocol.NON_FINITE, str(e), job.id)
        except devices.OUT_OF_MEMORY:
            gc.collect()
            devices.free_cached_memory(self.models.device)
            self.log(f"job {job.id}: out of memory")
            message = (
                f"out of memory during the edit: lower variants ({s.variants}) or augmentations "
                f"({s.augmentations}), or free memory on the engine's machine"
            )
            return FAILED, protocol.error(protocol.OUT_OF_MEMORY, message, job.id)
        except Exception as e:
            self.log(f"job {job.id} failed: {traceback.format_exc()}")
            return FAILED, protocol.error(protocol.INTERNAL, f"the edit failed: {e}", job.id)

    @staticmethod
    def _previews(shown: list[preview.Preview]) -> tuple[list[dict], list[Pixels]]:
        """A progress message's `previews` entries and their PNG frames."""
        entries = [{"variant": p.variant, "seed": p.seed, "distance": p.distance} for p in shown]
        frames = [
            Pixels(p.rgba.shape[1], p.rgba.shape[0], "PNG", preview.encode_png(p.rgba),
                   name=f"preview-{p.variant}")
            for p in shown
        ]  # fmt: skip
        return entries, frames

    def _result(self, job: Job, variants: list) -> list:
        frames = [
            Pixels(
                v.box.width,
                v.box.height,
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
                "width": v.box.width,
                "height": v.box.height,
                "distance": float(v.distance),
                "seed": v.seed,
            }
            for v in variants
        ]
        fields = {"job": job.id, "models": self.models.label, "variants": entries}
        return protocol.encode("result", fields, frames)


def handle_signals(server: Server) -> None:
    """SIGINT and SIGTERM stop the engine (every job answered); a second one exits at once."""

    def on_signal(*_: object) -> None:
        if server.stopping:  # the second Ctrl+C: the user means it
            os.write(2, b"second signal: exiting now\n")
            os._exit(1)
        server.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def options(args: Any, curve: CurveKeys | None) -> dict[str, Any]:
    """`Server`'s options from `serve`'s arguments (a cluster's front end takes the same)."""
    limits = Limits(
        max_side=args.max_side, max_queue=args.max_queue, max_client_queue=args.max_client_queue
    )
    out = {"limits": limits, "keepalive_timeout": args.keepalive_timeout, "curve": curve}
    if args.step_times != "off":
        out["step_file"] = Path(args.step_times or weights.state_dir() / FILE_NAME)
    if args.memory_budget:
        out["memory_budget"] = int(args.memory_budget * 2**30)
    return out


def start(server: Server, where: str) -> None:
    """Bind, stop on SIGINT/SIGTERM, and say it is ready (what scripts and tests wait for)."""
    endpoint = server.bind()
    handle_signals(server)
    secured = ", CURVE" if server.curve else ""
    print(f"engine ready at {endpoint} ({server.models.label} on {where}{secured})", flush=True)


def serve(args: Any) -> int:
    """`python -m engine serve`: load the models, bind, answer until SIGINT or SIGTERM."""
    from engine import keys
    from engine.models import load_models

    curve = None
    if args.curve or not is_loopback(args.endpoint):
        curve = keys.load_server_keys(Path(args.keys) if args.keys else default_key_dir())
    check_endpoint(args.endpoint, curve)  # before minutes of model loading
    if args.cluster:  # the jobs run on Ray Serve replicas; the front end loads no models
        try:
            from engine.cluster import serve_cluster
        except ModuleNotFoundError as e:
            raise ValueError(
                f"--cluster needs Ray Serve ({e}): `python install.py --cluster`, or "
                "`pip install '.[cluster]'`"
            ) from None
        return serve_cluster(args, curve)
    models = load_models(
        args.model, clip=args.clip, unet_checkpoint=args.unet_checkpoint, device=args.device
    )
    server = Server(models, args.endpoint, **options(args, curve))
    start(server, str(models.device))
    server.log(f"memory budget {server.memory_budget / 2**30:.1f} GiB, instance {server.instance}")
    server.run()
    print("engine stopped", flush=True)
    return 0
