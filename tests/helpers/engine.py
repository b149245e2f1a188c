"""Engines for the tests: in-process servers on free loopback ports (conftest's `start_engine`
and `start_cluster_engine` fixtures are made with `engines`), the real `serve` command, test
pictures, and a client's ways to wait for its jobs' events."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engine.methods.pixel import Pixel
from engine.models import Models
from engine.serve.local import LocalExecutor
from engine.serve.pool import Pool
from engine.serve.server import Server
from engine.shared.client import Client, Job

ROOT = Path(__file__).resolve().parents[2]
# 3 steps, no refinement pass (on by default; test_never_wedges' property test and the host
# tests run it through the engine)
QUICK = {"steps": 4, "skip": 1, "variants": 2, "augmentations": 2, "refine": False}
# cancelled long before its end; unguided, since the tiny random model's guided sample turns
# NaN after about a dozen steps (and the job then ends with a non_finite error)
LONG = {"steps": 200, "skip": 0, "variants": 1, "augmentations": 1}
LONG |= {"guidance_weight": 0, "range_weight": 0}

# a client that submits a long job and prints its events until it is killed
ORPHAN = """
import sys
from engine.shared.client import Client
c = Client(sys.argv[1], keepalive=0.2)
job = c.submit(bytes(64 * 64 * 4), 64, 64, bytes(2048) + b"\\xff" * 2048, "orphan", {LONG})
print("accepted", job.id, flush=True)
while True:
    for e in c.poll(0.1):
        print(e.type, e.step, flush=True)
""".replace("{LONG}", repr(LONG))


def free_port() -> int:
    """A loopback TCP port nothing listens on (for "engine not running" cases)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_picture(width: int = 64, height: int = 64, box=(20, 16, 30, 24)) -> tuple[bytes, bytes]:
    """An RGBA8 gradient and a Y8 mask selecting `box` (x, y, w, h), as the hosts send them."""
    rgba = bytearray()
    for y in range(height):
        for x in range(width):
            rgba += bytes((x * 4 % 256, y * 4 % 256, 128, 255))
    mask = bytearray(width * height)
    bx, by, bw, bh = box
    for y in range(by, by + bh):
        mask[y * width + bx : y * width + bx + bw] = b"\xff" * bw
    return bytes(rgba), bytes(mask)


def local_server(models: Models, endpoint: str, **options: Any) -> Server:
    """The single-process engine (`serve` without --cluster) on loaded `models` alone."""
    return Server(
        LocalExecutor(Pool.serving(models.config.name, Pixel(models))), endpoint, **options
    )


def engines(make: Callable[..., Server]) -> Iterator[Callable[..., Server]]:
    """`start(endpoint="tcp://127.0.0.1:*", **options) -> server`: `make(endpoint, **options)`
    bound and running in a thread (`server.endpoint`); every one started is stopped after."""
    running = []

    def start(endpoint: str = "tcp://127.0.0.1:*", **options: Any) -> Server:
        server = make(endpoint, **options)
        server.bind()
        thread = threading.Thread(target=server.run, name="engine-socket", daemon=True)
        thread.start()
        running.append((server, thread))
        return server

    yield start
    for server, thread in running:
        server.stop()
        thread.join(timeout=60)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m engine ARGS` from the repository, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True
    )


def start_serve(log, *args: str) -> subprocess.Popen:
    """`python -m engine serve` with the tiny model on a free loopback port (another with
    `--endpoint` in `args`); it prints `engine ready at ENDPOINT (...)` when it serves, its log
    goes to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--endpoint", "tcp://127.0.0.1:*"]
        + ["--model", "tiny", "--device", "cpu", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )


def until(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.01) -> Any:
    """Wait for `condition()` to be true (it is returned), checking every `every` s; fails
    saying `what` did not happen within `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        time.sleep(every)
    return value


def client(endpoint: str, **options: Any) -> Client:
    return Client(endpoint, timeout=30, keepalive=0.2, **options)


def submit(
    c: Client, box=(20, 16, 30, 24), settings=QUICK, prompt="a red ball", model: str | None = None
) -> Job:
    """A job over a 64x64 test picture, `box` selected, on `model` (None: the default)."""
    rgba, mask = host_picture(64, 64, box)
    return c.submit(rgba, 64, 64, mask, prompt, settings, model=model)


def run_all(clients: list[Client], jobs: list[Job], timeout: float = 120) -> list[list]:
    """Poll every client (keeping all alive) until the jobs end; each client's events."""
    events: list[list] = [[] for _ in clients]
    deadline = time.monotonic() + timeout
    while not all(j.done for j in jobs):
        assert time.monotonic() < deadline, "jobs did not finish"
        for c, evs in zip(clients, events, strict=True):
            evs += c.poll(0.02)
    return events


def first_progress(c: Client, job: Job, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while job.step == 0:
        assert time.monotonic() < deadline and not job.done, "no progress"
        c.poll(0.01)


def events_of(server: Server, job_id: str) -> list[dict]:
    """The job's events in the server's history (start, cancel, preview, its end)."""
    return [e for e in list(server.history) if e["job"] == job_id]
