"""A job's life on the engine: queued -> running -> done | cancelled | failed.

The socket thread owns the queue and every state change; the worker thread only reads a running
job's inputs, counts its steps and watches its `cancel` event, which is how a cancel stops it
within one step.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"


class Cancelled(Exception):
    """Raised inside the edit's step callback to abort it."""


@dataclass(eq=False)
class Job:
    client: bytes  # the ROUTER identity of the submitting client
    id: str  # chosen by the client, unique among its active jobs
    prompt: str
    image: Any  # HxWx3|4 uint8 numpy array
    mask: Any  # HxW uint8 numpy array
    settings: Any  # engine.edit.EditSettings
    state: str = QUEUED
    step: int = 0
    total: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""  # client | keepalive | shutdown
    submitted: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[bytes, str]:
        return self.client, self.id

    def summary(self, position: int | None) -> dict[str, Any]:
        return {
            "job": self.id,
            "state": self.state,
            "position": position,
            "step": self.step,
            "total": self.total,
        }


class JobQueue:
    """Waiting jobs in submission order, plus the one running job."""

    def __init__(self) -> None:
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None

    def __len__(self) -> int:
        return len(self.waiting) + (self.running is not None)

    def find(self, client: bytes, job_id: str) -> Job | None:
        for job in self.active():
            if job.key == (client, job_id):
                return job
        return None

    def active(self) -> list[Job]:
        return ([self.running] if self.running else []) + list(self.waiting)

    def position(self, job: Job) -> int:
        """How many jobs run before this one (0: running or next)."""
        if job is self.running:
            return 0
        return list(self.waiting).index(job) + (self.running is not None)

    def add(self, job: Job) -> int:
        self.waiting.append(job)
        return self.position(job)

    def remove(self, job: Job) -> None:
        self.waiting.remove(job)

    def start_next(self) -> Job | None:
        if self.running is not None or not self.waiting:
            return None
        self.running = self.waiting.popleft()
        self.running.state = RUNNING
        return self.running

    def finish(self, state: str) -> Job | None:
        job, self.running = self.running, None
        if job is not None:
            job.state = state
        return job
