"""A job's life on the engine: queued -> running -> done | cancelled | failed.

The socket thread owns the queue and every state change; an executor (engine/serve/local.py,
cluster.py) only reads a running job's inputs, counts its steps and watches its `cancel` event,
which is how a cancel stops it within one model forward. Waiting jobs are served round-robin
across clients, so one client's full queue never starves another's job.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engine.methods import Plan
from engine.shared.request import Settings

QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"


class Cancelled(Exception):
    """Raised inside the method's step callback or check to abort it."""


@dataclass(eq=False)
class Job:
    client: bytes  # the ROUTER identity of the submitting client
    id: str  # chosen by the client, unique among its active jobs
    prompt: str
    image: Any  # HxWx3|4 uint8 numpy array
    mask: Any  # HxW uint8 numpy array
    settings: Settings
    model: str = ""  # the name of the model it runs on (the engine's default when it named none)
    state: str = QUEUED
    step: int = 0
    plan: Plan | None = None  # what admission planned and costed: what the run follows
    total: int = 0  # the steps of every pass
    refine_tiles: int = 0  # the forwards a refinement step makes (0: no refinement)
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""  # client | disconnected | keepalive | shutdown | time limit
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when it began running (monotonic)
    replica: str = ""  # where it runs, when the executor says (a cluster replica's name)
    held: int = 0  # bytes this job holds while it waits (its image and mask)
    cost: int = 0  # bytes at its peak, its model's weights apart (admission's estimate)
    previews: dict[str, int] | None = None  # submit's `previews`: every, max_side (None: off)

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
    """Waiting jobs, one line per client, plus the running ones (at most `slots`: one worker
    here, one per replica in a cluster). The next job is the first of the client served least
    recently (a client not served yet first, in order of its oldest job): round-robin, where a
    client that just arrived waits for no client that was just served."""

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        self.lines: dict[bytes, deque[Job]] = {}  # client -> its waiting jobs, in order
        self.served: dict[bytes, int] = {}  # client -> when it last started a job (a counter)
        self.starts = 0
        self.running: list[Job] = []
        # the waiting jobs' order and each one's place in it, worked out once per change (a
        # ping or a status naming every job asks for many positions)
        self._order: tuple[list[Job], dict[Job, int]] | None = None

    def __len__(self) -> int:
        return sum(map(len, self.lines.values())) + len(self.running)

    def _ordered(self) -> tuple[list[Job], dict[Job, int]]:
        if self._order is None:
            order = self._round_robin()
            self._order = order, {job: i for i, job in enumerate(order)}
        return self._order

    @property
    def waiting(self) -> list[Job]:
        """Waiting jobs in the order they will run (not to be changed: the queue's own)."""
        return self._ordered()[0]

    def _round_robin(self) -> list[Job]:
        lines = {c: list(line) for c, line in self.lines.items()}
        served, starts, order = dict(self.served), self.starts, []
        while lines:
            client = min(lines, key=lambda c: (served.get(c, -1), lines[c][0].submitted))
            order.append(lines[client].pop(0))
            starts += 1
            served[client] = starts
            if not lines[client]:
                del lines[client]
        return order

    def find(self, client: bytes, job_id: str) -> Job | None:
        for job in (*self.running, *self.lines.get(client, ())):
            if job.key == (client, job_id):
                return job
        return None

    def active(self) -> list[Job]:
        return self.running + self.waiting

    def count(self, client: bytes) -> int:
        """The client's active jobs, running or waiting."""
        running = sum(j.client == client for j in self.running)
        return len(self.lines.get(client, ())) + running

    def position(self, job: Job) -> int:
        """How many jobs must end before this one starts (0: running or next)."""
        if job in self.running:
            return 0
        return max(0, self._ordered()[1][job] + len(self.running) - self.slots + 1)

    def add(self, job: Job) -> int:
        self.lines.setdefault(job.client, deque()).append(job)
        self._order = None
        return self.position(job)

    def remove(self, job: Job) -> None:
        line = self.lines[job.client]
        line.remove(job)
        if not line:
            del self.lines[job.client]
        self._order = None

    def start_next(self) -> Job | None:
        if len(self.running) >= self.slots or not self.lines:
            return None
        job = self.waiting[0]
        self.remove(job)
        self.starts += 1
        self.served[job.client] = self.starts
        # a client with nothing waiting starts afresh when it comes back
        self.served = {c: n for c, n in self.served.items() if c in self.lines or c == job.client}
        self._order = None
        self.running.append(job)
        job.state = RUNNING
        return job

    def finish(self, job: Job, state: str) -> None:
        self.running.remove(job)
        job.state = state
