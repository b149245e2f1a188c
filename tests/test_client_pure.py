"""The plug-ins' client without a real engine: imports, Python 3.10 syntax, timeouts, and its
event handling against a scripted fake engine (a ROUTER socket in a thread)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from engine.shared import protocol
from engine.shared.client import (
    Client,
    EngineError,
    EngineUnreachable,
    VersionMismatch,
    rgba_to_bgra,
)
from engine.shared.protocol import Pixels, encode
from tests.helpers.engine import free_port, host_picture

ROOT = Path(__file__).resolve().parents[1]


def test_fresh_interpreter_imports_client_without_torch_or_numpy():
    code = (
        "import sys, engine.shared.protocol, engine.shared.client\n"
        "heavy = {'torch', 'numpy', 'platformdirs'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


SHIPPED = [
    "__init__.py", *(f"shared/{p.name}" for p in sorted((ROOT / "engine/shared").glob("*.py")))
]


@pytest.mark.parametrize("module", SHIPPED)
def test_client_side_parses_as_python_310(module):
    source = (ROOT / "engine" / module).read_text()
    ast.parse(source, feature_version=(3, 10))


def test_unreachable_engine_raises_within_timeout():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Client(endpoint, timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(EngineUnreachable, match=f"engine unreachable at {endpoint}"):
            client.hello()
        assert time.monotonic() - start < 5  # bounded: never a hang
        rgba, mask = host_picture(8, 8, (1, 1, 3, 3))
        with pytest.raises(EngineUnreachable):
            client.submit(rgba, 8, 8, mask, "x")


def test_a_waiting_request_calls_idle_which_may_give_it_up(fake_engine):
    """A host without threads (GIMP) keeps its window alive through `idle` while a request
    waits, and gives the wait up by raising there; a submit given up is cancelled at the
    engine, whose answer may still come."""
    engine = fake_engine(lambda h: [], hello=None)  # hears everything, answers nothing
    calls: list[float] = []

    class GaveUp(Exception):
        pass

    def idle() -> None:
        calls.append(time.monotonic())
        if len(calls) % 5 == 0:
            raise GaveUp

    with Client(engine.endpoint, timeout=5) as client:
        client.idle = idle
        start = time.monotonic()
        with pytest.raises(GaveUp):
            client.hello()
        assert time.monotonic() - start < 1 and len(calls) == 5  # not the 5 s timeout
        assert max(b - a for a, b in zip(calls, calls[1:], strict=False)) < 0.5
        client.info = {"limits": {}, **SERVED}  # as if hello had answered: submit sends at once
        with pytest.raises(GaveUp):
            client.submit(*_job_args())
        deadline = time.monotonic() + 5
        while engine.requests.count("cancel") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert engine.requests[-2:] == ["submit", "cancel"]


def test_submit_checks_buffer_sizes_before_sending():
    with Client(f"tcp://127.0.0.1:{free_port()}", timeout=0.2) as client:
        with pytest.raises(ValueError, match="needs 256 bytes, got 255"):
            client.submit(bytes(255), 8, 8, bytes(64), "x")
        with pytest.raises(ValueError, match="mask"):
            client.submit(bytes(256), 8, 8, bytes(63), "x")


def test_rgba_to_bgra():
    assert rgba_to_bgra(bytes([1, 2, 3, 4, 5, 6, 7, 8])) == bytes([3, 2, 1, 4, 7, 6, 5, 8])


SERVED = {"available": [{"name": "tiny", "method": "pixel"}], "default": "tiny"}
HELLO = {"instance": "fake", "limits": protocol.Limits().to_json(), **SERVED}


class FakeEngine:
    """A ROUTER answering each request with `script(header) -> [frames lists]`; `hello` with
    `hello` (the default limits) unless it is None."""

    def __init__(self, script, hello: dict | None = HELLO) -> None:
        self.script, self.requests, self.hello = script, [], hello
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            client, head, *_ = self.sock.recv_multipart()
            header = json.loads(head)
            self.requests.append(header["type"])
            if header["type"] == "hello" and self.hello is not None:
                self.sock.send_multipart([client, *encode("hello", self.hello)])
                continue
            for reply in self.script(header):
                self.sock.send_multipart([client, *reply])

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def fake_engine():
    engines = []

    def make(script, **options) -> FakeEngine:
        engines.append(FakeEngine(script, **options))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def test_events_follow_a_job_to_its_result(fake_engine):
    rgba = bytes(range(16))
    variant = {"rank": 1, "x": 3, "y": 4, "width": 2, "height": 2, "distance": 0.25, "seed": 9}

    def script(h):
        if h["type"] == "submit":
            return [
                encode("accepted", {"job": h["job"], "position": 1}),
                encode("progress", {"job": h["job"], "step": 1, "total": 2}),
                encode("progress", {"job": "someone-else", "step": 1, "total": 2}),
                encode("progress", {"job": h["job"], "step": 2, "total": 2}),
                encode(
                    "result",
                    {"job": h["job"], "models": "fake", "variants": [variant]},
                    [Pixels(2, 2, "RGBA8", rgba)],
                ),
            ]
        return [encode("pong")] if h["type"] == "ping" else []

    engine = fake_engine(script)
    with Client(engine.endpoint, timeout=5) as client:
        job = client.submit(*_job_args())
        assert (job.position, job.state) == (1, "queued")
        events = []
        while not job.done:
            events += client.poll(0.05)
    kinds = [(e.type, e.step, e.job is job) for e in events]
    assert kinds == [
        ("progress", 1, True),
        ("progress", 1, False),  # not ours: reported without a job
        ("progress", 2, True),
        ("result", 0, True),
    ]
    assert job.state == "done" and job.models == "fake"
    (v,) = job.variants
    assert (v.rank, v.x, v.y, v.width, v.height, v.rgba, v.distance, v.seed) == (
        1, 3, 4, 2, 2, rgba, 0.25, 9,
    )  # fmt: skip


def _job_args():
    rgba, mask = host_picture(8, 8, (1, 1, 3, 3))
    return rgba, 8, 8, mask, "a red ball", {"variants": 1}


def test_refused_submit_raises_engine_error(fake_engine):
    def script(h):
        return [protocol.error(protocol.LIMIT, "prompt too long", h.get("job"))]

    with Client(fake_engine(script).endpoint, timeout=5) as client:
        with pytest.raises(EngineError) as e:
            client.submit(*_job_args())
    assert (e.value.code, e.value.message) == (protocol.LIMIT, "prompt too long")


def test_engine_of_another_version_raises_version_mismatch(fake_engine):
    """The one-model engine (protocol 1) refuses this client's hello (2) in its own version."""

    def script(h):
        words = "protocol version mismatch: the client speaks 2, the engine speaks 1"
        refusal = {"v": 1, "type": "error", "code": "version_mismatch", "message": words}
        return [[json.dumps(refusal).encode()]]

    with Client(fake_engine(script, hello=None).endpoint, timeout=5) as client:
        with pytest.raises(VersionMismatch, match="engine speaks 1, this client speaks 2"):
            client.hello()


def test_keepalive_is_sent_while_a_job_is_active_and_a_silent_engine_fails_it(fake_engine):
    def script(h):
        return [encode("accepted", {"job": h["job"], "position": 0})] if "job" in h else []

    engine = fake_engine(script)  # accepts, then never answers again
    with Client(engine.endpoint, timeout=5, keepalive=0.05, engine_timeout=0.5) as client:
        job = client.submit(*_job_args())
        events = []
        while not events:
            events = client.poll(0.05)
    assert engine.requests.count("ping") >= 3
    (event,) = events
    assert event.type == "error" and event.job is job and job.state == "failed"
    assert event.error.code == "timeout" and "engine unreachable at" in event.error.message


def test_keepalive_goes_at_the_interval_the_engines_hello_announces(fake_engine):
    """The client's own default is long (30 s): the pings the engine waits for here come only
    at the 0.05 s its hello asks for."""
    pings: list[float] = []

    def script(h):
        if h["type"] == "ping":
            pings.append(time.monotonic())
            return [encode("pong")]
        return [encode("accepted", {"job": h["job"], "position": 0})] if "job" in h else []

    hello = HELLO | {"keepalive": {"interval": 0.05, "timeout": 5.0}}
    with Client(fake_engine(script, hello=hello).endpoint, timeout=5, keepalive=30) as client:
        assert client.hello()["keepalive"]["interval"] == client.keepalive == 0.05
        client.submit(*_job_args())
        deadline = time.monotonic() + 20  # a bound for a stalled machine, not a wait
        while len(pings) < 3:
            assert time.monotonic() < deadline, f"{len(pings)} keep-alives at 0.05 s"
            client.poll(0.01)


@pytest.mark.parametrize("announced", [None, {}, {"interval": "1"}, {"interval": 0},
                                       {"interval": -2}, {"interval": True}, [1]])  # fmt: skip
def test_a_missing_or_odd_keepalive_in_hello_keeps_the_clients_own(fake_engine, announced):
    hello = HELLO if announced is None else HELLO | {"keepalive": announced}
    with Client(fake_engine(lambda h: [], hello=hello).endpoint, timeout=5, keepalive=0.3) as c:
        c.hello()
        assert c.keepalive == 0.3


def test_one_unreadable_message_fails_only_its_job_and_loses_no_other_event(fake_engine):
    jobs: list[str] = []
    variant = {"rank": 1, "x": 0, "y": 0, "width": 1, "height": 1, "distance": 0.5, "seed": 1}

    def script(h):
        if h["type"] == "submit":
            jobs.append(h["job"])
            return [encode("accepted", {"job": h["job"], "position": 0})]
        if h["type"] != "ping" or len(jobs) < 2:
            return []
        a, b = jobs
        broken = encode("result", {"job": a, "models": "fake", "variants": [variant]}, [])
        good = encode("result", {"job": b, "models": "fake", "variants": [variant]},
                      [Pixels(1, 1, "RGBA8", bytes(4))])  # fmt: skip
        jobs.clear()
        return [encode("progress", {"job": b, "step": 1, "total": 1}), broken, good]

    engine = fake_engine(script)
    with Client(engine.endpoint, timeout=5, keepalive=0.05) as client:
        a, b = client.submit(*_job_args()), client.submit(*_job_args())
        events = []
        deadline = time.monotonic() + 10
        while not (a.done and b.done):
            assert time.monotonic() < deadline
            events += client.poll(0.05)
    assert [(e.type, e.job) for e in events] == [("progress", b), ("error", a), ("result", b)]
    assert a.state == "failed" and "unreadable reply" in a.error.message
    assert b.state == "done" and len(b.variants) == 1


def test_a_pong_naming_an_active_job_fails_it_as_lost(fake_engine):
    def script(h):
        if h["type"] == "submit":
            return [encode("accepted", {"job": h["job"], "position": 0})]
        return [encode("pong", {"instance": "other", "unknown": h.get("jobs", [])})]

    with Client(fake_engine(script).endpoint, timeout=5, keepalive=0.05) as client:
        job = client.submit(*_job_args())
        events = []
        deadline = time.monotonic() + 5  # a lost job is reported at the first pong
        while not events and time.monotonic() < deadline:
            events = client.poll(0.05)
    (event,) = events
    assert event.job is job and job.state == "failed" and event.error.code == protocol.LOST
    assert "engine was restarted" in event.error.message
