"""Several replicas behind the one endpoint (engine/serve/cluster.py), on a local Ray with two CPU
replicas of the tiny and demo models (and a corrupt one): jobs name either model, two clients'
jobs run at once on different replicas, a cancel
reaches the replica, a replica killed mid-job fails only its own job and Serve replaces it, and
`serve --cluster ADDRESS` serves through its own replica and tells its client when it loses it.
(tests/test_server.py runs the protocol's tests against the cluster front end as well.)"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.shared import protocol
from engine.shared.client import Client, EngineError
from tests.conftest import CORRUPT_MODEL
from tests.helpers.engine import (
    LONG,
    QUICK,
    ROOT,
    client,
    first_progress,
    run_all,
    start_serve,
    submit,
)

LONGER = {**LONG, "steps": 1000}  # outlasts whatever the test does while it runs
TIMED = {"steps": 10, "skip": 2, "variants": 1, "augmentations": 2}  # 8 guided steps


def result_headers(c: Client) -> dict[str, dict]:
    """The result headers `c` receives, by job id (the client keeps no `replica` field)."""
    seen: dict[str, dict] = {}
    handle = c._handle

    def spy(msg: protocol.Message):
        if msg.type == "result":
            seen[msg.job] = msg.header
        return handle(msg)

    c._handle = spy
    return seen


def running_on(server, job_id: str):
    """The replica running a job (the front end knows it from the replica's first message)."""
    return next(r for j, r in list(server.executor.ran_on.items()) if j.id == job_id)


def replica_of(server, job_id: str) -> str:
    """The replica a job ran on, as the front end's history recorded it."""
    return next(e["replica"] for e in list(server.history)[::-1] if e["job"] == job_id)


def timed_pair(a: Client, b: Client) -> tuple[float, list]:
    start = time.perf_counter()
    jobs = [submit(a, settings={**TIMED, "seed": 1}), submit(b, settings={**TIMED, "seed": 2})]
    run_all([a, b], jobs)
    return time.perf_counter() - start, jobs


def test_the_single_process_engine_imports_nothing_of_ray():
    code = (
        "import sys, engine.__main__, engine.serve.cli, engine.shared.client; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_jobs_name_either_model_a_broken_one_is_reported_and_an_old_client_told(
    start_cluster_engine,
):
    """As tests/test_many_models.py, on the replicas: each job runs on the model it names."""
    server = start_cluster_engine()
    with client(server.endpoint) as c:
        info = c.hello()
        listed = {m["name"]: m for m in info["available"]}
        assert info["default"] == "tiny" and set(listed) == {"tiny", "demo", CORRUPT_MODEL}
        assert listed["demo"]["loaded"] is None  # the front end holds none: each replica its own
        assert "safetensors" in listed[CORRUPT_MODEL]["error"]
        jobs = [submit(c, settings={**QUICK, "variants": 1}, model=m) for m in ("demo", "tiny")]
        jobs.append(submit(c, settings={**QUICK, "variants": 1}, model="demo"))
        run_all([c], jobs, timeout=300)
        assert [(j.state, j.model) for j in jobs] == [("done", "demo"), ("done", "tiny"),
                                                      ("done", "demo")]  # fmt: skip
        assert "demo shapes-world" in jobs[0].models and jobs[0].weights == "demo"
        for model, code in (("sd99", protocol.UNKNOWN_MODEL),
                            (CORRUPT_MODEL, protocol.MODEL_UNAVAILABLE)):  # fmt: skip
            c.info["available"].append({"name": model, "method": "latent"})  # past the client
            with pytest.raises(EngineError) as e:
                submit(c, settings={}, model=model)
            assert e.value.code == code, e.value
    # an old plug-in's hello: test_server.py's version test runs on this front end too


def test_the_queue_runs_a_job_a_replica_serving_clients_in_turn():
    from engine.serve.jobs import DONE, Job, JobQueue

    queue = JobQueue(slots=2)
    greedy = [Job(b"a", f"a{i}", "p", None, None, None) for i in range(3)]
    polite = Job(b"b", "b0", "p", None, None, None)
    for job in [*greedy, polite]:
        queue.add(job)
    # jobs that must end before each starts: a0 and b0 start at once, a1 after one of them
    assert [queue.position(j) for j in [*greedy, polite]] == [0, 1, 2, 0]
    assert [queue.start_next(), queue.start_next(), queue.start_next()] == [
        *greedy[:1],
        polite,
        None,
    ]
    assert queue.count(b"a") == 3 and len(queue) == 4
    queue.finish(polite, DONE)
    assert queue.start_next() is greedy[1] and queue.position(greedy[2]) == 1


def test_a_front_end_estimates_a_job_as_the_replica_would(tiny_models):
    """The budget check runs where no models are: from a replica's description, with the free
    memory its device had, never the front end's own device."""
    import pickle
    from dataclasses import replace

    from engine.methods.pixel import Pixel
    from engine.shared.request import Settings

    here = Pixel(tiny_models).describe()
    remote = pickle.loads(pickle.dumps(Pixel(tiny_models).describe(remote=True)))
    assert remote.free_gb is not None and remote.label == here.label == tiny_models.label
    roomy, tight = replace(remote, free_gb=1000.0), replace(remote, free_gb=1e-6)

    def parts(described, shape: int, mask: np.ndarray, settings: Settings) -> dict[str, int]:
        return described.memory((shape, shape, 4), mask, described.plan(mask, settings)).parts

    settings, mask = Settings(variants=2), np.zeros((64, 64), np.uint8)
    mask[10:30, 10:40] = 255
    local = parts(here, 64, mask, settings)
    assert local["unet_activations"] > 0  # the tiny UNet fits here: no recompute
    assert parts(roomy, 64, mask, settings) == local
    assert parts(tight, 64, mask, settings)["unet_activations"] == (
        local["unet_activations"] // 10  # recompute
    )
    large = np.zeros((256, 256), np.uint8)  # 8x the tiny model's side: the refinement's part too
    large[20:220, 30:240] = 255
    settings.refine = True
    local = parts(here, 256, large, settings)
    assert parts(roomy, 256, large, settings) == local
    assert local["refinement"] > 0


def test_two_clients_jobs_run_at_the_same_time_on_different_replicas(start_cluster_engine, capsys):
    server = start_cluster_engine()
    with client(server.endpoint) as a, client(server.endpoint) as b:
        assert a.hello()["replicas"] == 2
        seen_a, seen_b = result_headers(a), result_headers(b)
        timed_pair(a, b)  # both replicas warm
        start = time.perf_counter()
        one = submit(a, settings={**TIMED, "seed": 1})
        run_all([a], [one])
        alone = time.perf_counter() - start
        together, (job_a, job_b) = timed_pair(a, b)
    assert one.state == job_a.state == job_b.state == "done"
    replicas = {seen_a[job_a.id]["replica"], seen_b[job_b.id]["replica"]}
    assert len(replicas) == 2  # the results say which replica made them
    history = [(e["event"], e["job"]) for e in list(server.history)]
    starts = [history.index(("start", j.id)) for j in (job_a, job_b)]
    ends = [history.index(("done", j.id)) for j in (job_a, job_b)]
    assert max(starts) < min(ends)  # both ran at once
    done = {e["job"]: e["replica"] for e in list(server.history) if e["event"] == "done"}
    assert {done[job_a.id], done[job_b.id]} == replicas
    with capsys.disabled():
        print(
            f"\ntwo CPU replicas, tiny model, 8 guided steps, 64x64: one job {alone:.2f} s, two "
            f"clients' jobs at once {together:.2f} s ({together / alone:.2f}x one job; "
            f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"
        )


def test_a_cancel_reaches_the_replica_and_frees_it(start_cluster_engine, capsys):
    server = start_cluster_engine()
    with client(server.endpoint) as a, client(server.endpoint) as b:
        victim, other = submit(a, settings=LONGER), submit(b, settings=LONGER)
        first_progress(a, victim)
        first_progress(b, other)
        start = time.perf_counter()
        a.cancel(victim)
        run_all([a, b], [victim])
        cancelled = time.perf_counter() - start
        assert (victim.state, victim.cancel_reason) == ("cancelled", "client")
        after = submit(a, settings={**QUICK, "variants": 1})
        run_all([a, b], [after])
        freed = time.perf_counter() - start
        # the other replica is busy with `other`: only the victim's replica can have run it,
        # and `other`, as long and started with the victim, runs on: the victim stopped early
        assert after.state == "done" and not other.done
        assert replica_of(server, after.id) == replica_of(server, victim.id)
        b.cancel(other)
        run_all([b], [other])
    with capsys.disabled():
        print(
            f"\ncancel -> cancelled {cancelled * 1000:.0f} ms; the replica ran the next job "
            f"{freed:.2f} s after the cancel"
        )


def test_a_replica_killed_mid_job_fails_only_its_job_and_is_replaced(start_cluster_engine, capsys):
    server = start_cluster_engine()
    survivor_settings = {**LONG, "steps": 60}
    with client(server.endpoint) as a, client(server.endpoint) as b:
        victim, survivor = submit(a, settings=LONGER), submit(b, settings=survivor_settings)
        first_progress(a, victim)
        first_progress(b, survivor)
        dead = running_on(server, victim.id)
        os.kill(dead.pid, signal.SIGKILL)  # the replica's process, as a crash or the OOM killer
        killed = time.perf_counter()
        deadline = killed + 60
        while not victim.done:
            assert time.perf_counter() < deadline, "the victim's client was never told"
            a.poll(0.01)
            b.poll(0)
        told = time.perf_counter() - killed
        assert victim.state == "failed" and victim.error.code == protocol.LOST
        assert "died mid-job" in victim.error.message and dead.name in victim.error.message
        run_all([a, b], [survivor])
        assert survivor.state == "done"  # the other job went on
        after = submit(a, settings={**QUICK, "variants": 1})
        run_all([a], [after])
        assert after.state == "done" and replica_of(server, after.id) != dead.name  # serving
        deadline = time.monotonic() + 300
        while True:  # Serve starts another replica: two jobs at once on two live replicas
            pair = [submit(c, settings={**QUICK, "variants": 1}) for c in (a, b)]
            run_all([a, b], pair)
            ran_on = {replica_of(server, j.id) for j in pair if j.state == "done"}
            if len(ran_on) == 2 and dead.name not in ran_on:
                break
            assert time.monotonic() < deadline, "Serve did not replace the replica"
    replaced = time.perf_counter() - killed
    with capsys.disabled():
        print(
            f"\nreplica SIGKILLed mid-job: its client got `lost` {told:.2f} s after the kill; "
            f"two live replicas again {replaced:.1f} s after it"
        )
    assert told < 15


def test_serve_cluster_command_serves_and_tells_its_client_when_it_loses_the_cluster(
    tiny_cluster, tmp_path
):
    import ray
    from ray import serve

    log = (tmp_path / "serve.log").open("w")
    address = ray.get_runtime_context().gcs_address
    proc = start_serve(log, "--cluster", address, "--replicas", "1", "--app", "cli-test")
    try:
        assert select.select([proc.stdout], [], [], 300)[0], "engine did not start"
        ready = proc.stdout.readline()
        why = (tmp_path / "serve.log").read_text()[-3000:]
        match = re.match(r"engine ready at (\S+) \((.*) on 1 replicas, cpu\)", ready)
        assert match, (ready, why)
        with client(match.group(1)) as c:
            seen = result_headers(c)
            job = submit(c, settings={**QUICK, "variants": 1})
            run_all([c], [job])
            assert job.state == "done" and seen[job.id]["replica"]
            job = submit(c, settings=LONGER)
            first_progress(c, job)
            serve.delete("cli-test", _blocking=False)  # its replicas go: the cluster is lost
            run_all([c], [job])
        why = (tmp_path / "serve.log").read_text()[-3000:]
        assert job.state == "failed" and job.error.code == protocol.LOST, why
        assert "the engine lost its Ray cluster" in job.error.message
        assert proc.wait(timeout=60) == 1
        assert "engine stopped: lost its Ray cluster" in (tmp_path / "serve.log").read_text()
    finally:
        proc.kill()
        proc.wait()
        log.close()
