"""Several GPUs and machines behind the one endpoint: the engine's jobs on Ray Serve.

`python -m engine serve --cluster ADDRESS|auto` binds the same ZeroMQ endpoint with the same
protocol and keys, and the server (server.py) keeps everything it does on its socket thread:
limits, the memory budget, the queue with its per-client fairness, cancel, orphans, keep-alive,
shutdown. Only the executor changes: `ClusterExecutor` sends each job to a Ray Serve deployment
whose replicas (one per GPU through `num_gpus`; on CPU, `--replicas N`) each hold a pool of the
engine's models (pool.py: checked at start, loaded and evicted within the replica's budget) and
run the jobs with the single-process engine's own executor (local.py). Serve's model
multiplexing routes a job to a replica that served its model last, where it is likely loaded. A
replica streams the job's messages back as encoded frames, forwarded as they are (progress carries
whatever it carries), the result tagged with the replica's name. A cancel cancels the Serve
request, which the replica sees as its job's cancel, so the job stops at its next check. A
replica that dies fails its job with `lost` (the other jobs go on, Serve starts another); a
front end that loses the cluster has the server fail every job with `lost` and stop.

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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.handle import DeploymentHandle

from engine import devices
from engine.catalogue import Entry
from engine.methods import loading
from engine.serve import Report
from engine.serve.jobs import CANCELLED, FAILED, Job
from engine.serve.local import LocalExecutor
from engine.serve.pool import Pool
from engine.shared import protocol

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


# -- the replica -------------------------------------------------------------------------------


# one job at a time on a device, as in one process; a replica Serve stops (the application
# deleted or redeployed) gives its edit, minutes long, only a moment: that job is lost
@serve.deployment(max_ongoing_requests=1, graceful_shutdown_timeout_s=2)
class EditReplica:
    """Holds a pool of the models `entries` (each loaded with loading.load_entry(entry,
    **options, device=device)) within `budget` bytes (None: 80% of its device's free memory),
    and runs the jobs sent to it on a local executor, each job's reports fed to its stream."""

    def __init__(
        self,
        entries: list[Entry],
        options: dict[str, Any],
        budget: int | None,
        device: str,
        threads: int,
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        dev = devices.resolve(device)
        budget = budget or int(0.8 * devices.free_bytes(dev))
        load = partial(loading.load_entry, **options, device=device)
        # the replica's log to stderr: Ray forwards its stdout to the engine's, which scripts
        # read for the ready line
        log = partial(print, file=sys.stderr, flush=True)
        self.pool = Pool(entries, load, budget=budget, log=log, remote=True)
        self.pool.survey()
        name = serve.get_replica_context().replica_tag
        node = ray.util.get_node_ip_address()
        self.replica = Replica(name, os.getpid(), node, str(dev))
        self.local = LocalExecutor(self.pool, result_fields={"replica": name})
        self.sinks: dict[Job, Callable[[str, Any], None]] = {}
        self.local.start(self._report, log)

    def _report(self, kind: str, job: Job, reply: list | None) -> None:
        sink = self.sinks.get(job)
        if sink is not None:  # else its stream is gone: the job was cancelled, nobody listens
            sink(kind, reply)

    def describe(self) -> Pool:
        """The pool as the front end admits with it: its models' descriptions, none loaded."""
        return self.pool.remote()

    # Serve remembers which replica served which model id, and routes a job there; the pool
    # keeps or evicts by bytes, so Serve's own count of models never evicts anything
    @serve.multiplexed(max_num_models_per_replica=1000)
    async def _served(self, model: str) -> str:
        return model

    async def run(self, request: dict[str, Any]) -> AsyncIterator[tuple[str, Any]]:
        """("start", Replica), ("progress", frames)..., then (done|failed|cancelled, frames)."""
        await self._served(serve.get_multiplexed_model_id())
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(b"", **request)
        self.sinks[job] = lambda *e: loop.call_soon_threadsafe(events.put_nowait, e)
        self.local.begin(job)
        ended = False
        try:
            yield "start", self.replica
            while not ended:
                kind, reply = await events.get()
                ended = kind != "progress"
                yield kind, reply
        finally:  # cancelled, or the stream closed: the job stops within a step
            if not ended:
                self.local.cancel(job)
                while (await events.get())[0] == "progress":  # free once it stopped
                    pass
            del self.sinks[job]


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
        paths = [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]
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
    entries: list[Entry],
    options: dict[str, Any],
    *,
    budget: int | None = None,
    replicas: int | None = None,
    device: str = "auto",
    name: str = APP,
) -> tuple[DeploymentHandle, int]:
    """Start the replicas, each with a pool of the models `entries` (loaded with `options`,
    within `budget` bytes: None, 80% of its device's free memory), and wait until they are
    ready: one a free GPU of the cluster, or `replicas` on CPU, each with an equal share of the
    free cores."""
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
        actor, threads = {"num_cpus": 1, "num_gpus": 1}, 0
    else:
        threads = max(1, cpus // n)
        actor = {"num_cpus": threads, "num_gpus": 0}
        device = "cpu" if device == "auto" else device  # a GPU Ray does not count stays asked
    app = EditReplica.options(num_replicas=n, ray_actor_options=actor).bind(
        entries, options, budget, device, threads
    )
    return serve.run(app, name=name, route_prefix=None), n


def release(name: str = APP) -> None:
    """The engine has stopped: its replicas free their devices, and it leaves the cluster."""
    serve.delete(name)
    ray.shutdown()


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
        """Why the cluster is lost ("the engine " + it words the jobs' error), else None."""
        if self.gone is not None:
            return f"lost its Ray cluster ({self.gone})"
        silent = time.monotonic() - self.heard
        if silent > _PATIENCE_S:
            return f"lost its Ray cluster (no answer from the cluster for {silent:.0f} s)"
        return None


# -- the front end -----------------------------------------------------------------------------


class ClusterExecutor:
    """Runs the server's jobs on the replicas behind `handle`, `slots` of them at once."""

    def __init__(self, handle: DeploymentHandle, slots: int, *, app: str = APP) -> None:
        # the replicas' models as admission sees them, with the free memory a replica's device
        # had (the front end cannot ask it) and the step times' keys (that device's precision)
        self.models: Pool = handle.describe.remote().result()
        self.slots, self.hello = slots, {"replicas": slots}
        self.handle = handle.options(stream=True)
        self._lock = threading.Lock()
        self._streams: dict[Job, Any] = {}  # running job -> its Serve response
        self.ran_on: weakref.WeakKeyDictionary[Job, Replica] = weakref.WeakKeyDictionary()
        self._watch = _Watch(app)

    def start(self, report: Report, log: Callable[[str], None]) -> None:
        self._report, self.log = report, log
        self._watch.start()

    def begin(self, job: Job) -> None:
        threading.Thread(
            target=self._stream, args=(job,), name=f"job-{job.id}", daemon=True
        ).start()

    def cancel(self, job: Job) -> None:
        job.cancel.set()  # seen by a send under way
        with self._lock:
            stream = self._streams.get(job)
        if stream is not None:  # off this thread: a cancel may wait for the request's routing
            threading.Thread(target=stream.cancel, daemon=True).start()

    def watch(self) -> str | None:
        return self._watch.lost()

    def close(self) -> None:
        self._watch.closed.set()

    def _stream(self, job: Job) -> None:
        """Runs the job on a replica, forwarding its messages; always ends with one report."""
        request = {"id": job.id, "prompt": job.prompt, "image": job.image, "mask": job.mask,
                   "settings": job.settings, "model": job.model, "cost": job.cost,
                   "plan": job.plan, "total": job.total, "refine_tiles": job.refine_tiles,
                   "previews": job.previews}  # fmt: skip
        try:
            for attempt in range(1, _RETRIES + 1):
                replica = None
                try:
                    for kind, payload in self._send_job(job, request):
                        if kind == "start":
                            replica = payload
                            self._placed(job, replica)
                        else:
                            self._forward(job, kind, payload)
                    message = "the replica's stream ended without an answer"  # never, but a bug
                    error = protocol.error(protocol.INTERNAL, message, job.id)
                    return self._report(FAILED, job, error)
                except (TaskCancelledError, asyncio.CancelledError):
                    return self._report(CANCELLED, job, None)
                except RayActorError as e:  # the replica's process died (or cannot be reached)
                    if replica is None and attempt < _RETRIES and not job.cancel.is_set():
                        continue  # routed to a dead replica before Serve knew: nothing ran
                    return self._report(FAILED, job, self._died(job, replica, e))
                except Exception as e:  # a bug, or a cluster gone: still the job's one report
                    self.log(f"job {job.id}: the cluster failed it: {e!r}")
                    error = protocol.error(
                        protocol.INTERNAL, f"the cluster failed the job: {e}", job.id
                    )
                    return self._report(FAILED, job, error)
        finally:
            with self._lock:
                self._streams.pop(job, None)

    def _send_job(self, job: Job, request: dict[str, Any]):
        stream = self.handle.options(multiplexed_model_id=job.model).run.remote(request)
        with self._lock:
            self._streams[job] = stream
        if job.cancel.is_set():  # cancelled while it was being sent
            self.cancel(job)
        return stream

    def _placed(self, job: Job, replica: Replica) -> None:
        job.replica = replica.name
        self.ran_on[job] = replica
        self.log(f"job {job.id}: running on {replica}")

    def _forward(self, job: Job, kind: str, reply: list | None) -> None:
        if kind == "progress":  # the step for status and cancel; the frames as they are
            header = json.loads(reply[0])
            job.step, job.total = header["step"], header["total"]
        self._report(kind, job, reply)

    def _died(self, job: Job, replica: Replica | None, e: RayActorError) -> list[bytes]:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        self.log(f"job {job.id}: {replica or 'its replica'} died: {type(e).__name__} {first}")
        where = f"the cluster replica running it ({replica})" if replica else "its replica"
        message = (
            f"the job was lost: {where} died mid-job; the cluster starts another: generate again"
        )
        return protocol.error(protocol.LOST, message, job.id)
