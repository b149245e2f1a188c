"""The single-process executor: one worker thread runs the jobs one at a time with the models
of this process's pool (loaded and evicted by that thread, engine/serve/pool.py). It owns no
socket (the server's socket thread does), so nothing it does can stop the server's ZeroMQ context
from closing; it blocks SIGINT and SIGTERM, which go to the socket thread. A worker that dies (it
never should) fails its job and is replaced."""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from engine.serve import Report
from engine.serve.jobs import FAILED, Job
from engine.serve.pool import Pool
from engine.serve.runner import Runner
from engine.shared import protocol


class LocalExecutor:
    """engine/serve: an Executor, here; a cluster replica runs its jobs with one too."""

    slots = 1  # one worker, one job at a time on the device
    hello: dict[str, Any] = {}  # nothing to add

    def __init__(self, pool: Pool, *, result_fields: dict[str, Any] | None = None) -> None:
        """`pool`: the models, loaded by the worker as its jobs need them; `result_fields`:
        what the result's header adds (runner.py)."""
        self.models, self._result_fields = pool, result_fields
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._job: Job | None = None  # the worker's, until it has reported its end
        self._worker: threading.Thread | None = None

    def start(self, report: Report, log: Callable[[str], None]) -> None:
        self._report, self.log = report, log
        self.runner = Runner(self.models, log, result_fields=self._result_fields)
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._worker.start()

    def begin(self, job: Job) -> None:
        self._inbox.put(job)

    def cancel(self, job: Job) -> None:
        job.cancel.set()  # the runner checks it before every forward

    def watch(self) -> str | None:
        if self._worker is None or self._worker.is_alive():
            return None
        if self._job is not None:
            error = protocol.error(protocol.INTERNAL, "worker died", self._job.id)
            self._report(FAILED, self._job, error)
            self._job = None
        self.log("the worker thread died: starting another")
        self.start(self._report, self.log)
        return None

    def close(self) -> None:
        self._inbox.put(None)

    def _work(self) -> None:
        if hasattr(signal, "pthread_sigmask"):  # SIGINT/SIGTERM go to the socket thread only
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        while (job := self._inbox.get()) is not None:
            self._job = job
            kind, reply = self.runner.run(job, partial(self._report, "progress", job))
            self._report(kind, job, reply)
            self._job = None
