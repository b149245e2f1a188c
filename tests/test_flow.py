"""The one edit flow both plug-ins drive (engine/shared/flow.py): a fake host (tests/helpers/
hosts.py) and a fake client, then the real client against a dead and a live engine. The hosts'
adapters run in real Krita and real GIMP in tests/test_krita_real.py and tests/test_gimp_real.py.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from engine.shared import client as engine_client
from engine.shared import flow, history, settings, wording
from engine.shared.client import (
    EngineError,
    EngineUnreachable,
    Preview,
    Variant,
    VersionMismatch,
)
from engine.shared.geometry import Rect
from tests.helpers.client import MADE_BY, FakeClient
from tests.helpers.engine import free_port, until
from tests.helpers.hosts import ROOT, FakeHost

VALUES = settings.defaults() | {"prompt": "a red circle"}
SELECTED = Rect(40, 30, 20, 12)  # image coordinates: the source layer sits at (10, 8)


def edit_of(host, client=None, values=VALUES, **options) -> flow.Edit:
    connect = (lambda endpoint: client) if client is not None else None
    return flow.Edit(host, settings.request(values), connect=connect, **options)


def run(edit: flow.Edit, timeout: float = 10.0) -> flow.Edit:
    """Start the edit and tick it until it ends, as a host's timer would."""
    edit.start()
    return finish(edit, timeout)


def finish(edit: flow.Edit, timeout: float = 10.0) -> flow.Edit:
    until(lambda: not edit.tick(), timeout, "the edit's end", every=0.002)
    return edit


def test_the_flow_imports_without_pyzmq_or_numpy():
    """GIMP registers its procedure before any connection, and neither host's Python has numpy:
    the client comes only when an edit connects."""
    code = (
        "import sys; sys.modules['zmq'] = None\n"  # any `import zmq` now fails
        "import engine.shared.flow\n"
        "heavy = {'numpy', 'torch', 'engine.shared.client'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# -- with a fake client -------------------------------------------------------------------------


def test_an_edit_goes_through_its_states_and_adds_the_layers_best_visible():
    host = FakeHost(SELECTED)
    client = FakeClient([("progress", 1, 8), ("progress", 8, 8), ("result",)])
    edit = run(edit_of(host, client))
    states = [s.state for s in host.statuses]
    assert states[0] == flow.CONNECTING and states[-1] == flow.DONE
    assert flow.SUBMITTING in states and states.index(flow.SUBMITTING) < states.index(flow.RUNNING)
    endpoint = settings.DEFAULT_ENDPOINT
    assert host.messages[:2] == [wording.connecting(endpoint), wording.sending(endpoint)]
    # Draft: 50 steps at 80% = 40 steps at the engine's 0.5 s a step (2 variants, full guidance)
    started = next(s for s in host.statuses if s.state == flow.RUNNING)
    assert started.message.startswith("Running on ") and "Expected: about 20 s" in started.message
    assert [s.fraction for s in host.statuses if s.step and s.active] == [1 / 8, 1.0]
    assert host.statuses[-2].message.startswith("Denoising: step 8 of 8")
    (group, layers), crop = host.added[0], host.reads[0]
    assert group == wording.group_name("a red circle") and edit.job is client.job
    assert host.messages[-1] == wording.added(2, group)
    assert [layer.visible for layer in layers] == [True, False]
    for rank, layer in enumerate(layers, 1):
        # the variants' x, y are in the window, the window in the layer, the layer at (10, 8)
        assert (layer.x, layer.y, layer.width, layer.height) == (10 + crop.x + 1, 8 + crop.y + 2,
                                                                 5, 4)  # fmt: skip
        assert layer.name == f'"a red circle" #{rank} ({MADE_BY}, CLIP d={0.5 + rank / 10:.3f})'
    sent = client.submitted
    assert sent.settings == settings.request(VALUES).settings and sent.previews == {"every": 1}
    assert sent.image_format == "RGBA8" and client.closed


def test_a_model_loading_before_the_steps_is_said_not_a_frozen_bar():
    host = FakeHost(SELECTED)
    loading = ("progress", 0, 8, [], "loading sd15, 2.1 GB")  # the engine evicted it earlier
    run(edit_of(host, FakeClient([loading, ("progress", 8, 8), ("result",)])))
    running = [s.message for s in host.statuses if s.state == flow.RUNNING]
    assert "Loading sd15, 2.1 GB…" in running
    assert running.index("Loading sd15, 2.1 GB…") < next(
        i for i, m in enumerate(running) if m.startswith("Denoising: step 8 of 8"))  # fmt: skip


def test_the_mask_sent_is_the_selection_in_the_window():
    host = FakeHost(SELECTED)
    client = FakeClient([("result",)])
    run(edit_of(host, client))
    w, h, mask = client.submitted.width, client.submitted.height, client.submitted.mask
    crop = host.reads[0]
    assert (w, h) == (crop.width, crop.height)
    ys = [j for j in range(h) if any(mask[j * w : (j + 1) * w])]
    xs = [i for i in range(w) if any(mask[j * w + i] for j in range(h))]
    # image (40, 30) is the layer's (30, 22): in the window's coordinates
    assert (xs[0] + crop.x, ys[0] + crop.y, len(xs), len(ys)) == (30, 22, 20, 12)


def test_krita_pixels_go_as_bgra():
    host = FakeHost(SELECTED, pixel_format="BGRA8")
    client = FakeClient([("result",)])
    run(edit_of(host, client))
    assert client.submitted.image_format == "BGRA8"


@pytest.mark.parametrize(
    ("selected", "message"),
    [(None, wording.NOTHING_SELECTED), (Rect(0, 0, 8, 8), wording.outside('the layer "source"'))],
)
def test_nothing_to_edit_is_said_before_any_connection(selected, message):
    def connect(endpoint):
        raise AssertionError("no engine should be asked")

    host = FakeHost(selected)
    edit = flow.Edit(host, settings.request(VALUES), connect=connect)
    edit.start()
    assert edit.state == flow.FAILED and host.messages == [message]
    assert edit.tick() is False


def test_a_selection_whose_box_overlaps_but_whose_pixels_do_not_is_said():
    host = FakeHost(SELECTED, coverage=0)  # e.g. an L-shaped selection missing the layer
    client = FakeClient([])
    edit = run(edit_of(host, client))
    assert edit.state == flow.FAILED and host.messages[-1] == wording.blank('the layer "source"')
    assert client.submitted is None and client.closed


@pytest.mark.parametrize(
    ("client", "words"),
    [
        (FakeClient(hello_error=EngineUnreachable("engine unreachable at X")),
         "Engine unreachable at X"),
        (FakeClient(submit_error=EngineError("limit", "image too big")),
         "The engine refused the edit (limit): image too big"),
        (FakeClient(hello_error=VersionMismatch("protocol 2, plug-in 1")),
         "from the same version"),
        (FakeClient([("error", "internal", "out of memory")]), "(internal): out of memory"),
        (FakeClient([("error", "timeout", "engine unreachable at X: silent for 10 s")]),
         "Lost the engine: engine unreachable at X: silent"),
        (FakeClient([("cancelled", "shutdown")]), "Cancelled (shutdown)."),
        (FakeClient([("result", [])]), "The engine returned no result."),
    ],
)  # fmt: skip
def test_engine_failures_become_messages_and_the_client_closes(client, words):
    host = FakeHost(SELECTED)
    edit = run(edit_of(host, client))
    assert edit.state == flow.FAILED and words in host.messages[-1], host.messages
    assert client.closed and not host.added


def test_a_missing_client_is_a_message():
    def connect(endpoint):
        raise ImportError("No module named 'zmq'")

    host = FakeHost(SELECTED)
    edit = run(flow.Edit(host, settings.request(VALUES), connect=connect))
    assert edit.state == flow.FAILED and "install.py" in host.messages[-1]


def test_a_malformed_address_is_a_message():
    host = FakeHost(SELECTED)
    edit = run(edit_of(host, values=VALUES | {"endpoint": "tcp://127.0.0.1:x"}))
    assert edit.state == flow.FAILED and "Not an engine address" in host.messages[-1]


def test_layers_that_cannot_be_added_are_a_message():
    host = FakeHost(SELECTED)
    host.add_error = flow.EditError("the image was closed while the engine worked")
    edit = run(edit_of(host, FakeClient([("result",)])))
    assert edit.state == flow.FAILED
    assert host.messages[-1] == "The result could not be added: the image was closed while " \
        "the engine worked"  # fmt: skip


def test_each_edit_is_estimated_from_the_engines_hello_of_its_own():
    for info, expected in (({}, "the time is known after the engine's first edit"),
                           ({"step_seconds": {"full": {"2": 2.0}}}, "Expected: about")):
        host = FakeHost(SELECTED)
        run(edit_of(host, FakeClient([("result",)], info=info)))
        started = next(s for s in host.statuses if s.state == flow.RUNNING)
        assert expected in started.message, started.message


def test_papers_warning_on_a_cpu_engine_comes_with_the_preset():
    paper = VALUES | {"preset": "paper"}
    for preset, warned in (("paper", True), ("", False)):
        host = FakeHost(SELECTED)
        run(edit_of(host, FakeClient([("result",)]), paper, preset=preset))
        started = next(s for s in host.statuses if s.state == flow.RUNNING)
        assert ("Paper on a CPU engine is slow" in started.message) == warned


# -- previews ----------------------------------------------------------------------------------


def preview(variant: int, distance: float | None, colour: int) -> Preview:
    """A 2 x 1 PNG preview of the box (3, 4, 10, 5) in the window."""
    buffer = io.BytesIO()
    Image.new("RGBA", (2, 1), (colour, 0, 0, 255)).save(buffer, "PNG")
    return Preview(variant, 7 + variant, distance, 1, 2, 1, buffer.getvalue(), (3, 4, 10, 5))


@pytest.mark.parametrize("end", [("result",), ("error", "internal", "boom"), ("cancelled", "x")])
def test_previews_are_shown_and_ended_before_the_layers_whatever_the_end(end):
    host = FakeHost(SELECTED)
    shown = [preview(0, 0.9, 10), preview(1, 0.4, 20), preview(2, None, 30)]
    run(edit_of(host, FakeClient([("progress", 1, 8, shown), ("progress", 2, 8), end])))
    assert host.previews == [(host.reads[0], shown), "ended"]
    assert bool(host.added) == (end[0] == "result")


def test_the_closest_preview_is_decoded_over_its_box_in_the_source():
    window = Rect(20, 10, 40, 30)
    previews = [preview(0, 0.9, 10), preview(1, 0.4, 20), preview(2, None, 30)]
    box, width, height, rgba = flow.closest_preview(window, previews)
    assert box == Rect(23, 14, 10, 5)  # the box in the window, the window in the source
    assert (width, height, rgba) == (2, 1, bytes((20, 0, 0, 255)) * 2)  # variant 1: closest
    unscored = [preview(0, None, 50), preview(1, None, 60)]
    assert flow.closest_preview(window, unscored)[3] == bytes((50, 0, 0, 255)) * 2


def test_a_run_in_the_history_gets_the_previews_and_the_result_or_is_discarded():
    runs = history.History()
    ranked = [Variant(1, 1, 2, 5, 4, bytes(80), 0.3, 8), Variant(2, 1, 2, 5, 4, bytes(80), 0.8, 7)]
    for end, state in ((("result", ranked), history.DONE),
                       (("error", "internal", "boom"), history.DISCARDED)):  # fmt: skip
        entry = runs.start("doc", "a red circle", {})
        shown = [preview(0, 0.9, 10), preview(1, 0.4, 20)]  # seeds 7 and 8
        run(edit_of(FakeHost(SELECTED), FakeClient([("progress", 1, 8, shown), end]), run=entry))
        assert entry.state == state and {s.seed for s in entry.shots} == {7, 8}
    done = runs.runs("doc")[0]
    assert [(s.seed, s.rank) for s in done.shots] == [(8, 1), (7, 2)]
    assert done.shots[0].layer == wording.layer_name("a red circle", 1, 0.3, MADE_BY)


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_while_running_reaches_the_engine_and_adds_nothing_even_a_crossing_result():
    host = FakeHost(SELECTED)
    client = FakeClient([("progress", 1, 8, [preview(0, 0.9, 10)])])
    edit = edit_of(host, client)
    edit.start()
    while not host.previews:
        edit.tick()
    edit.cancel()
    assert client.cancelled == [client.job] and host.messages[-1] == wording.CANCELLING
    client.push("progress", 2, 8)  # once cancelled only the end matters
    client.push("result")  # the cancel crossed a finished job: still nothing is added
    finish(edit)
    assert edit.state == flow.CANCELLED and host.messages[-1] == wording.CANCELLED
    assert not host.added and host.previews[-1] == "ended" and client.closed
    assert [s.step for s in host.statuses if s.step] == [1, 1, 1]  # progress, cancel, end


def test_a_cancel_the_engine_never_answers_ends_the_edit_within_the_wait(monkeypatch):
    monkeypatch.setattr(flow, "CANCEL_WAIT", 0.3)
    host = FakeHost(SELECTED)
    client = FakeClient([("progress", 1, 8)])
    edit = edit_of(host, client)
    edit.start()
    while edit.state != flow.RUNNING or not host.statuses[-1].step:
        edit.tick()
    edit.cancel()
    start = time.monotonic()
    finish(edit)
    assert edit.state == flow.CANCELLED and time.monotonic() - start < 2 and client.closed


def test_cancel_while_the_submit_waits_gives_it_up_at_once():
    """The client calls `idle` between its short waits (in the request thread): after a
    cancel it raises there, so the edit ends without waiting for the engine."""
    client = FakeClient(gate=threading.Event())  # a submit that never returns by itself
    host = FakeHost(SELECTED)
    edit = edit_of(host, client)
    edit.start()
    while edit.state != flow.SUBMITTING:
        assert edit.tick() is True
    edit.cancel()
    finish(edit)
    assert edit.state == flow.CANCELLED and client.submitted is None and client.closed


def test_an_edit_accepted_as_the_user_cancelled_is_cancelled_at_the_engine():
    gate = threading.Event()
    client = FakeClient(gate=gate)
    host = FakeHost(SELECTED)
    edit = edit_of(host, client)
    edit.start()
    while edit.state != flow.SUBMITTING:
        edit.tick()
    client.idle = None  # the wait no longer asks: the engine accepts while the user cancels
    edit.cancel()
    gate.set()
    while edit.state != flow.RUNNING:
        edit.tick()
    assert client.cancelled == [client.job] and host.messages[-1] == wording.CANCELLING
    client.push("cancelled", "client")
    finish(edit)
    assert edit.state == flow.CANCELLED and not host.added


# -- the plug-ins' requests and windows ---------------------------------------------------------

INPUTS = [
    {"prompt": "  a stone\\nfountain ", "preset": "draft", "seed": 12},
    {"prompt": "a red ball", "preset": "paper"},
    {"prompt": "a cat", "preset": "custom", "variants": 3, "strength": 40, "steps": 60,
     "fast_guidance": True, "guidance_weight": 250.0, "seed": -1},  # fmt: skip
    {"prompt": "a moon", "preset": "draft", "grow": 3, "feather": 6, "layer_only": True},
]


@pytest.mark.parametrize("values", INPUTS)
def test_the_request_sent_is_the_values_request(values):
    client = FakeClient([("result",)])
    run(edit_of(FakeHost(SELECTED), client, settings.defaults() | values))
    request = settings.request(values)
    assert client.submitted.settings == request.settings
    assert client.submitted.prompt == request.prompt


def test_grow_and_feather_widen_the_window():
    plain, shaped = FakeHost(Rect(110, 108, 20, 20), size=(400, 300)), None
    run(edit_of(plain, FakeClient([("result",)])))
    shaped = FakeHost(Rect(110, 108, 20, 20), size=(400, 300))
    run(edit_of(shaped, FakeClient([("result",)]), VALUES | {"grow": 10, "feather": 20}))
    # the engine's grown and feathered selection reaches 10 + 30 + 1 px past the selection; the
    # window holds its context: wider than the plain selection's
    (before,), (after,) = plain.reads, shaped.reads
    assert after.width > before.width and after.x < before.x


def test_a_large_selection_gets_a_window_capped_at_the_engines_limit():
    host = FakeHost(Rect(5000, 1000, 2500, 1800), offsets=(0, 0), size=(12000, 5000))
    client = FakeClient([("result",)])
    run(edit_of(host, client), timeout=60)
    (window,) = host.reads
    assert (window.width, window.height) == (4096, 4096)  # the engine's limit, not 12000 x 5000
    assert window.x <= 5000 and 5000 + 2500 <= window.x + window.width
    assert (client.submitted.width, client.submitted.height) == (4096, 4096)
    small = FakeClient([("result",)], info={"limits": {"max_side": 3000}})
    run(edit_of(host, small), timeout=60)
    assert (small.submitted.width, small.submitted.height) == (3000, 3000)  # its hello's limit
    too_small = FakeClient([], info={"limits": {"max_side": 2000}})
    edit = run(edit_of(host, too_small))
    assert edit.state == flow.FAILED and "the engine takes at most 2000" in edit.status.message


# -- the probe ---------------------------------------------------------------------------------


def wait_for(probe: flow.Probe) -> tuple[dict, str]:
    until(lambda: probe.done, 10, "the engine's answer", every=0.002)
    return probe.result()


def test_the_probe_says_what_the_engine_runs_or_why_not():
    client = FakeClient(info={"models": "demo shapes-world UNet; CLIP", "device": "cpu"})
    info, line = wait_for(flow.Probe(" tcp://x ", lambda e: client))
    assert info["device"] == "cpu" and line == "Engine: demo shapes-world UNet on CPU"
    assert client.closed

    def unreachable(endpoint):
        return FakeClient(hello_error=EngineUnreachable(f"engine unreachable at {endpoint}"))

    assert wait_for(flow.Probe("tcp://y", unreachable)) == ({}, "Engine unreachable at tcp://y.")


# -- with the real client ---------------------------------------------------------------------


def test_a_dead_engine_fails_within_the_timeout_never_blocking_the_host():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    host = FakeHost(SELECTED)
    edit = flow.Edit(host, settings.request(VALUES | {"endpoint": endpoint}),
                     connect=lambda e: engine_client.Client(e, timeout=1.0))  # fmt: skip
    edit.start()
    started, slowest = time.monotonic(), 0.0
    while edit.active:
        t = time.monotonic()
        edit.tick()
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(0.02)
    assert edit.state == flow.FAILED and "unreachable" in host.messages[-1]
    assert time.monotonic() - started < 3.0 and slowest < 0.1


def test_cancel_while_connecting_to_a_dead_engine_ends_the_edit_at_once():
    """GIMP's window answers while the client waits (the wait is in the request thread), and a
    Cancel there gives the wait up at once, not after the client's whole timeout."""
    host = FakeHost(SELECTED)
    values = VALUES | {"endpoint": f"tcp://127.0.0.1:{free_port()}"}
    edit = flow.Edit(host, settings.request(values),
                     connect=lambda e: engine_client.Client(e, timeout=5))  # fmt: skip
    edit.start()
    edit.tick()
    start = time.monotonic()
    edit.cancel()
    finish(edit)
    assert edit.state == flow.CANCELLED and time.monotonic() - start < 1


def test_against_a_real_engine_results_carry_the_selection_as_alpha(start_engine):
    server = start_engine()
    host = FakeHost(SELECTED)
    custom = {"preset": "custom", "variants": 2, "steps": 4, "seed": 3}
    run(edit_of(host, values=VALUES | custom | {"endpoint": server.endpoint}), timeout=120)
    (group, layers), = host.added
    assert len(layers) == 2 and [la.visible for la in layers] == [True, False]
    for layer in layers:
        assert (layer.x, layer.y, layer.width, layer.height) == (40, 30, 20, 12)
        assert set(layer.rgba[3::4]) == {255}  # a hard rectangle: fully opaque inside
        assert "#" in layer.name and "(tiny [random weights], CLIP d=" in layer.name


def test_a_real_engine_takes_krita_s_bgra(start_engine):
    server = start_engine()
    host = FakeHost(Rect(108, 58, 12, 10), offsets=(0, 0), size=(160, 100), pixel_format="BGRA8")
    custom = {"preset": "custom", "variants": 1, "steps": 2, "seed": 3}
    edit = run(edit_of(host, values=VALUES | custom | {"endpoint": server.endpoint}), timeout=120)
    assert edit.state == flow.DONE, edit.status
    (_, (layer,)), = host.added
    assert (layer.x, layer.y, layer.width, layer.height) == (108, 58, 12, 10)


def test_grow_and_feather_come_back_as_the_results_alpha(start_engine):
    """The window read holds what the engine grows and feathers: the result covers the grown
    selection whole, not cut at the window's edge."""
    server = start_engine()
    custom = {"preset": "custom", "variants": 1, "steps": 2, "seed": 3, "grow": 5, "feather": 0,
              "endpoint": server.endpoint}  # fmt: skip
    host = FakeHost(SELECTED)
    run(edit_of(host, values=VALUES | custom), timeout=120)
    (_, (layer,)), = host.added
    assert (layer.x, layer.y, layer.width, layer.height) == (35, 25, 30, 22)
    alpha = layer.rgba[3::4]
    assert alpha[11 * 30 : 12 * 30] == b"\xff" * 30  # the middle row: 5 px more on each side
    host = FakeHost(SELECTED)
    run(edit_of(host, values=VALUES | custom | {"feather": 6}), timeout=120)
    (_, (layer,)), = host.added
    reach = 5 + 9 + 1  # geometry.reach: grow, the blur's half kernel, one pixel
    assert 40 - reach <= layer.x < 35 and 60 + reach >= layer.x + layer.width > 65
    assert set(layer.rgba[3::4]) - {0, 255}  # a soft edge


def test_cancel_cancels_the_job_on_the_engine(start_engine):
    """Cancel once the first step shows: the engine's job ends `cancelled` by the client."""
    server = start_engine()
    host = FakeHost(SELECTED)
    # from full strength the tiny random UNet diverges by step 15 (non_finite): 60%
    long = {"preset": "custom", "variants": 1, "steps": 1000, "strength": 60, "seed": 3,
            "guidance_weight": 0.0, "endpoint": server.endpoint}  # fmt: skip
    edit = edit_of(host, values=VALUES | long)
    edit.start()
    deadline = time.monotonic() + 120
    while not any(s.step for s in host.statuses):
        assert edit.tick() and time.monotonic() < deadline, edit.status
        time.sleep(0.01)
    edit.cancel()
    finish(edit, timeout=30)
    assert edit.state == flow.CANCELLED and not host.added
    ends = [e for e in server.history if e["event"] in ("done", "failed", "cancelled")]
    assert [(e["event"], e["reason"]) for e in ends] == [("cancelled", "client")]
    assert ends[0]["step"] < 600
