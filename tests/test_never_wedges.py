"""The engine never wedges: the seven cases of issue 13, each a regression test, and a
property test over the whole range the protocol accepts (tiny model): every accepted job ends
with exactly one terminal event, and the engine then completes an ordinary job."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.methods.pixel import run_edit
from engine.serve.jobs import Cancelled
from engine.serve.runner import Runner
from engine.shared import protocol, request
from engine.shared.client import Client, EngineError, Job
from engine.shared.protocol import Limits, Pixels, encode
from engine.shared.request import Settings
from tests.helpers.engine import (
    LONG,
    QUICK,
    client,
    events_of,
    first_progress,
    free_port,
    host_picture,
    run_all,
    start_serve,
    submit,
)

TERMINAL = ("result", "error", "cancelled")


def terminal(events: list, job: Job) -> list:
    return [e for e in events if e.job_id == job.id and e.type in TERMINAL]


def ordinary_job_completes(endpoint: str) -> None:
    with client(endpoint) as c:
        job = submit(c, settings={**QUICK, "variants": 1})
        run_all([c], [job])
    assert job.state == "done"


# -- 1: one valid setting, or a failure in the result path, never stops the engine -------------


def test_a_diverging_setting_fails_its_job_naming_the_setting_and_the_engine_serves_on(
    start_engine,
):
    server = start_engine()
    with client(server.endpoint) as c:
        diverging = {**QUICK, "steps": 20, "skip": 0, "variants": 1, "range_weight": 1e6}
        job = submit(c, settings=diverging)
        events = run_all([c], [job])[0]
        (end,) = terminal(events, job)
        assert end.type == "error" and end.error.code == protocol.NON_FINITE
        assert "range_weight 1e+06" in end.error.message and "lower" in end.error.message
        assert c.status()["busy"] is False
    ordinary_job_completes(server.endpoint)


def test_an_exception_in_the_result_path_fails_only_its_job(start_engine, monkeypatch):
    real = Runner._result
    calls = []

    def failing_once(self, job, variants):
        calls.append(job.id)
        if len(calls) == 1:
            raise MemoryError  # as .tobytes() of a huge result would
        return real(self, job, variants)

    monkeypatch.setattr(Runner, "_result", failing_once)
    server = start_engine()
    with client(server.endpoint) as c:
        job = submit(c, settings={**QUICK, "variants": 1})
        events = run_all([c], [job], timeout=60)[0]
    (end,) = terminal(events, job)
    assert end.type == "error" and end.error.code == protocol.OUT_OF_MEMORY
    assert "lower variants" in end.error.message
    ordinary_job_completes(server.endpoint)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # meant
def test_a_worker_that_dies_fails_its_job_and_is_replaced(start_engine, monkeypatch):
    real, died = Runner.run, []

    def dying_once(self, job, progress):
        if not died:
            died.append(job.id)
            raise SystemExit  # not an Exception: the runner's own guard lets it through
        return real(self, job, progress)

    monkeypatch.setattr(Runner, "run", dying_once)
    server = start_engine()
    with client(server.endpoint) as c:
        job = submit(c, settings={**QUICK, "variants": 1})
        events = run_all([c], [job], timeout=60)[0]
    (end,) = terminal(events, job)
    assert end.type == "error" and end.error.code == protocol.INTERNAL
    assert "worker died" in end.error.message
    ordinary_job_completes(server.endpoint)


# -- 2: memory is budgeted before a job is queued ----------------------------------------------


def test_a_job_over_the_memory_budget_is_refused_naming_the_setting(start_engine):
    server = start_engine()
    server.memory_budget = server.models.size("tiny") + 6 * 2**20  # the model, and 6 MiB
    fast = {**QUICK, "guidance_mode": "fast"}  # no UNet backward: CLIP's copies cost the most
    with client(server.endpoint) as c:
        with pytest.raises(EngineError) as e:
            submit(c, settings={**fast, "variants": 8, "augmentations": 64})
        assert e.value.code == protocol.LIMIT
        assert "memory budget" in e.value.message
        assert "lower augmentations (64)" in e.value.message
        with pytest.raises(EngineError, match="guidance_mode fast"):  # the UNet's backward
            submit(c, settings={**QUICK, "variants": 8, "augmentations": 1})
        job = submit(c, settings={**fast, "variants": 1, "augmentations": 2})  # fits
        run_all([c], [job])
    assert job.state == "done"


def test_the_budget_costs_the_selection_as_grow_and_feather_will_shape_it(start_engine):
    """A grow widens the context box the edit will use: the budget sees the grown selection,
    and refuses an edit that fits only as it was drawn."""
    from engine import region

    server = start_engine(memory_budget=2**40)
    fast = {**QUICK, "guidance_mode": "fast"}
    rgba, mask_bytes = host_picture(64, 64, (20, 16, 10, 8))
    mask = np.frombuffer(mask_bytes, np.uint8).reshape(64, 64)

    def cost(mask: np.ndarray, **options):
        about = server.models.about("tiny")
        planned = about.plan(mask, Settings(**fast, **options))
        return about.memory((64, 64, 4), mask, planned)

    drawn, grown = cost(mask), cost(mask, grow=20)
    # as if the artist had selected the grown region, for a grow (exact) and a feather (within)
    assert grown.parts == cost(region.shape_selection(mask, grow=20)).parts
    feathered = cost(mask, feather=12)
    assert feathered.total > drawn.total
    assert grown.parts["image_scale"] > 2 * drawn.parts["image_scale"]
    server.memory_budget = server.models.size("tiny") + (drawn.total + grown.total) // 2
    with client(server.endpoint) as c:
        with pytest.raises(EngineError, match="memory budget") as e:
            c.submit(rgba, 64, 64, mask_bytes, "a red ball", {**fast, "grow": 20})
        assert e.value.code == protocol.LIMIT
        job = c.submit(rgba, 64, 64, mask_bytes, "a red ball", fast)  # as drawn: fits
        run_all([c], [job])
    assert job.state == "done"


def test_a_slow_admission_is_not_the_clients_silence(start_engine, monkeypatch):
    """The plan of a large selection can take seconds (on the socket thread), while the client
    waits for `accepted` and sends no keep-alive: its job is not cancelled for that silence."""
    from engine.methods.pixel import Facts

    real = Facts.plan

    def slow_plan(self, mask, settings):
        time.sleep(2.5)  # a plan longer than the keep-alive timeout
        return real(self, mask, settings)

    server = start_engine(keepalive_timeout=2.0)
    monkeypatch.setattr(Facts, "plan", slow_plan)
    with client(server.endpoint) as c:
        job = submit(c, settings={**QUICK, "variants": 1})
        run_all([c], [job])
    assert job.state == "done", job.cancel_reason


# -- 3: a job the engine lost is reported within the keep-alive timeout ------------------------


def serve_tiny(endpoint: str) -> subprocess.Popen:
    proc = start_serve(subprocess.DEVNULL, "--endpoint", endpoint)
    assert proc.stdout.readline().startswith("engine ready"), "engine did not start"
    return proc


def test_an_engine_restarted_mid_job_is_reported_as_lost_within_the_keepalive(
    start_engine, capsys
):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = serve_tiny(endpoint)
    try:
        with Client(endpoint, timeout=30, keepalive=1.0) as c:
            info = c.hello()
            job = submit(c, settings=LONG)
            first_progress(c, job)
            proc.kill()  # SIGKILL mid-job: the job is gone with the process
            proc.wait()
            start_engine(endpoint)  # restarted on the same port, answering pings
            restarted = time.monotonic()
            events = run_all([c], [job], timeout=info["keepalive"]["timeout"])[0]
            lost = time.monotonic() - restarted
    finally:
        proc.kill()
        proc.wait()
    (end,) = terminal(events, job)
    assert end.type == "error" and end.error.code == protocol.LOST
    assert "restarted" in end.error.message
    with capsys.disabled():
        print(f"\nlost job reported {lost:.2f} s after the engine came back (keep-alive 1 s)")


# -- 4: the client applies the engine's hello limits --------------------------------------------


def test_the_client_takes_results_as_wide_as_the_engine_allows(start_engine):
    server = start_engine(limits=Limits(max_side=8192))
    width, height = 4200, 6
    rgba, mask = host_picture(width, height, (0, 1, width, 4))
    with client(server.endpoint) as c:
        job = c.submit(rgba, width, height, mask, "a red ball", {**QUICK, "variants": 1})
        run_all([c], [job])
    assert job.state == "done" and job.variants[0].width == width


def test_an_image_over_the_engine_limit_is_refused_before_sending(start_engine):
    server = start_engine(limits=Limits(max_side=16))
    with client(server.endpoint) as c:
        rgba, mask = host_picture(200, 200, (10, 10, 20, 20))  # 160 kB: ZeroMQ would drop it
        start = time.monotonic()
        with pytest.raises(EngineError) as e:
            c.submit(rgba, 200, 200, mask, "a red ball", QUICK)
        assert time.monotonic() - start < 2
    assert e.value.code == protocol.LIMIT
    assert "200x200" in e.value.message and "16 px" in e.value.message


# -- 5: one client cannot starve the others ------------------------------------------------------


def test_jobs_are_served_round_robin_with_a_cap_per_client(start_engine):
    server = start_engine(limits=Limits(max_client_queue=3))
    with client(server.endpoint) as a, client(server.endpoint) as b:
        greedy = [submit(a, settings=QUICK) for _ in range(3)]
        with pytest.raises(EngineError, match="max_client_queue") as e:
            submit(a, settings=QUICK)
        assert e.value.code == protocol.LIMIT
        polite = submit(b, settings=QUICK)
        assert polite.position == 1  # right after a's running job, not after all of a's
        run_all([a, b], [*greedy, polite])
    starts = [e["job"] for e in list(server.history) if e["event"] == "start"]
    assert starts.index(polite.id) == 1


def test_a_message_over_the_total_size_limit_is_refused():
    limits = Limits(max_side=64)
    image = Pixels(64, 64, "RGBA8", bytes(64 * 1024), stride=1024)  # each frame within limits
    mask = Pixels(64, 64, "Y8", bytes(64 * 1024), stride=1024)
    frames = encode("submit", {"job": "j", "prompt": "p"}, [image, mask])
    assert all(len(f) <= limits.max_frame for f in frames)
    with pytest.raises(protocol.ProtocolError, match="over") as e:
        protocol.decode_request(frames, limits)
    assert e.value.code == protocol.LIMIT


# -- 6: shutdown during a slow step --------------------------------------------------------------


def test_stopping_during_a_slow_step_answers_everyone_in_bounded_time(
    start_engine, tiny_models, monkeypatch
):
    gate, inside = threading.Event(), threading.Event()
    real = type(tiny_models.unet).forward
    slow = {"on": False}

    def forward(self, *args, **kwargs):
        if slow["on"]:
            inside.set()
            gate.wait(60)  # a step that takes far longer than the shutdown grace
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_models.unet), "forward", forward)
    server = start_engine(shutdown_grace=1.0)
    loop = [t for t in threading.enumerate() if t.name == "engine-socket"][-1]
    try:
        with client(server.endpoint) as c, client(server.endpoint) as other:
            job = submit(c, settings=LONG)
            waiting = submit(other, settings=LONG)
            first_progress(c, job)
            slow["on"] = True
            assert inside.wait(30)  # now inside the slow forward
            stopped = time.monotonic()
            server.stop()
            assert other.status()["busy"]  # still answering while it stops
            events = run_all([c, other], [job, waiting], timeout=10)
            loop.join(5)
            took = time.monotonic() - stopped
        assert not loop.is_alive(), "run() did not return"
        for evs, j in zip(events, [job, waiting], strict=True):
            (end,) = terminal(evs, j)
            assert (end.type, j.cancel_reason) == ("cancelled", "shutdown")
        assert took < 5
    finally:
        gate.set()
        server.executor._worker.join(60)  # its edit's cancel hooks are on the shared tiny UNet


def test_a_second_signal_exits_at_once(start_engine, monkeypatch):
    from engine.serve.cli import handle_signals

    server = start_engine()
    exits: list[int] = []
    monkeypatch.setattr("os._exit", exits.append)  # instead of ending pytest
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        handle_signals(server)
        signal.raise_signal(signal.SIGTERM)
        assert server.stopping and exits == []  # the first stops, answering every job
        signal.raise_signal(signal.SIGINT)
        assert exits == [1]  # the second exits at once, whatever the engine is doing
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# -- 7: cancel within one UNet forward, before the first step and during ranking -----------------


class Counter:
    def __init__(self, unet) -> None:
        self.forwards = 0
        self.cancel_at: int | None = None  # cancel requested once this many forwards ran
        self.hook = unet.register_forward_hook(self.count)

    def count(self, *_) -> None:
        self.forwards += 1

    def check(self) -> None:
        if self.cancel_at is not None and self.forwards >= self.cancel_at:
            raise Cancelled


def edit(models, counter: Counter, on_step=None, options=LONG) -> None:
    rgba, mask = host_picture(32, 32, (8, 8, 12, 12))
    image = np.frombuffer(rgba, np.uint8).reshape(32, 32, 4).copy()
    m = np.frombuffer(mask, np.uint8).reshape(32, 32).copy()
    run_edit(models, image, m, "x", Settings(**options, seed=1), on_step, counter.check)


@pytest.mark.parametrize("cancel_at", [0, 3], ids=["before the first step", "mid-sampling"])
def test_cancel_runs_no_further_unet_forward(tiny_models, cancel_at):
    counter = Counter(tiny_models.unet)
    counter.cancel_at = cancel_at
    try:
        with pytest.raises(Cancelled):
            edit(tiny_models, counter)
    finally:
        counter.hook.remove()
    assert counter.forwards == cancel_at


def test_cancel_after_the_last_step_is_seen_before_ranking(tiny_models, monkeypatch):
    from engine.guidance import Guide

    ranked = []
    real = Guide.rank_distance
    monkeypatch.setattr(Guide, "rank_distance", lambda *a: ranked.append(1) or real(*a))
    counter = Counter(tiny_models.unet)

    def on_step(done: int, total: int, _previews) -> None:
        if done == total:
            counter.cancel_at = 0

    try:
        with pytest.raises(Cancelled):
            edit(tiny_models, counter, on_step, QUICK)
    finally:
        counter.hook.remove()
    assert ranked == []


def test_cancel_latency(start_engine, capsys):
    server = start_engine()
    times = []
    with client(server.endpoint) as c:
        for _ in range(5):
            job = submit(c, settings={**LONG, "augmentations": 8, "guidance_weight": 1000})
            first_progress(c, job)
            start = time.monotonic()
            c.cancel(job)
            run_all([c], [job])
            times.append(time.monotonic() - start)
            assert job.state == "cancelled"
    with capsys.disabled():
        print(f"\ncancel -> cancelled, warm tiny engine: max {max(times) * 1000:.0f} ms of 5")


# -- the whole accepted range -------------------------------------------------------------------

weights = st.sampled_from([0, 1e-6, 1, 50, 1000, 1e6]) | st.floats(0, 1e6)
MAX_SHAPING = int(request.BY_NAME["grow"].high)
shaping = st.sampled_from([0, 1, MAX_SHAPING]) | st.integers(0, MAX_SHAPING)
preview_requests = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "every": st.sampled_from([1, protocol.PREVIEW_MAX_EVERY]),
        "max_side": st.sampled_from([protocol.PREVIEW_MIN_SIDE, protocol.PREVIEW_MAX_SIDE]),
    },
)


@st.composite
def requests(draw):
    # up to 40 px, or 64 px: over 1.5x the tiny model's side, where the refinement pass runs
    width, height = (draw(st.integers(1, 40) | st.just(64)) for _ in range(2))
    steps = draw(st.sampled_from([2, 3, 1000]))
    strongest = max(0.01, min(1, 3 / steps))
    settings = {
        "variants": draw(st.integers(1, 8)),
        "seed": draw(st.none() | st.integers(0, 2**32 - 1)),
        "steps": steps,
        "skip": draw(st.integers(max(0, steps - 3), steps - 1)),  # at most 3 sampled steps
        "guidance_weight": draw(weights),
        "range_weight": draw(weights),
        "augmentations": draw(st.sampled_from([1, 2, 64]) | st.integers(1, 64)),
        "sampler": draw(st.sampled_from(request.BY_NAME["sampler"].choices)),
        "guidance_mode": draw(st.sampled_from(request.BY_NAME["guidance_mode"].choices)),
        "guidance_every": draw(st.integers(1, 100)),
        "padding": draw(st.sampled_from([0, 4]) | st.floats(0, 4)),
        "refine": draw(st.booleans()),
        # at most 3 of the pass's steps, as for the base edit's (10 at the least strength of 1000)
        "refine_strength": draw(st.sampled_from([0.01, strongest]) | st.floats(0.01, strongest)),
        "refine_overlap": draw(st.sampled_from([0, 0.75]) | st.floats(0, 0.75)),
        "refine_cap": draw(st.sampled_from([0, 1, 16]) | st.floats(1, 16)),
        "refine_guidance": draw(st.sampled_from([0, 1, 10]) | st.floats(0, 10)),
        "grow": draw(shaping),
        "feather": draw(shaping),
    }
    kind = draw(st.sampled_from(["pixel", "soft", "full", "box"]))
    mask = np.zeros((height, width), np.uint8)
    if kind == "pixel":
        mask[draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))] = 255
    elif kind == "soft":
        mask[:] = np.random.default_rng(draw(st.integers(0, 99))).integers(0, 256, mask.shape)
        mask[height // 2, width // 2] = draw(st.integers(1, 255))
    elif kind == "full":
        mask[:] = 255
    else:
        mask[height // 4 : height // 2 + 1, width // 3 : width // 2 + 1] = 255
    fmt = draw(st.sampled_from(["RGBA8", "BGRA8", "RGB8"]))
    channels = protocol.FORMATS[fmt]
    image = np.random.default_rng(width * height).integers(0, 256, (height, width, channels))
    prompt = draw(st.text(min_size=1, max_size=500).filter(str.strip))
    previews = draw(preview_requests)
    pixels = image.astype(np.uint8).tobytes()
    return pixels, width, height, mask.tobytes(), prompt, settings, fmt, previews


def test_every_accepted_job_ends_with_exactly_one_terminal_event(start_engine):
    server = start_engine()
    counts: dict[str, int] = {}
    with client(server.endpoint) as c:

        @settings(
            max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(requests())
        def one_job(request) -> None:
            image, width, height, mask, prompt, options, fmt, previews = request
            try:
                job = c.submit(image, width, height, mask, prompt, options, image_format=fmt,
                               previews=previews)  # fmt: skip
            except EngineError as e:  # refused before it was accepted: over the budget
                assert e.code == protocol.LIMIT, e
                counts["refused"] = counts.get("refused", 0) + 1
                return
            events = run_all([c], [job], timeout=120)[0]
            (end,) = terminal(events, job)
            assert not (end.type == "error" and end.error.code == protocol.INTERNAL), end.error
            outcome = end.error.code if end.error else end.type
            counts[outcome] = counts.get(outcome, 0) + 1
            if any(e.type == "progress" and e.total > options["steps"] - options["skip"]
                   for e in events):  # fmt: skip
                counts["refined"] = counts.get("refined", 0) + 1  # the pass ran
            ends = [e for e in events_of(server, job.id) if e["event"] not in ("start", "preview")]
            assert [e["event"] for e in ends] in (["done"], ["failed"], ["cancelled"])

        one_job()
    print(f"outcomes: {counts}")
    ordinary_job_completes(server.endpoint)


def test_a_ping_names_jobs_and_the_pong_says_which_are_unknown(start_engine):
    server = start_engine()
    with zmq.Context.instance().socket(zmq.DEALER) as sock:
        sock.connect(server.endpoint)
        sock.send_multipart(encode("ping", {"jobs": ["a", "b"]}))
        assert sock.poll(5000)
        pong = json.loads(sock.recv_multipart()[0])
    assert pong["type"] == "pong" and pong["unknown"] == ["a", "b"]
    assert pong["instance"] == server.instance
