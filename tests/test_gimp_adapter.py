"""The GIMP plug-in's host-independent logic: arguments, coordinates, masks, the edit's flow.

A fake host and a fake client stand in for GIMP and the engine; one test runs the flow against a
real in-process engine. tests/test_gimp_real.py runs the whole plug-in inside real GIMP 3.
"""

from __future__ import annotations

import ast
import io
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

PLUGIN = Path(__file__).resolve().parents[1] / "plugin_gimp" / "blended_diffusion"
sys.path.insert(0, str(PLUGIN))  # the plug-in's modules import each other by plain name

import flow  # noqa: E402

from engine.shared import client as engine_client  # noqa: E402
from engine.shared import settings, wording  # noqa: E402
from engine.shared.geometry import Rect  # noqa: E402
from tests.conftest import free_port  # noqa: E402

VALUES = settings.defaults() | {"prompt": "a red circle"}


# -- the flow, with a fake host and a fake client -----------------------------------------------


class FakeHost:
    """A drawable of `size` at `offsets` filled with a gradient, with a rectangle selected."""

    def __init__(self, selected: Rect | None, offsets=(10, 8), size=(64, 56), canvas=(96, 80)):
        self.name, self.offsets, self.size, self.canvas = "source", offsets, size, canvas
        self.selected, self.reads, self.steps = selected, [], []
        w, h = size
        self.rgba = bytes(v for j in range(h) for i in range(w) for v in (i * 4, j * 4, 160, 255))

    def selection_bounds(self) -> Rect | None:
        return self.selected

    def selection_at(self, x: int, y: int) -> int:  # image coordinates
        s = self.selected
        return 255 if s and s.x <= x < s.x + s.width and s.y <= y < s.y + s.height else 0

    def read(self, crop: Rect) -> tuple[bytes, bytes]:
        self.reads.append(crop)
        w, x0, cw = self.size[0], crop.x, crop.width
        rgba = b"".join(
            self.rgba[((crop.y + j) * w + x0) * 4 : ((crop.y + j) * w + x0 + cw) * 4]
            for j in range(crop.height)
        )
        ox, oy = self.offsets
        mask = bytes(
            self.selection_at(ox + crop.x + i, oy + crop.y + j)
            for j in range(crop.height)
            for i in range(crop.width)
        )
        return rgba, mask

    def progress(self, fraction: float, text: str) -> None:
        self.steps.append((fraction, text))

    cancel_at_step = False  # the user presses Cancel once the first step's progress shows

    def cancelled(self) -> bool:
        return self.cancel_at_step and any("Denoising" in text for _, text in self.steps)

    # the preview layer: its states, in order ("removed" at the end, whatever happened)
    previews: list

    def show_preview(self, box: Rect, width: int, height: int, rgba: bytes) -> None:
        self.__dict__.setdefault("previews", []).append((box, width, height, rgba))

    def remove_preview(self) -> None:
        self.__dict__.setdefault("previews", []).append("removed")


class FakeClient:
    """Answers like engine.shared.client.Client; `script` is what poll() returns, call by call."""

    def __init__(self, script, models="tiny [random model]", hello_error=None, submit_error=None):
        self.script, self.models, self.closed, self.submitted = list(script), models, False, None
        self.cancelled = []
        self.hello_error, self.submit_error = hello_error, submit_error
        self.limits = {"max_side": 4096}

    def hello(self):
        if self.hello_error:
            raise self.hello_error
        return {"models": self.models, "device": "cpu", "limits": self.limits,
                "step_seconds": {"full": {"2": 0.5}}}  # fmt: skip

    def submit(self, image, width, height, mask, prompt, settings, previews=None):
        assert previews == {"every": 1}  # the image shows the best variant while it runs
        if self.submit_error:
            raise self.submit_error
        assert len(image) == width * height * 4 and len(mask) == width * height
        self.submitted = (width, height, mask, prompt, settings)
        self.job = engine_client.Job("j1")
        return self.job

    def cancel(self, job):
        self.cancelled.append(job)

    def poll(self, timeout=0.0):
        if not self.script:  # an engine with nothing more to say
            return []
        kind, *rest = self.script.pop(0)
        job = self.job
        if kind == "progress":
            job.state, job.step, job.total = "running", *rest[:2]
            event = engine_client.Event("progress", job.id, job, step=rest[0], total=rest[1])
            event.previews = rest[2] if len(rest) > 2 else []
            return [event]
        if kind == "result":
            w, h, _, _, _ = self.submitted
            job.variants = [
                engine_client.Variant(rank, 1, 2, 5, 4, bytes(80), 0.5 + rank / 10, rank)
                for rank in (1, 2)
            ]
            job.models, job.state = self.models, "done"
        elif kind == "error":
            job.error, job.state = engine_client.EngineError(*rest), "failed"
        elif kind == "cancelled":
            job.cancel_reason, job.state = rest[0], "cancelled"
        return [engine_client.Event(kind, job.id, job, error=job.error)]

    def close(self):
        self.closed = True


def run(host, client, **change):
    return flow.run_edit(host, VALUES | change, lambda endpoint: client)


def test_results_are_layers_at_the_right_place_best_visible():
    host = FakeHost(Rect(40, 30, 20, 12))
    client = FakeClient([("progress", 1, 8), ("progress", 8, 8), ("result",)])
    layers = run(host, client)
    crop = host.reads[0]
    assert [layer.visible for layer in layers] == [True, False]
    for rank, layer in enumerate(layers, 1):
        assert (layer.x, layer.y) == (10 + crop.x + 1, 8 + crop.y + 2)
        assert (layer.width, layer.height) == (5, 4)
        name = wording.layer_name("a red circle", rank, 0.5 + rank / 10, client.models)
        assert layer.name == name
    assert client.submitted[4] == settings.request(VALUES).settings and client.closed
    fractions = [f for f, _ in host.steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert host.steps[-1][1].startswith("Blended Diffusion: Denoising: step 8 of 8")
    # Draft: 50 steps at 80% = 40 steps at the engine's 0.5 s a step (2 variants, full guidance)
    assert "Expected: about 20 s" in host.steps[1][1]


def test_the_mask_sent_is_the_selection_in_the_crop():
    host = FakeHost(Rect(40, 30, 20, 12))
    client = FakeClient([("result",)])
    run(host, client)
    w, h, mask, _, _ = client.submitted
    crop = host.reads[0]
    assert (w, h) == (crop.width, crop.height)
    ys = [j for j in range(h) if any(mask[j * w : (j + 1) * w])]
    xs = [i for i in range(w) if any(mask[j * w + i] for j in range(h))]
    # image (40, 30) is drawable (30, 22): in the crop's coordinates
    assert (xs[0] + crop.x, ys[0] + crop.y, len(xs), len(ys)) == (30, 22, 20, 12)


@pytest.mark.parametrize(
    "selected, words",
    [
        (None, "Nothing is selected"),
        (Rect(0, 0, 8, 8), "does not overlap the layer 'source'"),
    ],
)
def test_nothing_to_edit_is_an_error_before_any_connection(selected, words):
    def connect(endpoint):
        raise AssertionError("no engine should be asked")

    with pytest.raises(flow.EditError, match=words):
        flow.run_edit(FakeHost(selected), VALUES, connect)


def test_a_selection_whose_box_overlaps_but_whose_pixels_do_not_is_an_error():
    host = FakeHost(Rect(40, 30, 20, 12))
    host.selection_at = lambda x, y: 0  # e.g. an L-shaped selection missing the layer
    with pytest.raises(flow.EditError, match="does not cover any pixel"):
        run(host, FakeClient([]))


@pytest.mark.parametrize(
    "client, words",
    [
        (
            FakeClient([], hello_error=engine_client.EngineUnreachable("engine unreachable at X")),
            "Blended Diffusion: Engine unreachable at X",
        ),
        (
            FakeClient([], submit_error=engine_client.EngineError("limit", "image too big")),
            r"The engine refused the edit \(limit\): image too big",
        ),
        (
            FakeClient([], hello_error=engine_client.VersionMismatch("protocol 2, plug-in 1")),
            "from the same version",
        ),
        (FakeClient([("error", "internal", "out of memory")]), r"\(internal\): out of memory"),
        (
            FakeClient([("error", "timeout", "engine unreachable at X: silent for 10 s")]),
            "Blended Diffusion: Lost the engine: engine unreachable at X: silent",
        ),
        (FakeClient([("cancelled", "shutdown")]), r"Cancelled \(shutdown\)"),
    ],
)
def test_engine_failures_become_messages_and_the_client_closes(client, words):
    with pytest.raises(flow.EditError, match=words):
        run(FakeHost(Rect(40, 30, 20, 12)), client)
    assert client.closed


def preview(variant: int, distance: float | None, colour: int) -> engine_client.Preview:
    """A 2 x 1 PNG preview of the box (3, 4, 10, 5) in the window."""
    buffer = io.BytesIO()
    Image.new("RGBA", (2, 1), (colour, 0, 0, 255)).save(buffer, "PNG")
    return engine_client.Preview(variant, 7 + variant, distance, 1, 2, 1, buffer.getvalue(),
                                 (3, 4, 10, 5))  # fmt: skip


@pytest.mark.parametrize("end", [("result",), ("error", "internal", "boom"), ("cancelled", "x")])
def test_the_best_preview_is_shown_over_the_box_and_removed_whatever_the_end(end):
    host = FakeHost(Rect(40, 30, 20, 12))
    shown = [preview(0, 0.9, 10), preview(1, 0.4, 20), preview(2, None, 30)]
    client = FakeClient([("progress", 1, 8, shown), ("progress", 2, 8), end])
    if end[0] == "result":
        run(host, client)
    else:
        with pytest.raises(flow.EditError):
            run(host, client)
    crop = host.reads[0]
    box, width, height, rgba = host.previews[0]
    assert box == Rect(crop.x + 3, crop.y + 4, 10, 5)  # drawable coordinates
    assert (width, height, rgba) == (2, 1, bytes((20, 0, 0, 255)) * 2)  # the closest: variant 1
    assert host.previews[1:] == ["removed"]


def test_a_cancel_the_engine_never_answers_ends_the_run_within_the_wait(monkeypatch):
    monkeypatch.setattr(flow, "CANCEL_WAIT", 0.3)
    host = FakeHost(Rect(40, 30, 20, 12))
    host.cancel_at_step = True
    client = FakeClient([("progress", 1, 8, [preview(0, 0.9, 10)])])
    start = time.monotonic()
    with pytest.raises(flow.Cancelled):
        run(host, client)
    assert time.monotonic() - start < 2 and client.cancelled == [client.job] and client.closed
    assert host.steps[-1] == (1 / 8, flow.PREFIX + wording.CANCELLING)
    assert host.previews[1:] == ["removed"]


def test_a_result_that_crosses_the_cancel_is_not_added():
    host = FakeHost(Rect(40, 30, 20, 12))
    host.cancel_at_step = True
    client = FakeClient([("progress", 1, 8), ("result",)])
    with pytest.raises(flow.Cancelled):
        run(host, client)
    assert client.cancelled == [client.job]


def test_a_malformed_address_is_a_message():
    with pytest.raises(flow.EditError, match="Not an engine address"):
        flow.run_edit(FakeHost(Rect(40, 30, 20, 12)), VALUES | {"endpoint": "tcp://127.0.0.1:x"})


# -- the flow against a real engine -----------------------------------------------------------


def test_against_a_real_engine_results_carry_the_selection_as_alpha(start_engine):
    server = start_engine()
    host = FakeHost(Rect(40, 30, 20, 12))
    custom = {"preset": "custom", "variants": 2, "steps": 4, "seed": 3}
    layers = flow.run_edit(host, VALUES | custom | {"endpoint": server.endpoint})
    assert len(layers) == 2 and [la.visible for la in layers] == [True, False]
    for layer in layers:
        assert (layer.x, layer.y, layer.width, layer.height) == (40, 30, 20, 12)
        assert set(layer.rgba[3::4]) == {255}  # a hard rectangle: fully opaque inside
        assert "#" in layer.name and "[random model]" in layer.name


def test_grow_and_feather_from_the_dialog_come_back_as_the_results_alpha(start_engine):
    """The window read holds what the engine grows and feathers: the result covers the grown
    selection whole, not cut at the window's edge."""
    server = start_engine()
    host = FakeHost(Rect(40, 30, 20, 12))
    custom = {"preset": "custom", "variants": 1, "steps": 2, "seed": 3, "grow": 5, "feather": 0}
    (layer,) = flow.run_edit(host, VALUES | custom | {"endpoint": server.endpoint})
    assert (layer.x, layer.y, layer.width, layer.height) == (35, 25, 30, 22)
    alpha = layer.rgba[3::4]
    assert alpha[11 * 30 : 12 * 30] == b"\xff" * 30  # the middle row: 5 px more on each side
    soft = {**custom, "feather": 6}
    (layer,) = flow.run_edit(host, VALUES | soft | {"endpoint": server.endpoint})
    reach = 5 + 9 + 1  # geometry.reach: grow, the blur's half kernel, one pixel
    assert 40 - reach <= layer.x < 35 and 60 + reach >= layer.x + layer.width > 65
    assert set(layer.rgba[3::4]) - {0, 255}  # a soft edge


def test_cancel_in_the_host_cancels_the_job_on_the_engine(start_engine):
    """Cancel pressed once the first step shows: the engine's job ends `cancelled` by the
    client, the preview is removed and the edit ends in Cancelled, not an error."""
    server = start_engine()
    host = FakeHost(Rect(40, 30, 20, 12))
    host.cancel_at_step = True
    # 600 steps: from full strength the tiny random UNet diverges by step 15 (non_finite)
    long = {"preset": "custom", "variants": 1, "steps": 1000, "strength": 60, "seed": 3,
            "guidance_weight": 0.0}  # fmt: skip
    with pytest.raises(flow.Cancelled):
        flow.run_edit(host, VALUES | long | {"endpoint": server.endpoint})
    assert host.steps[-1][1] == flow.PREFIX + wording.CANCELLING
    assert host.__dict__.get("previews", ["removed"])[-1] == "removed"
    ends = [e for e in server.history if e["event"] in ("done", "failed", "cancelled")]
    assert [(e["event"], e["reason"]) for e in ends] == [("cancelled", "client")]
    assert ends[0]["step"] < 600


def test_a_dead_engine_is_reported_within_the_timeout():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    values = VALUES | {"endpoint": endpoint}
    with pytest.raises(flow.EditError, match="unreachable"):
        flow.run_edit(
            FakeHost(Rect(40, 30, 20, 12)), values, lambda e: engine_client.Client(e, timeout=0.5)
        )


def test_cancel_while_connecting_to_a_dead_engine_ends_the_run_at_once():
    """The client asks the host between short waits (GIMP's window stays alive meanwhile); a
    Cancel gives the wait up at once, not after the client's whole timeout."""
    host, asked = FakeHost(Rect(40, 30, 20, 12)), []
    host.cancelled = lambda: asked.append(time.monotonic()) or len(asked) > 5
    values = VALUES | {"endpoint": f"tcp://127.0.0.1:{free_port()}"}
    start = time.monotonic()
    with pytest.raises(flow.Cancelled):
        flow.run_edit(host, values, lambda e: engine_client.Client(e, timeout=5))
    assert time.monotonic() - start < 1 and len(asked) == 6


# -- the plug-in's shape ----------------------------------------------------------------------


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_adapter_the_progress_window_and_the_entry_touch_gimp():
    for path in PLUGIN.glob("*.py"):
        ast.parse(path.read_text(), feature_version=(3, 10))  # GIMP's Python may be 3.10
        uses_gi = "gi" in imports(path)
        gimp = ("adapter.py", "progress.py", "blended_diffusion.py")
        assert uses_gi == (path.name in gimp), path.name
    entry = (PLUGIN / "blended_diffusion.py").read_text()
    assert entry.startswith("#!/usr/bin/env python3\n")
    assert "Gegl.Rectangle" not in entry and "Layer.new" not in entry  # pixels: adapter only
