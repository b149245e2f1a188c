"""Shared fixtures: the tiny models loaded once, engines on free loopback ports, test pictures."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory) -> None:
    """The engine's per-user state (its step times) in a temporary folder, for every engine a
    test starts, in this process or as a `serve` command: never the user's own."""
    os.environ["BLENDED_DIFFUSION_STATE"] = str(tmp_path_factory.mktemp("state"))


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


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny (random-weight) models, loaded once for every in-process engine."""
    from engine.models import load_models

    return load_models("tiny", device="cpu")


@pytest.fixture
def start_engine(tiny_models) -> Iterator:
    """`start_engine(**Server options) -> server`, running in a thread on a free loopback port
    (`server.endpoint`); every engine started is stopped after the test."""
    from engine.server import Server

    yield from _engines(lambda endpoint, **options: Server(tiny_models, endpoint, **options))


@pytest.fixture(scope="module")
def tiny_cluster() -> Iterator:
    """A local Ray (a small object store, no dashboard) with two CPU replicas of the tiny model,
    started once per module: (Serve handle, replicas). Three logical CPUs: one a replica and one
    for the replica of a `serve --cluster` command a test starts on the same cluster."""
    import ray
    from ray import serve

    from engine import cluster

    cluster.connect("auto", num_cpus=3, object_store_mb=128, log_to_driver=False)
    try:
        yield cluster.deploy("tiny", replicas=2, device="cpu")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def start_cluster_engine(tiny_cluster) -> Iterator:
    """As `start_engine`, a front end whose jobs run on `tiny_cluster`'s replicas."""
    from engine.cluster import ClusterServer

    handle, replicas = tiny_cluster
    yield from _engines(
        lambda endpoint, **options: ClusterServer(handle, replicas, endpoint, **options)
    )


def _engines(make) -> Iterator:
    running = []

    def start(endpoint: str = "tcp://127.0.0.1:*", **options):
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
