"""Several GPUs and machines behind the one endpoint: the engine's jobs on Ray Serve.

`python -m engine serve --cluster ADDRESS|auto` binds the same ZeroMQ endpoint with the same
protocol and keys, and the front end keeps everything `Server` does on the socket thread: limits,
the memory budget, the queue with its per-client fairness, cancel, orphans, keep-alive, shutdown.
Only where a job runs changes (`Server._begin`): each goes to a Ray Serve deployment whose
replicas load the models once (one replica per GPU through `num_gpus`; on CPU, `--replicas N`)
and run it with the single-process worker's own code (`Server._run`, in `_Runner`). A replica
streams the job's messages back as encoded frames, forwarded as they are (progress carries
whatever it carries), the result tagged with the replica's name. A cancel cancels the Serve
request, which the replica sees as its job's cancel, so the job stops at its next check.
A replica that dies fails its job with `lost` (the other jobs go on, Serve starts another); a
front end that loses the cluster fails every job with `lost` and stops.

Imported only with --cluster: the single-process engine needs nothing of Ray.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.handle import DeploymentHandle

from engine import budget
from engine.jobs import CANCELLED, FAILED, Job, JobQueue
from engine.models import Models
from engine.server import Server
from engine.shared import protocol
from engine.steptime import engine_key

APP = "blended-diffusion"  # the Serve application's name on the cluster
_WATCH_S = 1.0  # how often the front end asks the cluster how it is
_PATIENCE_S = 15.0  # silence after which the cluster counts as lost (Ray's driver gives 60)
_RETRIES = 3  # sends of a job that no replica started (it was routed to a dead one)


@dataclass(frozen=True)
class Replica:
    """Where a job ran: for the log, the result's `replica` field and a dead replica's error."""

    name: str  # Serve's replica id
    pid: int
    node: str  # the node's IP address
    device: str

    def __str__(self) -> str:
        return f"replica {self.name} (pid {self.pid} on {self.node}, {self.device})"


@dataclass(frozen=True)
class Described(budget.Facts):
    """What the front end knows of the replicas' models: the budget's facts, with the free
    memory a replica's device had after loading (the front end cannot ask it), hello's label
    and the key of the step times (engine/steptime.py: the replica's device and precision)."""

    label: str = ""
    step_key: dict[str, Any] = field(default_factory=dict)


# -- the replica -------------------------------------------------------------------------------


class _Runner(Server):
    """The single-process worker's code inside a replica: its worker thread runs `_run` (the
    edit, its error handling and result encoding), and `_notify` feeds each job's stream."""

    def __init__(self, models: Models, replica: Replica) -> None:
        super().__init__(models)
        self.replica = replica
        self.sinks: dict[Job, Any] = {}
        self._start_worker()

    def _notify(self, kind: str, job: Job, reply: list | None) -> None:
        sink = self.sinks.get(job)
        if sink is not None:  # else its stream is gone: the job was cancelled, nobody listens
            sink(kind, reply)

    def _result(self, job: Job, variants: list) -> list:
        head, *frames = super()._result(job, variants)
        header = json.loads(head) | {"replica": self.replica.name}
        return [json.dumps(header, separators=(",", ":")).encode(), *frames]


# one job at a time on a device, as in one process; a replica Serve stops (the application
# deleted or redeployed) gives its edit, minutes long, only a moment: that job is lost
@serve.deployment(max_ongoing_requests=1, graceful_shutdown_timeout_s=2)
class EditReplica:
    def __init__(
        self, model: str, clip: str | None, unet_checkpoint: str | None, device: str, threads: int
    ) -> None:
        import torch

        from engine.models import load_models

        if threads:
            torch.set_num_threads(threads)
        self.models = load_models(model, clip=clip, unet_checkpoint=unet_checkpoint, device=device)
        name = serve.get_replica_context().replica_tag
        node = ray.util.get_node_ip_address()
        self.replica = Replica(name, os.getpid(), node, str(self.models.device))
        self.runner = _Runner(self.models, self.replica)

    def describe(self) -> Described:
        free_gb = budget.available_bytes(self.models) / 2**30
        facts = vars(self.runner.facts) | {"free_gb": free_gb}
        return Described(**facts, label=self.models.label, step_key=engine_key(self.models))

    async def run(self, request: dict[str, Any]) -> AsyncIterator[tuple[str, Any]]:
        """("start", Replica), ("progress", frames)..., then (done|failed|cancelled, frames)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(b"", **request)
        job.total = job.settings.steps - job.settings.skip
        self.runner.sinks[job] = lambda *e: loop.call_soon_threadsafe(events.put_nowait, e)
        self.runner._inbox.put(job)
        ended = False
        try:
            yield "start", self.replica
            while not ended:
                kind, reply = await events.get()
                ended = kind != "progress"
                yield kind, reply
        finally:  # cancelled, or the stream closed: the job stops within a step
            if not ended:
                job.cancel.set()
                while (await events.get())[0] == "progress":  # free once it stopped
                    pass
            del self.runner.sinks[job]


# -- the cluster -------------------------------------------------------------------------------


def connect(
    address: str,
    *,
    num_cpus: int | None = None,
    object_store_mb: int | None = None,
    log_to_driver: bool = True,
) -> None:
    """Join the Ray cluster at `address` (`ray start --head` printed it), or with `auto` start
    one on this machine for the engine alone, its replicas importing this very engine."""
    if address == "auto":  # Ray's processes inherit the environment: the replicas find us
        paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        ray.init(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=object_store_mb and object_store_mb * 2**20,
            include_dashboard=False,
            log_to_driver=log_to_driver,
        )
    else:
        ray.init(address=address, log_to_driver=log_to_driver)
    serve.start(proxy_location="Disabled")  # jobs come through the handle, never over HTTP


def deploy(
    model: str,
    *,
    replicas: int | None = None,
    device: str = "auto",
    clip: str | None = None,
    unet_checkpoint: str | None = None,
    name: str = APP,
) -> tuple[DeploymentHandle, int]:
    """Start the replicas (each loads the models) and wait until they are ready: one a free GPU
    of the cluster, or `replicas` on CPU, each with an equal share of the free cores."""
    if name in serve.status().applications:  # left by an engine that died: its devices back
        serve.delete(name)
    resources = ray.available_resources()
    gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
    cpus = int(resources.get("CPU", 1))
    n = replicas or gpus or 1
    if n > (gpus or cpus):  # Serve would wait for them for ever
        kind = f"{gpus} GPUs" if gpus else f"{cpus} CPUs"
        raise ValueError(f"{n} replicas asked, the cluster has {kind} free: lower --replicas")
    if gpus:
        options, threads = {"num_cpus": 1, "num_gpus": 1}, 0
    else:
        threads = max(1, cpus // n)
        options = {"num_cpus": threads, "num_gpus": 0}
        device = "cpu" if device == "auto" else device  # a GPU Ray does not count stays asked
    app = EditReplica.options(num_replicas=n, ray_actor_options=options).bind(
        model, clip, unet_checkpoint, device, threads
    )
    return serve.run(app, name=name, route_prefix=None), n


class _Watch:
    """Asks the cluster how the application is, off the socket thread (a lost cluster can
    leave a call hanging): lost when it is gone or no answer came for `_PATIENCE_S`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.heard = time.monotonic()
        self.gone: str | None = None
        self.closed = threading.Event()

    def start(self) -> None:
        self.heard = time.monotonic()
        threading.Thread(target=self._watch, name="cluster-watch", daemon=True).start()

    def _watch(self) -> None:
        while self.gone is None and not self.closed.wait(_WATCH_S):
            try:
                app = serve.status().applications.get(self.name)
                if app is None or app.status == "DELETING":
                    self.gone = f"the application {self.name!r} is gone from the cluster"
                self.heard = time.monotonic()
            except Exception:  # the call failed: the silence decides
                pass

    def lost(self) -> str | None:
        silent = time.monotonic() - self.heard
        if self.gone is None and silent > _PATIENCE_S:
            return f"no answer from the cluster for {silent:.0f} s"
        return self.gone


# -- the front end -----------------------------------------------------------------------------


class ClusterServer(Server):
    """`Server` whose jobs run on the replicas behind `handle`, `slots` of them at once."""

    def __init__(
        self, handle: DeploymentHandle, slots: int, endpoint: str, *, app: str = APP, **options
    ) -> None:
        self.described: Described = handle.describe.remote().result()
        options.setdefault("memory_budget", int(0.8 * self.described.free_gb * 2**30))
        super().__init__(self.described, endpoint, **options)
        self.handle, self.app = handle.options(stream=True), app
        self._queue = JobQueue(slots)
        self._lock = threading.Lock()
        self._streams: dict[Job, Any] = {}  # running job -> its Serve response
        self._timers: dict[Job, Callable[[int], None]] = {}  # running job -> its step timer
        self._answered: weakref.WeakSet[Job] = weakref.WeakSet()  # terminal message sent
        self.ran_on: weakref.WeakKeyDictionary[Job, Replica] = weakref.WeakKeyDictionary()
        self.lost: str | None = None
        self._watch = _Watch(app)

    def _start_worker(self) -> None:
        self._watch.start()

    def _close(self) -> None:
        self._watch.closed.set()
        super()._close()

    def _watch_worker(self) -> None:
        """A lost cluster: every job fails saying so, and the engine stops."""
        why = self._watch.lost()
        if why is None or self.lost:
            return
        self.lost = why
        self.log(f"lost the cluster: {why}; failing every job and stopping")
        message = f"the engine lost its Ray cluster ({why}): the job is lost"
        for job in self._queue.active():
            error = protocol.error(protocol.LOST, message, job.id)
            if job in self._queue.running:
                self._notify(FAILED, job, error)
                self._cancel_stream(job)
            else:
                self._queue.remove(job)
                self._finished(job, FAILED, error)
        self._read_events()  # the running ones answered before the stop begins
        self.stop()

    def _hello(self) -> dict[str, Any]:
        return super()._hello() | {"replicas": self._queue.slots}

    def _step_key(self) -> dict[str, Any]:
        """The front end measures the steps (`_time`) and keeps them as `Server` does, under
        the key a replica gave: the models are loaded there, not here."""
        return self.described.step_key

    def _cancel(self, job: Job, reason: str) -> None:
        super()._cancel(job, reason)
        self._cancel_stream(job)

    def _cancel_stream(self, job: Job) -> None:
        with self._lock:
            stream = self._streams.get(job)
        if stream is not None:  # off this thread: a cancel may wait for the request's routing
            threading.Thread(target=stream.cancel, daemon=True).start()

    def _notify(self, kind: str, job: Job, reply: list | None) -> None:
        """Exactly one terminal message a job, whichever of its stream or a loss comes first."""
        with self._lock:
            if job in self._answered:
                return
            if kind != "progress":
                self._answered.add(job)
                self._streams.pop(job, None)
                self._timers.pop(job, None)
        super()._notify(kind, job, reply)

    def _begin(self, job: Job) -> None:
        threading.Thread(
            target=self._stream, args=(job,), name=f"job-{job.id}", daemon=True
        ).start()

    def _stream(self, job: Job) -> None:
        """Runs the job on a replica, forwarding its messages; always ends with one answer."""
        request = {"id": job.id, "prompt": job.prompt, "image": job.image, "mask": job.mask}
        request["settings"] = job.settings
        for attempt in range(1, _RETRIES + 1):
            replica = None
            try:
                for kind, payload in self._send_job(job, request):
                    if kind == "start":
                        replica = payload
                        self._placed(job, replica)
                    else:
                        self._forward(job, kind, payload)
                message = "the replica's stream ended without an answer"  # never, unless a bug
                return self._notify(FAILED, job, protocol.error(protocol.INTERNAL, message, job.id))
            except (TaskCancelledError, asyncio.CancelledError):
                return self._notify(CANCELLED, job, None)
            except RayActorError as e:  # the replica's process died (or cannot be reached)
                if replica is None and attempt < _RETRIES and not job.cancel.is_set():
                    continue  # routed to a dead replica before Serve knew: nothing ran
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self.log(
                    f"job {job.id}: {replica or 'its replica'} died: {type(e).__name__} {first}"
                )
                where = f"the cluster replica running it ({replica})" if replica else "its replica"
                message = (
                    f"the job was lost: {where} died mid-job; the cluster starts another: "
                    "generate again"
                )
                return self._notify(FAILED, job, protocol.error(protocol.LOST, message, job.id))
            except Exception as e:  # a bug, or a cluster gone: still the job's one answer
                self.log(f"job {job.id}: the cluster failed it: {e!r}")
                message = f"the cluster failed the job: {e}"
                return self._notify(FAILED, job, protocol.error(protocol.INTERNAL, message, job.id))

    def _send_job(self, job: Job, request: dict[str, Any]):
        stream = self.handle.run.remote(request)
        with self._lock:
            self._streams[job] = stream
        if job.cancel.is_set():  # cancelled while it was being sent
            self._cancel_stream(job)
        return stream

    def _placed(self, job: Job, replica: Replica) -> None:
        self.ran_on[job] = replica
        self.log(f"job {job.id}: running on {replica}")

    def _record(self, event: str, job: Job, **details: Any) -> None:
        if job in self.ran_on:
            details["replica"] = self.ran_on[job].name
        super()._record(event, job, **details)

    def _forward(self, job: Job, kind: str, reply: list | None) -> None:
        if kind == "progress":  # the header's step for status and cancel; the frames as they are
            header = json.loads(reply[0])
            job.step, job.total = header["step"], header["total"]
            self._time(job)
        self._notify(kind, job, reply)

    def _time(self, job: Job) -> None:
        """The step times hello announces, measured here from the progress messages."""
        if job not in self._timers:
            self._timers[job] = self.step_times.for_job(job.settings, job.refine_tiles)
        self._timers[job](job.step)


def serve_cluster(args: Any, curve: Any) -> int:
    """`python -m engine serve --cluster ADDRESS|auto`: replicas up, bind, answer until a
    signal or until the cluster is lost."""
    from engine.server import options, start

    connect(args.cluster)
    handle, n = deploy(
        args.model,
        replicas=args.replicas,
        device=args.device,
        clip=args.clip,
        unet_checkpoint=args.unet_checkpoint,
        name=args.app,
    )
    server = ClusterServer(handle, n, args.endpoint, app=args.app, **options(args, curve))
    start(server, f"{n} replicas, {server.described.device}")
    server.run()
    if server.lost:
        print(f"engine stopped: lost the cluster ({server.lost})", file=sys.stderr, flush=True)
        os._exit(1)  # Ray's own shutdown would wait for the cluster that is gone
    serve.delete(args.app)  # the replicas free their devices
    ray.shutdown()
    print("engine stopped", flush=True)
    return 0
