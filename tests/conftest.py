"""Shared fixtures: the tiny models loaded once, engines on free loopback ports (made by
tests/helpers/engine.py), a state folder of the session's own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers.engine import engines, local_server


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory) -> None:
    """The engine's per-user state (its step times) in a temporary folder, for every engine a
    test starts, in this process or as a `serve` command: never the user's own."""
    os.environ["BLENDED_DIFFUSION_STATE"] = str(tmp_path_factory.mktemp("state"))


CORRUPT_MODEL = "broken-model"  # a model of tiny_cluster's whose file is not a checkpoint


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny (random-weight) models, loaded once for every in-process engine."""
    from engine.models import load_models

    return load_models("tiny", device="cpu")


@pytest.fixture
def start_engine(tiny_models) -> Iterator:
    """`start_engine(**Server options) -> server`: the single-process engine on the tiny
    models, running in a thread on a free loopback port (`server.endpoint`); every engine
    started is stopped after the test."""
    yield from engines(lambda endpoint, **options: local_server(tiny_models, endpoint, **options))


@pytest.fixture(scope="module")
def tiny_cluster(tmp_path_factory) -> Iterator:
    """A local Ray (a small object store, no dashboard) with two CPU replicas serving the tiny
    model (the default), the demo one and a corrupt checkpoint file (CORRUPT_MODEL), started
    once per module: (Serve handle, replicas). Three logical CPUs: one a replica and one for the
    replica of a `serve --cluster` command a test starts on the same cluster."""
    import ray
    from ray import serve

    from engine import catalogue
    from engine.serve import cluster

    cluster.connect("auto", num_cpus=3, object_store_mb=128, log_to_driver=False)
    try:
        corrupt = tmp_path_factory.mktemp("models") / f"{CORRUPT_MODEL}.safetensors"
        corrupt.write_bytes(b"not a checkpoint")
        served = catalogue.named(["tiny", "demo", str(corrupt)])
        yield cluster.deploy(served, {}, replicas=2, device="cpu")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def start_cluster_engine(tiny_cluster) -> Iterator:
    """As `start_engine`, a front end whose jobs run on `tiny_cluster`'s replicas."""
    from engine.serve.cluster import ClusterExecutor
    from engine.serve.server import Server

    handle, replicas = tiny_cluster
    yield from engines(
        lambda endpoint, **options: Server(ClusterExecutor(handle, replicas), endpoint, **options)
    )
