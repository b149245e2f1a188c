"""The engine's front: one ROUTER socket, admission, the job queue, liveness and cancel.

The socket thread is the only one touching ZeroMQ: it answers hello/status/cancel/ping at once,
admits each submit against the limits, the memory budget and the time limit (from the method's
plan of the job) before queueing it, forwards the executor's progress to the submitting client
only, and cancels the jobs of clients that are gone: at once when the ROUTER's monitor reports a
disconnect and a probe finds the client unreachable (GIMP kills a cancelled plug-in), else when
their keep-alives stop (a host that hangs). Jobs run on an executor (engine/serve: `Executor`; a
worker thread here, Ray Serve replicas in a cluster), round-robin across clients, which reports
back through a queue plus a socketpair wake-up, so the socket thread sleeps in one poll. Every
job the engine accepts gets exactly one terminal message (result, error or cancelled), whatever
fails: the first end the server hears of a job is its answer, and later words of it are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import queue
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

from engine import __version__, region
from engine.keys import CurveKeys
from engine.methods import Description, Estimate, Plan
from engine.serve import Executor
from engine.serve.jobs import CANCELLED, FAILED, QUEUED, Job, JobQueue
from engine.serve.pool import Unavailable, amount
from engine.shared import estimate, protocol, request
from engine.shared.protocol import Limits, Pixels, ProtocolError, is_loopback
from engine.shared.request import Settings
from engine.steptime import StepTimes

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
KEEPALIVE_INTERVAL = 1.0  # what the engine asks clients for, in seconds
TIME_LIMIT = "time limit"  # the cancel reason of a job that ran past --max-job-minutes
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
        executor: Executor,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        limits: Limits | None = None,
        keepalive_timeout: float = 5.0,
        memory_budget: int | None = None,
        max_job_seconds: float | None = None,
        shutdown_grace: float = 10.0,
        curve: CurveKeys | None = None,
        log: Callable[[str], None] | None = None,
        step_file: Path | None = None,
    ) -> None:
        """`memory_budget`: bytes for a job's model and its peak plus what waiting jobs hold
        (default: the executor's models', engine/serve/pool.py). `max_job_seconds`:
        a job estimated longer is refused, one running longer ends with an error (None: no
        limit). `shutdown_grace`: how long a stop waits for the running job to reach its next
        cancel check. `step_file`: where the measured step times outlive the engine (None:
        they do not)."""
        check_endpoint(endpoint, curve)
        self.executor, self.endpoint, self.curve = executor, endpoint, curve
        self.models = executor.models  # what admission plans and costs the jobs with
        self.limits = limits or Limits()
        self.keepalive_timeout = keepalive_timeout
        if memory_budget is not None:
            self.memory_budget = memory_budget
        self.max_job_seconds = max_job_seconds
        self.shutdown_grace = shutdown_grace
        self.instance = uuid.uuid4().hex[:16]  # tells a client this engine from a restarted one
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.history: deque[dict[str, Any]] = deque(maxlen=1000)  # job events, for tests
        # announced in hello (the plug-ins' time estimates), measured from the progress here
        self._step_file, self._step_times = step_file, {}
        self._timers: dict[Job, Callable[[int], None]] = {}  # running job -> its step timer
        self.lost: str | None = None  # why the executor can run no more jobs
        self._queue = JobQueue(executor.slots)
        self._seen: dict[bytes, float] = {}  # client -> monotonic time of its last message
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # executor -> socket thread
        self._stop = threading.Event()
        self._deadline: float | None = None  # set when a stop begins
        self._probe_until = 0.0  # clients with jobs are probed until then (after a disconnect)
        self._probed = 0.0  # when they last were
        self._ctx: zmq.Context | None = None

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
        self.executor.start(self._report, self.log)
        return self.endpoint

    def stop(self) -> None:
        """Ask `run` to return (any thread, or a signal handler): the running job is cancelled
        at its next check, every client told, and `run` returns within `shutdown_grace`."""
        self._stop.set()

    @property
    def memory_budget(self) -> int:
        """Bytes for the resident models plus the jobs: the pool evicts to keep within it."""
        return self.models.budget

    @memory_budget.setter
    def memory_budget(self, value: int) -> None:
        self.models.budget = value

    def step_times(self, model: str | None = None) -> StepTimes:
        """The step times measured for `model`'s jobs (the default's: what hello announces)."""
        model = model or self.models.default
        if model not in self._step_times:
            key = self.models.about(model).step_key
            self._step_times[model] = StepTimes(key=key, path=self._step_file, log=self.log)
        return self._step_times[model]

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
                self._watch_executor()
                self._enforce_time_limit()
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
        self.executor.close()
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
        for _ in range(100):  # then let the executor's events through
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            client = parts[0].bytes
            self._seen[client] = time.monotonic()
            try:
                self._handle(
                    client,
                    protocol.decode_request(
                        [p.buffer for p in parts[1:]],
                        self.limits,
                        self.models.methods(),
                        self.models.default,
                    ),
                )
            except ProtocolError as e:
                self._send(client, protocol.error(e.code, str(e), e.job))
            except Exception as e:  # a bug here must not take the engine down
                self.log(f"internal error: {traceback.format_exc()}")
                self._send(client, protocol.error(protocol.INTERNAL, f"engine error: {e}"))
            # a client waits for the answer without a keep-alive: its silence starts now (the
            # plan of a large selection takes seconds)
            self._seen[client] = time.monotonic()

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
        """The engine, its models (`available`) and the default's facts, which a job naming no
        model gets: its label (`models`), method, the settings it takes, canvas, step times."""
        default = self.models.default
        about = self.models.about(default)
        return {
            "engine": __version__,
            "instance": self.instance,
            "available": self.models.listing(),
            "default": default,
            "memory_budget": self.memory_budget,
            "models": about.label,
            "method": about.method,
            "settings": list(request.taken_by(about.method)),  # what a plug-in shows
            "device": str(about.device),
            "image_size": about.image_size,
            "limits": self.limits.to_json(),
            "keepalive": {"interval": KEEPALIVE_INTERVAL, "timeout": self.keepalive_timeout},
            "queue": len(self._queue),
            "step_seconds": self.step_times(default).to_json(),
            **self.executor.hello,
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
        settings, model = msg.header["settings"], msg.header["model"]  # checked by the schema
        try:
            about = self.models.about(model)
        except Unavailable as e:
            raise ProtocolError(protocol.MODEL_UNAVAILABLE, str(e), job_id) from None
        image, mask = (to_array(p) for p in msg.frames)
        try:
            region.check_inputs(image, mask)  # now, not after the queue
        except region.RegionError as e:
            raise ProtocolError(protocol.BAD_INPUT, str(e), job_id) from None
        try:
            planned = about.plan(mask, settings)
        except request.SettingError as e:  # one the model cannot take (lcm without LCM weights)
            raise ProtocolError(protocol.BAD_FIELD, str(e), job_id) from None
        cost = about.memory(image.shape, mask, planned)
        self._check_memory(model, about, cost, settings, job_id)
        if self.max_job_seconds is not None:
            self._check_time(model, settings, planned, job_id)
        job = Job(client, job_id, msg.header["prompt"], image, mask, settings, model=model,
                  held=cost.held, cost=cost.total)  # fmt: skip
        job.previews = msg.header["previews"]
        job.plan, job.refine_tiles, job.total = planned, planned.refine_tiles, planned.total
        position = self._queue.add(job)
        accepted = {"job": job_id, "position": position, "total": job.total,
                    "refine_tiles": job.refine_tiles, "plan": planned.to_json()}  # fmt: skip
        self._send(client, protocol.encode("accepted", accepted))
        fine = f", refined over {job.refine_tiles} tiles a step" if job.refine_tiles else ""
        self.log(f"job {job_id}: queued at {position}, {image.shape[1]}x{image.shape[0]}{fine}")

    def _check_memory(
        self, model: str, about: Description, cost: Estimate, settings: Settings, job: str | None
    ) -> None:
        """Refuse a job whose model and peak do not fit the budget, or not beside what the
        waiting jobs hold (the other models are evicted for it)."""
        size, budget = self.models.size(model), self.memory_budget
        if size + cost.total > budget:
            what = "this model alone" if size > budget else "this edit on this model"
            raise ProtocolError(
                protocol.LIMIT,
                f"{what} needs about {amount(size + cost.total)} ({model} {amount(size)} + the "
                f"edit {amount(cost.total)}), over the engine's memory budget of "
                f"{amount(budget)}: lower {about.advice(cost, settings)}, serve with a larger "
                "--memory-budget, or use a smaller model",
                job,
            )
        held = sum(j.held for j in self._queue.waiting)
        if size + cost.total + held > budget:
            raise ProtocolError(
                protocol.LIMIT,
                f"this edit needs about {amount(cost.total)} beside {model} ({amount(size)}), "
                f"over the engine's memory budget ({amount(budget - held)} free of "
                f"{amount(budget)}): lower {about.advice(cost, settings)}",
                job,
            )

    def _check_time(
        self, model: str, settings: Settings, planned: Plan, job_id: str | None
    ) -> None:
        """Refuse a job whose time, estimated from the steps measured so far as the plug-ins
        estimate it (engine/shared/estimate.py), is over the limit; none measured: admitted."""
        info = {"step_seconds": self.step_times(model).to_json()}
        values = dataclasses.asdict(settings)  # the schema derives the start again from them
        seconds = estimate.plan(info, values, planned.total, planned.refine_tiles).seconds
        if seconds is not None and seconds > self.max_job_seconds:
            raise ProtocolError(
                protocol.LIMIT,
                f"this edit would take about {seconds / 60:.1f} min ({planned.total} steps at the "
                f"pace this engine measured), over its limit of {self.max_job_seconds / 60:g} min "
                "a job (max-job-minutes): lower steps, strength or variants "
                f"({settings.variants}), or turn refine off",
                job_id,
            )

    def _record(self, event: str, job: Job, **details: Any) -> None:
        entry = {"event": event, "job": job.id, "step": job.step, "t": time.monotonic()}
        if job.replica:
            entry["replica"] = job.replica
        self.history.append({**entry, **details})

    def _cancel(self, job: Job, reason: str) -> None:
        if job.cancel_reason:
            return
        job.cancel_reason = reason
        if job.state == QUEUED:
            job.cancel.set()
            self._queue.remove(job)
            self._finished(job, CANCELLED, self._cancelled(job))
        else:
            self.executor.cancel(job)  # it stops after the step it is in
            self._record("cancel", job, reason=reason)

    def _cancelled(self, job: Job) -> list:
        """A stopped job's answer: `cancelled`, or for one past the time limit an error."""
        if job.cancel_reason == TIME_LIMIT:
            message = (
                f"the job ran past this engine's limit of {self.max_job_seconds / 60:g} min a "
                f"job (max-job-minutes) at step {job.step} of {job.total}: lower steps, "
                "strength or variants, or turn refine off"
            )
            return protocol.error(protocol.LIMIT, message, job.id)
        fields = {"job": job.id, "reason": job.cancel_reason, "step": job.step}
        return protocol.encode("cancelled", fields)

    def _end(self, job: Job, state: str, reply: list | None = None) -> None:
        """A running job's end: it leaves the queue and gets its one answer (`reply`, or for a
        stopped job the cancel's)."""
        if state == CANCELLED and job.cancel_reason == TIME_LIMIT:
            state = FAILED
        self._queue.finish(job, state)
        self._timers.pop(job, None)
        self._finished(job, state, self._cancelled(job) if reply is None else reply)
        if job.model in self._step_times:
            self._step_times[job.model].save()  # its steps' figure, once the job has its answer

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

    def _watch_executor(self) -> None:
        """An executor that can run no more jobs: every job fails saying so, and the engine
        stops."""
        why = self.executor.watch()
        if why is None or self.lost:
            return
        self.lost = why
        self.log(f"{why}: failing every job and stopping")
        for job in self._queue.active():
            error = protocol.error(protocol.LOST, f"the engine {why}: the job is lost", job.id)
            if job in self._queue.running:
                self.executor.cancel(job)
                self._end(job, FAILED, error)
            else:
                self._queue.remove(job)
                self._finished(job, FAILED, error)
        self.stop()

    def _enforce_time_limit(self) -> None:
        """A job running past the limit is stopped at its next check, and answered an error."""
        if self.max_job_seconds is None:
            return
        now = time.monotonic()
        for job in self._queue.running:
            if job.started is not None and now - job.started > self.max_job_seconds:
                self._cancel(job, TIME_LIMIT)

    def _dispatch(self) -> None:
        if self._deadline is not None:  # stopping: nothing new starts
            return
        while (job := self._queue.start_next()) is not None:
            job.started = time.monotonic()
            times = self.step_times(job.model)
            self._timers[job] = times.for_job(job.settings, job.refine_tiles)
            self._record("start", job)
            self.executor.begin(job)

    def _report(self, kind: str, job: Job, reply: list | None) -> None:
        """The executor's word of a job (any thread): to the socket thread, which it wakes."""
        self._events.put((kind, job, reply))
        try:
            self._wake_send.send(b"!")
        except (BlockingIOError, OSError):  # wake-ups pending (or closing): all get drained
            pass

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
            if job not in self._queue.running:  # answered already (lost, abandoned): dropped
                continue
            if kind == "progress":
                header = json.loads(reply[0])
                self._timers[job](header["step"])
                if "previews" in header:
                    self._record("preview", job)
                self._send(job.client, reply)
            else:
                self._end(job, kind, reply)
