"""The engine over real sockets with the tiny model: queue order, progress routing, cancel,
orphaned jobs, rejections, a fuzz of malformed messages, and the real `serve` command. The
engine's tests run twice: against the single-process engine and against the Ray Serve front end
(engine/cluster.py, two CPU replicas), whose protocol must behave the same."""

from __future__ import annotations

import json
import re
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.serve.server import to_array
from engine.shared import protocol
from engine.shared.client import EngineError, Job
from engine.shared.protocol import Limits, Pixels, encode
from tests.helpers.engine import (
    LONG,
    ORPHAN,
    QUICK,
    ROOT,
    client,
    events_of,
    first_progress,
    host_picture,
    run_all,
    start_serve,
    submit,
    until,
)

BOX_A, BOX_B = (20, 16, 30, 24), (4, 40, 20, 10)


@pytest.fixture(params=["process", "cluster"])
def start_engine(request, start_engine):
    if request.param == "cluster":
        return request.getfixturevalue("start_cluster_engine")
    return start_engine


def test_hello_reports_protocol_models_device_and_limits(start_engine, tiny_models):
    server = start_engine()
    with client(server.endpoint) as c:
        info = c.hello()
    assert info["v"] == protocol.PROTOCOL_VERSION
    assert info["models"] == tiny_models.label and info["device"] == "cpu"
    assert info["limits"]["max_variants"] == 8 and info["keepalive"]["interval"] == 1.0


def test_two_clients_run_in_order_and_see_only_their_own_progress(start_engine):
    server = start_engine()
    with client(server.endpoint) as a, client(server.endpoint) as b:
        replicas = a.hello().get("replicas", 1)  # a cluster runs one job a replica at once
        job_a = submit(a, BOX_A, {**QUICK, "seed": 10})
        job_b = submit(b, BOX_B, {**QUICK, "seed": 20})
        assert job_b.position == (1 if replicas == 1 else 0)
        events_a, events_b = run_all([a, b], [job_a, job_b])
    order = [(e["event"], e["job"]) for e in list(server.history)]
    if replicas == 1:
        assert order == [
            ("start", job_a.id),
            ("done", job_a.id),
            ("start", job_b.id),
            ("done", job_b.id),
        ]
    else:  # both started before either ended
        assert order[:2] == [("start", job_a.id), ("start", job_b.id)]
        assert sorted(order[2:]) == sorted([("done", job_a.id), ("done", job_b.id)])
    for job, events, box, seed in ((job_a, events_a, BOX_A, 10), (job_b, events_b, BOX_B, 20)):
        assert {e.job_id for e in events} == {job.id}  # nothing of the other client's
        assert [e.step for e in events if e.type == "progress"] == [1, 2, 3]
        assert job.state == "done" and "tiny UNet" in job.models
        assert [v.rank for v in job.variants] == [1, 2]
        assert {v.seed for v in job.variants} == {seed, seed + 1}
        assert job.variants[0].distance <= job.variants[1].distance
        for v in job.variants:
            assert (v.x, v.y, v.width, v.height) == box
            assert v.rgba[3::4] == b"\xff" * (v.width * v.height)  # alpha = the selection


def test_cancel_stops_the_running_job_within_one_step(start_engine):
    server = start_engine()
    with client(server.endpoint) as c:
        job = submit(c, settings=LONG)
        first_progress(c, job)
        c.cancel(job)
        events = run_all([c], [job])[0]
    assert job.state == "cancelled" and job.cancel_reason == "client"
    assert events[-1].type == "cancelled"
    requested, stopped = (e["step"] for e in events_of(server, job.id) if e["event"] != "start")
    assert stopped - requested <= 1


def test_cancel_of_a_queued_job_removes_it(start_engine):
    server = start_engine()
    with client(server.endpoint) as c:
        running = [submit(c, settings=LONG) for _ in range(c.hello().get("replicas", 1))]
        queued = submit(c, settings=LONG)
        assert queued.position == 1
        c.cancel(queued)
        run_all([c], [queued])
        assert queued.state == "cancelled"
        assert [j["job"] for j in c.status()["jobs"]] == [j.id for j in running]
        for job in running:
            c.cancel(job)
        run_all([c], running)
    assert [e["event"] for e in events_of(server, queued.id)] == ["cancelled"]  # never started


def test_a_killed_client_loses_its_job_within_a_second_and_the_next_client_is_served(
    start_engine, capsys
):
    server = start_engine(keepalive_timeout=30.0)  # the disconnect, not the keep-alive
    proc = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, server.endpoint],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        orphan = proc.stdout.readline().split()[1]
        assert proc.stdout.readline().startswith("progress")
    finally:
        killed = time.monotonic()
        proc.kill()  # SIGKILL: no cancel, no goodbye, like GIMP killing a cancelled plug-in
        proc.wait()
    (dropped,) = until(
        lambda: [e for e in events_of(server, orphan) if e["event"] == "cancelled"],
        10, "the orphan dropped",
    )  # fmt: skip
    assert dropped["reason"] == "disconnected"
    with capsys.disabled():
        print(f"\norphan (SIGKILLed client) dropped {dropped['t'] - killed:.3f} s after the kill")
    assert dropped["t"] - killed < 1.0
    with client(server.endpoint) as c:
        job = submit(c, settings={**QUICK, "variants": 1})
        run_all([c], [job])
    assert job.state == "done"


def test_a_socket_closed_without_cancel_frees_the_worker(start_engine):
    server = start_engine(keepalive_timeout=1.0)
    c = client(server.endpoint)
    job = submit(c, settings=LONG)
    first_progress(c, job)
    c.close()
    with client(server.endpoint) as other:
        until(lambda: not other.status()["busy"], 30, "the engine free", every=0.2)
    assert events_of(server, job.id)[-1]["reason"] == "disconnected"


def test_a_client_that_stops_pinging_loses_its_job_on_keepalive(start_engine):
    server = start_engine(keepalive_timeout=1.0)
    with raw_socket(server.endpoint) as sock:  # connected but silent: a hung host
        rgba, mask = host_picture(16, 16, (2, 2, 4, 4))
        frames = [Pixels(16, 16, "RGBA8", rgba), Pixels(16, 16, "Y8", mask)]
        reply = exchange(
            sock, encode("submit", {"job": "hung", "prompt": "x", "settings": LONG}, frames)
        )
        assert reply.type == "accepted"
        until(
            lambda: [e for e in events_of(server, "hung") if e["event"] == "cancelled"],
            30, "the silent client's job cancelled",
        )  # fmt: skip
    assert events_of(server, "hung")[-1]["reason"] == "keepalive"


def test_refusals_come_back_as_engine_errors(start_engine):
    server = start_engine(limits=Limits(max_side=512, max_queue=1))
    with client(server.endpoint) as c:
        with pytest.raises(EngineError, match="selection is empty") as e:
            submit(c, box=(0, 0, 0, 0))
        assert e.value.code == protocol.BAD_INPUT
        # settings: refused by the client with the engine's own check (the one schema)
        with pytest.raises(EngineError, match="skip must be") as e:
            submit(c, settings={"steps": 5, "skip": 5})
        assert e.value.code == protocol.BAD_FIELD
        over = r"variants must be 1 to 8 \(this engine's limit\)"
        with pytest.raises(EngineError, match=over) as e:
            submit(c, settings={"variants": 9})
        assert e.value.code == protocol.LIMIT
        running = submit(c, settings=LONG)
        with pytest.raises(EngineError, match="queue is full") as e:
            submit(c)
        assert e.value.code == protocol.LIMIT
        c.cancel(Job("no-such-job"))
        c.cancel(running)
        events = run_all([c], [running])[0]
    errors = [e.error.code for e in events if e.type == "error"]
    assert errors == [protocol.UNKNOWN_JOB]


def test_duplicate_job_ids_are_refused(start_engine):
    server = start_engine()
    rgba, mask = host_picture(16, 16, (2, 2, 4, 4))
    frames = encode(
        "submit",
        {"job": "same", "prompt": "x", "settings": LONG},
        [Pixels(16, 16, "RGBA8", rgba), Pixels(16, 16, "Y8", mask)],
    )
    with raw_socket(server.endpoint) as sock:
        replies = [exchange(sock, frames) for _ in range(2)]
        sock.send_multipart(encode("cancel", {"job": "same"}))
    assert replies[0].type == "accepted"
    assert (replies[1].type, replies[1].header["code"]) == ("error", protocol.DUPLICATE_JOB)


def test_a_client_of_another_version_is_told_both_versions(start_engine):
    """A plug-in of the one-model engine (protocol 1) asks hello of this one (2)."""
    server = start_engine()
    with raw_socket(server.endpoint) as sock:
        reply = exchange(sock, [b'{"v": 1, "type": "hello", "client": "plug-in 0.4"}'])
    assert reply.header["code"] == protocol.VERSION_MISMATCH
    assert "client speaks 1, the engine speaks 2; update the plug-in" in reply.header["message"]


def test_pixels_from_the_wire_become_rgba_arrays():
    bgra_padded = bytes([3, 2, 1, 4, 9, 9]) * 2  # 1 BGRA pixel + 2 padding bytes, 2 rows
    array = to_array(Pixels(1, 2, "BGRA8", bgra_padded, stride=6))
    assert array.tolist() == [[[1, 2, 3, 4]], [[1, 2, 3, 4]]]
    assert to_array(Pixels(2, 1, "Y8", b"\x00\xff")).shape == (1, 2)


# -- step times kept across restarts ----------------------------------------------------------


def kept(path: Path, expect: list[dict] | None = None) -> list[dict] | None:
    """The step-times file's entries: once they are `expect` (given), for up to 10 s. The engine
    writes them just after the job's answer, so a test that has the answer may read too soon."""
    deadline = time.monotonic() + 10
    while True:
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = None
        if expect is None or entries == expect or time.monotonic() > deadline:
            return entries
        time.sleep(0.02)


def key_of(start_engine) -> dict:
    """The step times' key of the engines `start_engine` makes (their models and device)."""
    return start_engine().step_times().key


def test_an_engine_announces_the_step_times_kept_for_it_before_its_first_job(
    start_engine, tmp_path
):
    path = tmp_path / "step-times.json"
    figures = {"fast": {"1": 0.25}, "full": {"2": 0.75}}
    path.write_text(json.dumps([{"key": key_of(start_engine), "step_seconds": figures}]))
    server = start_engine(step_file=path)
    with client(server.endpoint) as c:
        assert c.hello()["step_seconds"] == figures


@pytest.mark.parametrize("field", ["model", "image_size", "models", "device", "precision"])
def test_step_times_kept_for_another_model_device_or_precision_are_not_announced(
    start_engine, tmp_path, field
):
    key = key_of(start_engine)
    assert field in key
    other = {"key": key | {field: f"another {field}"}, "step_seconds": {"full": {"2": 9.0}}}
    path = tmp_path / "step-times.json"
    path.write_text(json.dumps([other]))
    server = start_engine(step_file=path)
    with client(server.endpoint) as c:
        assert c.hello()["step_seconds"] == {}
        job = submit(c)
        run_all([c], [job])
        seconds = c.hello()["step_seconds"]
    assert job.state == "done" and seconds["full"]["2"] != 9.0
    expected = [other, {"key": key, "step_seconds": seconds}]  # the other one stays
    assert kept(path, expected) == expected


def test_a_jobs_step_times_are_kept_for_the_next_engine_on_the_same_file(start_engine, tmp_path):
    path = tmp_path / "state" / "step-times.json"  # the folder too is made by the first write
    first = start_engine(step_file=path)
    with client(first.endpoint) as c:
        assert c.hello()["step_seconds"] == {}
        job = submit(c)  # full guidance, 2 variants, 3 steps
        run_all([c], [job])
        seconds = c.hello()["step_seconds"]
    assert job.state == "done" and list(seconds) == ["full"] and list(seconds["full"]) == ["2"]
    expected = [{"key": first.step_times().key, "step_seconds": seconds}]
    assert kept(path, expected) == expected
    first.stop()
    second = start_engine(step_file=path)
    with client(second.endpoint) as c:
        assert c.hello()["step_seconds"] == seconds


UNUSABLE = {
    "cut short": lambda path, key: path.write_text('[{"key": {"model": "ti'),
    "not text": lambda path, key: path.write_bytes(b"\xff\xfe\x00["),
    "not a list": lambda path, key: path.write_text('{"full": {"2": 0.5}}'),
    "not seconds": lambda path, key: path.write_text(
        json.dumps([{"key": key, "step_seconds": {"full": {"2": "slow", "4": 1.0}}}])
    ),
    "not a batch": lambda path, key: path.write_text(
        json.dumps([{"key": key, "step_seconds": {"full": {"0": 1.0}}}])
    ),
}


@pytest.mark.parametrize("damage", list(UNUSABLE))
def test_an_unusable_step_times_file_is_ignored_said_once_and_replaced(
    start_engine, tmp_path, damage
):
    path = tmp_path / "step-times.json"
    UNUSABLE[damage](path, key_of(start_engine))
    logs: list[str] = []
    server = start_engine(step_file=path, log=logs.append)
    with client(server.endpoint) as c:
        assert c.hello()["step_seconds"] == {}
        job = submit(c)
        run_all([c], [job])
        seconds = c.hello()["step_seconds"]
    assert job.state == "done" and seconds
    said = [line for line in logs if line.startswith("step times:")]
    assert len(said) == 1 and said[0].startswith(f"step times: ignoring {path}: "), logs
    expected = [{"key": server.step_times().key, "step_seconds": seconds}]
    assert kept(path, expected) == expected


def test_an_unwritable_step_times_file_costs_a_log_line_not_the_job(start_engine, tmp_path):
    path = tmp_path / "step-times.json"
    path.mkdir()  # neither read nor replaced
    logs: list[str] = []
    server = start_engine(step_file=path, log=logs.append)
    with client(server.endpoint) as c:
        jobs = [submit(c), submit(c, settings={**QUICK, "variants": 1})]
        run_all([c], jobs)
        assert c.hello()["step_seconds"]["full"].keys() == {"1", "2"}
    assert [j.state for j in jobs] == ["done", "done"]
    said = [line for line in logs if line.startswith("step times:")]
    assert len(said) == 3 and said[0].startswith(f"step times: ignoring {path}: "), logs
    assert all(line.startswith(f"step times: cannot write {path}: ") for line in said[1:])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [path.name, f"{path.name}.lock"]  # no temporary file left


def test_engines_saving_to_one_file_at_once_keep_each_others_figures(tmp_path, monkeypatch):
    """A save reads the other engines' entries and writes them back with its own: without the
    lock, an engine writing between another's read and write lost its entry (a slow read here
    makes that window wide)."""
    from engine import steptime

    path, read = tmp_path / "step-times.json", steptime._read

    def slow_read(p: Path) -> list:
        entries = read(p)
        time.sleep(0.05)
        return entries

    monkeypatch.setattr(steptime, "_read", slow_read)
    engines = []
    for i in range(4):
        times = steptime.StepTimes(clock=iter([0.0, i + 1.0]).__next__, path=path,
                                   key={"precision": "fp32", "engine": i}, log=lambda _: None)
        step = times.timer("full", 1)
        step(1), step(2)  # a step of i + 1 seconds
        engines.append(times)
    threads = [threading.Thread(target=e.save) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_engine = {e["key"]["engine"]: e["step_seconds"] for e in kept(path)}
    assert by_engine == {i: {"full": {"1": i + 1.0}} for i in range(4)}


def test_serve_keeps_step_times_in_the_user_state_folder_unless_told_otherwise(
    tmp_path_factory,
):
    from types import SimpleNamespace

    from engine import weights
    from engine.serve.cli import options

    def step_file(value: str | None) -> Path | None:
        args = SimpleNamespace(max_side=64, max_queue=1, max_client_queue=1, memory_budget=None,
                               keepalive_timeout=1.0, step_times=value,
                               max_job_minutes=None)  # fmt: skip
        return options(args, None).get("step_file")

    # the state folder: this session's own (conftest), as for every `serve` a test starts
    assert step_file(None) == weights.state_dir() / "step-times.json"
    assert weights.state_dir().is_relative_to(tmp_path_factory.getbasetemp())
    assert step_file("elsewhere.json") == Path("elsewhere.json")
    assert step_file("off") is None


# -- the plan and the time limit (serve --max-job-minutes) ----------------------------------------

# 1000 unguided steps: seconds, far past a limit of half a second. Guided one step in two, so
# the engine times none of them (steptime.py): no job's admission reads their pace
PAST_LIMIT = {**LONG, "steps": 1000, "guidance_every": 2}


def test_accepted_counts_the_refinement_in_the_total_and_progress_follows_it(start_engine):
    server = start_engine()
    refined = {"steps": 10, "skip": 8, "variants": 1, "augmentations": 1, "refine": True,
               "refine_cap": 0, "refine_strength": 0.2}  # fmt: skip
    with client(server.endpoint) as c:
        rgba, mask = host_picture(64, 64, (4, 4, 56, 56))  # 64 px: twice the tiny model's side
        job = c.submit(rgba, 64, 64, mask, "a red ball", refined)
        accepted = job.total
        events = run_all([c], [job])[0]
    assert job.state == "done" and job.refine_tiles > 0
    assert accepted == 2 + 2  # the base pass's steps, then the refinement's
    assert [e.step for e in events if e.type == "progress"] == [1, 2, 3, 4]
    assert {e.total for e in events if e.type == "progress"} == {accepted}


def test_a_job_estimated_over_the_time_limit_is_refused_with_both_figures(
    start_engine, tmp_path
):
    path = tmp_path / "step-times.json"
    figures = {"full": {"1": 10.0}}  # 10 s a step, as a slow device measured
    path.write_text(json.dumps([{"key": key_of(start_engine), "step_seconds": figures}]))
    ten_steps = {**QUICK, "steps": 10, "skip": 0, "variants": 1}
    server = start_engine(step_file=path, max_job_seconds=60)
    with client(server.endpoint) as c:
        with pytest.raises(EngineError) as e:
            submit(c, settings=ten_steps)
        assert e.value.code == protocol.LIMIT
        assert "about 1.7 min" in e.value.message and "limit of 1 min" in e.value.message, e
        job = submit(c, settings={**ten_steps, "steps": 5})  # 50 s: within
        c.cancel(job)
        run_all([c], [job])
    unmeasured = start_engine(max_job_seconds=60)  # no step measured yet: no estimate
    with client(unmeasured.endpoint) as c:
        job = submit(c, settings=ten_steps)
        c.cancel(job)
        run_all([c], [job])
    assert job.state == "cancelled"


def test_a_job_running_past_the_time_limit_ends_with_an_error_and_the_next_one_starts(
    start_engine,
):
    server = start_engine(max_job_seconds=0.5)
    with client(server.endpoint) as c:
        replicas = c.hello().get("replicas", 1)
        slow = [submit(c, settings=PAST_LIMIT) for _ in range(replicas)]
        after = submit(c, settings={**QUICK, "variants": 1})
        assert after.position == 1
        run_all([c], [*slow, after])
    for job in slow:
        assert job.state == "failed" and job.error.code == protocol.LIMIT, job.error
        assert "ran past this engine's limit" in job.error.message
        assert 0 < job.step < 1000
        (end,) = [e for e in events_of(server, job.id) if e["event"] == "failed"]
        assert end["reason"] == "time limit"
    assert after.state == "done"
    history = [(e["event"], e["job"]) for e in list(server.history)]
    first_end = min(history.index(("failed", job.id)) for job in slow)
    assert first_end < history.index(("start", after.id))  # it waited for a free slot


# -- malformed messages ----------------------------------------------------------------------


class raw_socket:
    """A bare DEALER: sends anything, waits for one reply."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def __enter__(self) -> zmq.Socket:
        return self.sock

    def __exit__(self, *_) -> None:
        self.sock.close()


def exchange(sock: zmq.Socket, frames: list[bytes], timeout_ms: int = 10_000):
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms), "no reply"
    return protocol.decode_reply(sock.recv_multipart())


def _base(kind: str) -> tuple[dict, list[bytes]]:
    """A valid request of `kind`; a submit's selection is empty so no fuzzed job ever runs."""
    if kind != "submit":
        return {"v": 2, "type": kind, "job": "j"}, []
    rgba, mask = host_picture(16, 16, (0, 0, 0, 0))
    frames = [Pixels(16, 16, "RGBA8", rgba, name="image"), Pixels(16, 16, "Y8", mask, name="mask")]
    header = json.loads(encode("submit", {"job": "j", "prompt": "p", "settings": QUICK}, frames)[0])
    return header, [rgba, mask]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
bad_ints = st.sampled_from([-1, 0, -(2**31), 2**31, 2**63, 10**12, 4097, 1.5, "16", None])


@st.composite
def malformed(draw) -> list[bytes]:
    how = draw(
        st.sampled_from(
            ["frames", "json", "field", "version", "type", "desc", "count", "size", "settings"]
        )
    )
    if how == "frames":  # anything at all
        return draw(st.lists(st.binary(max_size=300), min_size=1, max_size=6))
    if how == "json":  # valid JSON that is not a header, or not JSON
        head = draw(json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=100))
        return [head, *draw(st.lists(st.binary(max_size=50), max_size=2))]
    header, pixels = _base(draw(st.sampled_from(protocol.REQUESTS)))
    if how == "field":
        key = draw(st.sampled_from(["v", "type", "job", "prompt", "settings", "frames"]))
        if draw(st.booleans()):
            header.pop(key, None)
        else:
            header[key] = draw(json_values)
    elif how == "version":
        header["v"] = draw(st.integers().filter(lambda v: v != 1) | json_values)
    elif how == "type":
        header["type"] = draw(st.text(max_size=30))
    elif how == "settings":
        key = draw(st.sampled_from([*QUICK, "seed", "sampler", "guidance_mode", "padding", "x"]))
        header["settings"] = {**header.get("settings", {}), key: draw(json_values | bad_ints)}
    elif how == "desc" and pixels:
        desc = header["frames"][draw(st.integers(0, 1))]
        desc[draw(st.sampled_from(["width", "height", "stride", "format"]))] = draw(bad_ints)
    elif how == "count":
        extra = draw(st.lists(st.binary(max_size=64), max_size=3))
        pixels = pixels[: draw(st.integers(0, len(pixels)))] + extra
    elif how == "size" and pixels:
        i = draw(st.integers(0, 1))
        cut = draw(st.integers(-len(pixels[i]), 64).filter(lambda n: n != 0))
        pixels[i] = pixels[i][:cut] if cut < 0 else pixels[i] + bytes(cut)
    else:
        header["frames"] = draw(json_values)
    return [json.dumps(header).encode(), *pixels]


def test_a_thousand_malformed_messages_then_a_valid_job(start_engine):
    server = start_engine()
    counts = {"sent": 0, "error": 0, "other": 0}
    with raw_socket(server.endpoint) as sock:

        @settings(
            max_examples=1250,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(malformed())
        def send_one(frames: list[bytes]) -> None:
            reply = exchange(sock, frames)  # every message gets exactly one reply
            counts["sent"] += 1
            counts["error" if reply.type == "error" else "other"] += 1
            assert reply.type in ("error", "hello", "pong", "status"), reply.header

        send_one()
        huge = {"v": 2, "type": "submit", "job": "h", "prompt": "p", "frames": []}
        for width, height in ((100_000, 100_000), (-5, 16), (2**62, 1)):
            desc = {"width": width, "height": height, "format": "RGBA8", "stride": 4 * width}
            huge["frames"] = [desc, desc]
            reply = exchange(sock, [json.dumps(huge).encode(), b"x", b"y"])
            assert reply.header["code"] in (protocol.LIMIT, protocol.BAD_FIELD)
            counts["sent"] += 1
            counts["error"] += 1
    print(f"malformed messages: {counts}")
    assert counts["error"] >= 1000  # the rest were still valid after mutation: answered
    with client(server.endpoint) as c:
        job = submit(c, settings={**QUICK, "variants": 1})
        run_all([c], [job])
    assert job.state == "done"


def test_a_frame_over_the_size_limit_drops_only_that_peer(start_engine):
    server = start_engine(limits=Limits(max_side=16))  # frames over 64 KiB are refused by zmq
    with raw_socket(server.endpoint) as sock:
        sock.send_multipart([b'{"v": 2, "type": "hello"}', bytes(200_000)])
        assert not sock.poll(500)  # dropped by ZMQ_MAXMSGSIZE, never decoded
    with client(server.endpoint) as c:
        assert c.hello()["limits"]["max_side"] == 16


# -- measured, never asserted ------------------------------------------------------------------


def test_submit_to_first_progress_latency(start_engine, capsys):
    server = start_engine()
    times = []
    with client(server.endpoint) as c:
        for _ in range(20):
            start = time.perf_counter()
            job = submit(c, settings={"steps": 10, "skip": 2, "variants": 2})
            first_progress(c, job)
            times.append(time.perf_counter() - start)
            c.cancel(job)
            run_all([c], [job])
    with capsys.disabled():
        print(
            f"\nsubmit -> first progress, warm tiny engine, 64x64, 2 variants, 8 augmentations: "
            f"median {statistics.median(times) * 1000:.0f} ms over 20 "
            f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f})"
        )


# -- the real command --------------------------------------------------------------------------


def test_serve_command_edits_for_the_cli_and_stops_cleanly_on_sigterm(tmp_path):
    from PIL import Image

    from engine.__main__ import main

    log = (tmp_path / "serve.log").open("w")
    steps = tmp_path / "steps.json"
    proc = start_serve(log, "--keepalive-timeout", "2", "--step-times", str(steps))
    try:
        assert select.select([proc.stdout], [], [], 180)[0], "engine did not start"
        ready = proc.stdout.readline()
        endpoint = re.match(r"engine ready at (\S+) \((.*) on cpu\)", ready).group(1)
        rgba, mask = host_picture(64, 48, (10, 8, 20, 16))
        image = np.frombuffer(rgba, np.uint8).reshape(48, 64, 4)[..., :3]
        Image.fromarray(image).save(tmp_path / "in.png")
        Image.fromarray(np.frombuffer(mask, np.uint8).reshape(48, 64)).save(tmp_path / "m.png")
        out = tmp_path / "out"
        args = ["edit", str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png")]
        args += ["--prompt", "a red ball", "--out", str(out), "--engine", endpoint]
        args += ["--steps", "3", "--skip", "1", "--variants", "2", "--seed", "5"]
        assert main(args + ["--augmentations", "2"]) == 0
        scores = json.loads((out / "scores.json").read_text())
        assert "tiny UNet" in scores["models"] and scores["prompt"] == "a red ball"
        assert [(v["rank"], v["file"]) for v in scores["variants"]] == [
            (1, "rank-1.png"),
            (2, "rank-2.png"),
        ]
        assert {v["seed"] for v in scores["variants"]} == {5, 6}
        edited = np.asarray(Image.open(out / "rank-1.png"))
        keep = np.frombuffer(mask, np.uint8).reshape(48, 64) == 0
        assert (edited[keep] == image[keep]).all()  # outside the selection: the same bytes
        until(steps.exists, 10, "the step times written")  # (whole, by a rename) after the answer
        assert list(kept(steps)[0]["step_seconds"]["full"]) == ["2"]  # the edit's steps, kept

        with client(endpoint) as c:  # SIGTERM mid-job: the job is cancelled, the engine exits
            job = submit(c, settings=LONG)
            first_progress(c, job)
            proc.send_signal(signal.SIGTERM)
            run_all([c], [job])
        why = (job.error, (tmp_path / "serve.log").read_text()[-3000:])
        assert (job.state, job.cancel_reason) == ("cancelled", "shutdown"), why
        assert proc.wait(timeout=60) == 0
        assert "engine stopped" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
        log.close()
