"""A bounded soak of the engine (`serve --model tiny` in its own process): 10,000 malformed
messages, a few hundred valid extreme jobs from three clients, clients killed mid-job, the engine
killed and restarted under waiting clients. It must end serving, with every live client told the
fate of every job it had accepted and the engine's peak memory within its budget. It prints its
figures (the closing note of issue 13 quotes them)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from engine.shared import protocol, request
from engine.shared.client import Client, EngineError, Job
from engine.shared.protocol import Pixels, encode
from tests.helpers.engine import LONG, ORPHAN, QUICK, ROOT, free_port, host_picture, start_serve

BUDGET_GIB = 1.0
KEEPALIVE_TIMEOUT = 3.0
MALFORMED = 10_000
EXTREME = 200


def serve(endpoint: str, log: Path) -> subprocess.Popen:
    proc = start_serve(
        log.open("a"), "--endpoint", endpoint, "--memory-budget", str(BUDGET_GIB),
        "--keepalive-timeout", str(KEEPALIVE_TIMEOUT),
    )  # fmt: skip
    assert proc.stdout.readline().startswith("engine ready"), log.read_text()[-2000:]
    return proc


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def malformed(rng: random.Random) -> list[bytes]:
    """A request broken in one of many ways (never a frame over ZeroMQ's size limit)."""
    rgba, mask = host_picture(8, 8, (0, 0, 0, 0))  # empty selection: no fuzzed job ever runs
    frames = [Pixels(8, 8, "RGBA8", rgba, name="image"), Pixels(8, 8, "Y8", mask, name="mask")]
    header = json.loads(encode("submit", {"job": "j", "prompt": "p", "settings": QUICK}, frames)[0])
    pixels = [rgba, mask]
    junk = [None, True, -1, 2**63, 1.5, "x" * 300, [], {}, {"a": [1, {}]}, "", 0]
    how = rng.randrange(9)
    if how == 0:
        return [rng.randbytes(rng.randrange(300)) for _ in range(rng.randrange(1, 6))]
    if how == 1:
        header[rng.choice(["v", "type", "job", "prompt", "settings", "frames"])] = rng.choice(junk)
    elif how == 2:
        header["type"] = rng.choice(["hello", "ping", "status", "cancel", "nope", ""])
        header["jobs"] = rng.choice(junk + [["ok"], ["bad id!"], ["a"] * 300])
        pixels = pixels[: rng.randrange(3)]
    elif how == 3:
        header["settings"] = {rng.choice([*QUICK, "padding", "seed", "x"]): rng.choice(junk)}
    elif how == 4:
        desc = header["frames"][rng.randrange(2)]
        desc[rng.choice(["width", "height", "stride", "format"])] = rng.choice(junk + [5000])
    elif how == 5:
        pixels = pixels + [rng.randbytes(20)] * rng.randrange(1, 4)
    elif how == 6:
        i = rng.randrange(2)
        pixels[i] = pixels[i][: rng.randrange(len(pixels[i]))]
    elif how == 7:
        header["v"] = rng.choice([0, 2, "1", 1.0, None])
    else:
        return [json.dumps(rng.choice(junk)).encode(), *pixels]
    return [json.dumps(header).encode(), *pixels]


def extreme(rng: random.Random) -> tuple[tuple, dict]:
    """A valid job at the edges of the accepted range, one or two sampled steps."""
    w, h = rng.choice([1, 2, 7, 33, 64]), rng.choice([1, 3, 31, 64])
    box = rng.choice([(0, 0, 1, 1), (0, 0, w, h), (w // 3, h // 3, max(1, w // 2), max(1, h // 2))])
    rgba, mask = host_picture(w, h, box)
    if rng.random() < 0.3:  # soft
        mask = bytes(rng.randrange(1, 256) if m else rng.randrange(0, 40) for m in mask)
    steps = rng.choice([2, 3, 1000])
    settings = {
        "variants": rng.choice([1, 1, 2, 8]),
        "seed": rng.choice([None, 0, 2**32 - 1]),
        "steps": steps,
        "skip": steps - rng.choice([1, 1, 2]),
        "guidance_weight": rng.choice([0, 1, 1000, 1e6]),
        "range_weight": rng.choice([0, 50, 1e6]),
        "augmentations": rng.choice([1, 1, 2, 64]),
        "sampler": rng.choice(request.BY_NAME["sampler"].choices),
        "guidance_mode": rng.choice(request.BY_NAME["guidance_mode"].choices),
        "guidance_every": rng.choice([1, 100]),
        "padding": rng.choice([0, 0.25, 4]),
    }
    prompt = rng.choice(["a red ball", "x", "é" * 500, "🙂 " * 100])
    return (rgba, w, h, mask, prompt), settings


@pytest.mark.soak
def test_soak(tmp_path, capsys):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path / "engine.log"
    rng = random.Random(13)
    started = time.monotonic()
    figures: dict[str, object] = {}
    engine = serve(endpoint, log)
    baseline = memory_kib(engine.pid)["VmRSS"]
    peaks: list[int] = []

    # 1. malformed messages, pipelined 200 at a time: each gets exactly one reply
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    replies = 0
    for _ in range(MALFORMED // 200):
        for _ in range(200):
            sock.send_multipart(malformed(rng))
        for _ in range(200):
            assert sock.poll(30_000), f"no reply after {replies}"
            reply = protocol.decode_reply(sock.recv_multipart())
            assert reply.type in ("error", "hello", "pong", "status"), reply.header
            replies += 1
    sock.close()
    assert replies == MALFORMED
    figures["malformed messages answered"] = f"{replies} of {MALFORMED}"

    # 2. clients killed mid-job (SIGKILL, as GIMP does to a cancelled plug-in)
    killed = 0
    for _ in range(3):
        orphan = subprocess.Popen(
            [sys.executable, "-c", ORPHAN, endpoint], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        orphan.stdout.readline()
        assert orphan.stdout.readline().startswith("progress")
        orphan.kill()
        orphan.wait()
        killed += 1
    figures["clients killed mid-job"] = killed

    # 3. extreme jobs from three clients, each keeping up to 4 in flight; the engine is killed
    # and restarted half-way under them, and a fourth client waits on a long job through it
    # engine_timeout: only the pong can report the lost jobs, however slow the restart
    clients = [Client(endpoint, timeout=30, keepalive=0.5, engine_timeout=900) for _ in range(3)]
    fates: dict[str, list[str]] = {}  # accepted job -> its terminal events
    active: list[list[Job]] = [[] for _ in clients]
    submitted = refused = 0
    outcomes: dict[str, int] = {}
    waiter = Client(endpoint, timeout=30, keepalive=0.5, engine_timeout=900)
    long_job: Job | None = None
    restarted_at = lost_after = None
    deadline = time.monotonic() + 600
    while submitted < EXTREME or any(active):
        assert time.monotonic() < deadline, "the soak's jobs did not finish"
        for c, jobs in zip(clients, active, strict=True):
            if submitted < EXTREME and len(jobs) < 4:
                args, settings = extreme(rng)
                submitted += 1
                try:
                    jobs.append(c.submit(*args, settings))
                    fates[jobs[-1].id] = []
                except EngineError as e:
                    assert e.code == protocol.LIMIT, e
                    refused += 1
            for event in c.poll(0.005):
                if event.type in ("result", "error", "cancelled") and event.job is not None:
                    fates[event.job.id].append(event.type)
                    key = event.error.code if event.error else event.type
                    outcomes[key] = outcomes.get(key, 0) + 1
            jobs[:] = [j for j in jobs if not j.done]
        if long_job is None and submitted >= EXTREME // 2:
            rgba, mask = host_picture(64, 64, (20, 16, 30, 24))
            long_job = waiter.submit(rgba, 64, 64, mask, "a red ball", LONG)
            while long_job.step == 0:
                waiter.poll(0.01)
            peaks.append(memory_kib(engine.pid)["VmHWM"])
            engine.kill()
            engine.wait()
            engine = serve(endpoint, log)
            restarted_at = time.monotonic()
        if long_job is not None and lost_after is None:
            waiter.poll(0.0)
            if long_job.done:
                lost_after = time.monotonic() - restarted_at
                assert long_job.error is not None and long_job.error.code == protocol.LOST
    assert lost_after is not None and lost_after < KEEPALIVE_TIMEOUT
    untold = [j for j, ends in fates.items() if len(ends) != 1]
    assert not untold, f"jobs without exactly one terminal event: {untold[:5]}"
    figures["extreme jobs"] = f"{submitted} submitted, {refused} refused by the budget, " + (
        f"{len(fates)} accepted, outcomes {dict(sorted(outcomes.items()))}"
    )
    figures["restart under waiting clients"] = f"long job reported lost {lost_after:.2f} s after"

    # 4. the engine still serves an ordinary job
    with Client(endpoint, timeout=30) as c:
        rgba, mask = host_picture(64, 64, (20, 16, 30, 24))
        job = c.wait(c.submit(rgba, 64, 64, mask, "a red ball", {**QUICK, "variants": 1}), 120)
    assert job.state == "done"
    for c in [*clients, waiter]:
        c.close()
    peaks.append(memory_kib(engine.pid)["VmHWM"])
    engine.terminate()
    assert engine.wait(30) == 0
    text = log.read_text()
    figures["orphans dropped on disconnect"] = text.count("(disconnected)")
    peak_mib, base_mib = max(peaks) / 1024, baseline / 1024
    figures["engine peak memory"] = (
        f"{peak_mib:.0f} MiB RSS, {peak_mib - base_mib:.0f} MiB over its {base_mib:.0f} MiB "
        f"after loading, budget {BUDGET_GIB * 1024:.0f} MiB"
    )
    figures["soak time"] = f"{time.monotonic() - started:.0f} s"
    assert text.count("(disconnected)") >= killed
    assert (peak_mib - base_mib) <= BUDGET_GIB * 1024
    with capsys.disabled():
        print("\nsoak (tiny model):")
        for key, value in figures.items():
            print(f"  {key}: {value}")
