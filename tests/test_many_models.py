"""One engine, several models (engine/catalogue.py, engine/serve/pool.py): jobs name their model,
the engine loads and evicts within its memory budget, a broken model is reported and refused
while the others serve, and `serve` with no model serves the demo models, never random weights.
(tests/test_cluster.py runs the same jobs on Ray Serve replicas.)"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from engine import catalogue
from engine.methods import loading
from engine.serve.local import LocalExecutor
from engine.serve.pool import Pool
from engine.serve.server import Server
from engine.shared import protocol
from engine.shared.client import EngineError
from engine.shared.request import Settings
from tests.helpers.engine import QUICK, ROOT, client, engines, host_picture, run_all, submit

QUICK1 = {**QUICK, "variants": 1}
MB = 2**20


def pool_of(*models: str, budget: int = 2**40, log=None) -> Pool:
    lines = log if log is not None else []
    load = lambda e: loading.load_entry(e, device="cpu")  # noqa: E731
    pool = Pool(catalogue.named(models), load, budget=budget, log=lines.append)
    pool.survey()
    return pool


@pytest.fixture
def start_pool_engine():
    """`start(pool, **Server options) -> server` on a free loopback port."""
    yield from engines(lambda endpoint, pool, **o: Server(LocalExecutor(pool), endpoint, **o))


@pytest.fixture(scope="module")
def demo_and_tiny() -> Pool:
    return pool_of("demo", "tiny")


def test_jobs_name_either_model_in_any_order_and_each_result_names_its_model(
    start_pool_engine, demo_and_tiny
):
    server = start_pool_engine(pool=demo_and_tiny)
    with client(server.endpoint) as c:
        info = c.hello()
        assert info["default"] == "demo"  # the first named
        listed = {m["name"]: m for m in info["available"]}
        assert set(listed) == {"demo", "tiny"}
        assert listed["demo"]["method"] == "pixel" and listed["demo"]["weights"] == "demo"
        assert listed["tiny"]["weights"] == "random" and listed["tiny"]["native"] == 32
        assert all(m["bytes"] > MB and m["error"] is None for m in listed.values())
        jobs = [submit(c, settings=QUICK1, model=m) for m in ["tiny", "demo", "demo", "tiny"]]
        run_all([c], jobs, timeout=300)  # queued together: each runs on its own model
        jobs.append(submit(c, settings=QUICK1))
        run_all([c], jobs, timeout=300)
    assert [j.state for j in jobs] == ["done"] * 5
    assert [(j.model, j.weights) for j in jobs] == [
        ("tiny", "random"), ("demo", "demo"), ("demo", "demo"), ("tiny", "random"),
        ("demo", "demo"),  # no model named: the default
    ]  # fmt: skip
    assert "tiny UNet" in jobs[0].models and "demo shapes-world UNet" in jobs[1].models


def test_a_job_naming_an_unknown_model_is_refused_with_the_list(start_pool_engine, demo_and_tiny):
    server = start_pool_engine(pool=demo_and_tiny)
    with client(server.endpoint) as c:
        with pytest.raises(EngineError) as e:  # the client knows from hello, sends nothing
            submit(c, model="sd99")
        assert e.value.code == protocol.UNKNOWN_MODEL
        assert "'sd99'" in e.value.message and "serves demo, tiny" in e.value.message
        c.info["available"].append({"name": "sd99", "method": "latent"})  # a stale hello
        with pytest.raises(EngineError) as e:  # the engine's own refusal
            submit(c, model="sd99", settings={})
        assert e.value.code == protocol.UNKNOWN_MODEL and "serves demo, tiny" in e.value.message
        with pytest.raises(EngineError) as e:
            submit(c, model="tiny", settings={"guidance": 7.5})  # the latent method's setting
        assert e.value.code == protocol.BAD_FIELD


def test_a_corrupt_model_file_is_reported_refused_by_name_and_the_others_serve(
    start_pool_engine, tmp_path
):
    corrupt = tmp_path / "my-model.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(100))
    log: list[str] = []
    pool = pool_of("tiny", str(corrupt), log=log)
    server = start_pool_engine(pool=pool)
    with client(server.endpoint) as c:
        broken = next(m for m in c.hello()["available"] if m["name"] == "my-model")
        assert str(corrupt) in broken["error"] and broken["loaded"] is False
        assert broken["where"] == str(corrupt)
        with pytest.raises(EngineError) as e:
            submit(c, model="my-model", settings={})
        assert e.value.code == protocol.MODEL_UNAVAILABLE and str(corrupt) in e.value.message
        job = submit(c, settings=QUICK1, model="tiny")
        run_all([c], [job])
    assert job.state == "done" and job.model == "tiny"
    assert any("my-model cannot serve" in line for line in log)


def test_an_engine_whose_every_model_fails_says_why_each():
    with pytest.raises(ValueError, match="no model could be loaded.*nothing.safetensors"):
        pool_of("/nowhere/nothing.safetensors")


def test_two_models_over_the_budget_alternate_evicting_the_least_recently_used(
    start_pool_engine,
):
    log: list[str] = []
    pool = pool_of("demo", "tiny", log=log)
    demo, tiny = pool.size("demo"), pool.size("tiny")
    fast = {**QUICK1, "guidance_mode": "fast"}  # no UNet backward: a few MB a job at 64 px
    mask = np.frombuffer(host_picture(64, 64, (20, 16, 30, 24))[1], np.uint8).reshape(64, 64)
    room = max(
        about.memory((64, 64, 4), mask, about.plan(mask, Settings(**fast))).total
        for about in (pool.about("demo"), pool.about("tiny"))
    )
    pool.budget = max(demo, tiny) + room  # either with a job, not both
    assert demo + tiny > pool.budget
    server = start_pool_engine(pool=pool)
    with client(server.endpoint) as c:
        events, jobs = [], []
        for model in ["tiny", "demo", "tiny", "demo"]:
            jobs.append(submit(c, settings=fast, model=model))
            events += run_all([c], jobs[-1:], timeout=300)[0]
            assert pool.resident() <= pool.budget - room
    assert [j.state for j in jobs] == ["done"] * 4
    stages = [e.stage for e in events if e.stage]
    assert demo < 1e8
    size = f"{demo / 1e6:.0f} MB"
    assert stages.count(f"loading demo, {size}") == 2, stages  # shown, not a frozen bar
    evicted = [line for line in log if line.startswith("evicting")]
    assert len(evicted) >= 3, log


def test_a_model_that_cannot_fit_even_alone_is_refused_at_admission_with_the_figures(
    start_pool_engine,
):
    server = start_pool_engine(pool=pool_of("tiny", "demo"))
    server.memory_budget = server.models.size("demo") // 2
    with client(server.endpoint) as c:
        with pytest.raises(EngineError) as e:
            submit(c, settings=QUICK1, model="demo")
    assert e.value.code == protocol.LIMIT
    message = e.value.message
    assert message.startswith("this model alone needs about") and "demo" in message
    assert f"memory budget of {server.memory_budget / 1e6:.0f} MB" in message


def test_serve_lists_installed_models_best_first_and_never_random_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("BLENDED_DIFFUSION_MODELS", str(tmp_path / "empty"))
    comfy = tmp_path / "ComfyUI" / "models" / "checkpoints"
    (comfy / "sdxl").mkdir(parents=True)
    (comfy / "dreamshaper_8.safetensors").write_bytes(b"")
    (comfy / "sdxl" / "juggernaut.ckpt").write_bytes(b"")
    (comfy / "notes.txt").write_text("")
    (comfy / "my-diffusers" / "unet").mkdir(parents=True)
    (comfy / "my-diffusers" / "model_index.json").write_text("{}")
    a1111 = tmp_path / "A1111" / "models" / "Stable-diffusion"
    a1111.mkdir(parents=True)
    (a1111 / "dreamshaper_8.safetensors").write_bytes(b"")  # the same name, another file
    found = catalogue.installed([comfy, a1111])
    names = [e.name for e in found]
    assert names == ["dreamshaper_8", "my-diffusers", "juggernaut", "dreamshaper_8-2",
                     "demo-latent", "demo"]  # fmt: skip
    assert found[-1].method == "pixel" and {e.method for e in found[:-1]} == {"latent"}
    assert catalogue.default(found).name == "dreamshaper_8"
    assert catalogue.default(catalogue.installed()).name == "demo-latent"  # a fresh machine
    assert not {"tiny", "tiny-latent"} & {e.name for e in catalogue.installed([comfy])}


def test_serve_with_no_model_on_a_fresh_machine_serves_the_demo_and_says_so_first(tmp_path):
    log = tmp_path / "serve.log"
    env = {"BLENDED_DIFFUSION_MODELS": str(tmp_path / "models")}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--endpoint", "tcp://127.0.0.1:*",
             "--device", "cpu"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
            env={**os.environ, **env},
        )  # fmt: skip
    try:
        ready = proc.stdout.readline()
        assert "engine ready at" in ready, log.read_text()[-3000:]
        endpoint = ready.split()[3]
        first = log.read_text().splitlines()[0]
        assert first.startswith("no model weights installed: serving the demo models"), first
        with client(endpoint) as c:
            info = c.hello()
            assert info["default"] == "demo-latent"
            assert {m["name"] for m in info["available"]} == {"demo-latent", "demo"}
            assert {m["weights"] for m in info["available"]} == {"demo"}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_an_engine_named_models_keeps_the_order_named_for_its_default():
    entries = catalogue.named(["tiny", "demo", "demo"])
    assert [e.name for e in entries] == ["tiny", "demo"]
    assert catalogue.default(entries).name == "tiny"  # named: the artist's choice


def test_a_model_files_path_is_named_by_its_stem(tmp_path):
    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    entry = catalogue.entry(str(path))
    assert (entry.name, entry.source, entry.method) == ("v1-5-pruned-emaonly", str(path), "latent")
