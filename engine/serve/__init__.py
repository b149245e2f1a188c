"""The engine as a service: the server (server.py: sockets, admission, queue, liveness, cancel)
and the executors that run its jobs (local.py: a worker thread; cluster.py: Ray Serve replicas),
each running a job with runner.py. cli.py is the `serve` command.

The server talks to an executor through `Executor` alone, on its socket thread; the executor
talks back through a `Report`, from any thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from engine.serve.jobs import Job
from engine.serve.pool import Pool

# (kind, job, reply): kind is "progress" (any number, reply: its frames) then exactly one of
# "done" (reply: the result's frames), "failed" (the error's) or "cancelled" (None: the server
# words it). Called from any thread.
Report = Callable[[str, Job, "list[bytes] | None"], None]


class Executor(Protocol):
    """Where the server's jobs run."""

    models: Pool  # what admission plans and costs the jobs with, and hello lists
    slots: int  # jobs it runs at once
    hello: dict[str, Any]  # what it adds to hello (a cluster: its replicas)

    def start(self, report: Report, log: Callable[[str], None]) -> None:
        """Take jobs from now on: every job begun is reported, ending in one terminal kind;
        `log`: the server's."""

    def begin(self, job: Job) -> None:
        """Run `job` (at most `slots` at once)."""

    def cancel(self, job: Job) -> None:
        """Stop a running job at its next check: it then reports "cancelled" (or its end)."""

    def watch(self) -> str | None:
        """Called every tick: recover what it can (a dead worker fails its job and is
        replaced); say why it can run no job any more, worded to follow "the engine " (the
        server then fails every job with `lost` and stops), else None."""

    def close(self) -> None:
        """The server has stopped: let go of threads and connections (not of a cluster)."""
