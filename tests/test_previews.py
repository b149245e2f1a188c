"""Previews on the wire (issue 17): the variants' estimates in `progress` when a client asks,
never otherwise, sized and rate-limited as docs/protocol.md says; the PNG reader the hosts use;
`edit --engine --previews DIR`. Tiny model, real sockets."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq
from PIL import Image

from engine.preview import Preview
from engine.serve.jobs import Job
from engine.serve.pool import Pool
from engine.serve.runner import Runner
from engine.shared import png, protocol
from engine.shared.client import Client
from engine.shared.geometry import Rect
from engine.shared.protocol import Pixels, ProtocolError
from engine.shared.request import Settings

ROOT = Path(__file__).resolve().parents[1]
GREEN = (10, 200, 30, 255)
# unguided (the tiny random model's guided sample turns NaN after a dozen steps), 2 variants
RUN = {"steps": 8, "skip": 0, "variants": 2, "augmentations": 1, "seed": 4}
RUN |= {"guidance_weight": 0, "range_weight": 0, "refine": False}  # the base steps' previews


def ellipse_picture(width: int = 320, height: int = 240) -> tuple[bytes, bytes, np.ndarray]:
    """A flat green picture and an elliptic selection (300 x 150 bounds at 10, 20)."""
    image = np.full((height, width, 4), GREEN, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    inside = ((xx + 0.5 - 160) / 150) ** 2 + ((yy + 0.5 - 95) / 75) ** 2 <= 1
    mask = inside.astype(np.uint8) * 255
    return image.tobytes(), mask.tobytes(), mask


def run_job(endpoint: str, previews, settings=RUN) -> tuple[list, object]:
    with Client(endpoint, timeout=30, keepalive=0.2) as c:
        image, mask, _ = ellipse_picture()
        job = c.submit(image, 320, 240, mask, "a red ball", settings, previews=previews)
        events = []
        c.wait(job, timeout=300, on_event=events.append)
    return [e for e in events if e.type == "progress"], job


def test_previews_arrive_when_asked_sized_and_composited_over_the_source(start_engine):
    server = start_engine()
    progress, job = run_job(server.endpoint, {})
    shown = [e for e in progress if e.previews]
    assert shown, "no preview in any progress event"
    assert len(job.variants) == 2 and job.previews  # the client keeps the latest of each
    for event in shown:
        assert [p.variant for p in event.previews] == [0, 1]
        assert [p.seed for p in event.previews] == [4, 5]
        for p in event.previews:
            assert (p.width, p.height) == (128, 64)  # 300 x 150 at most 128 on its longer side
            assert p.step == event.step and isinstance(p.distance, float)
            assert p.box == (10, 20, 300, 150)  # the selection's bounds in the image
            with Image.open(io.BytesIO(p.png)) as im:
                assert im.format == "PNG" and im.size == (128, 64)
                pixels = np.asarray(im.convert("RGBA"))
            # outside the ellipse (the box's corners) the source shows, exactly
            for y, x in ((0, 0), (0, 127), (63, 0), (63, 127)):
                assert tuple(pixels[y, x]) == GREEN
            # inside, the tiny model's estimate: not the flat source
            assert (pixels[24:40, 48:80, :3] != GREEN[:3]).any(axis=2).mean() > 0.5
            assert png.decode(p.png) == (128, 64, pixels.tobytes())


def test_small_selections_are_never_enlarged_and_max_side_is_honoured(start_engine):
    server = start_engine()
    progress, _ = run_job(server.endpoint, {"max_side": 40})
    sizes = {(p.width, p.height) for e in progress for p in e.previews}
    assert sizes == {(40, 20)}
    with Client(server.endpoint, timeout=30, keepalive=0.2) as c:
        image = np.full((64, 64, 4), GREEN, np.uint8).tobytes()
        mask = np.zeros((64, 64), np.uint8)
        mask[10:30, 20:50] = 255
        job = c.submit(image, 64, 64, mask.tobytes(), "a ball", RUN, previews={})
        events = []
        c.wait(job, timeout=300, on_event=events.append)
    sizes = {(p.width, p.height) for e in events if e.type == "progress" for p in e.previews}
    assert sizes == {(30, 20)}  # the selection's own size: a preview is never enlarged


def test_no_previews_unless_asked_progress_exactly_as_before(start_engine):
    server = start_engine()
    image, mask, _ = ellipse_picture()
    submit = {"job": "plain", "prompt": "a red ball", "settings": RUN}
    frames = [Pixels(320, 240, "RGBA8", image, name="image"), Pixels(320, 240, "Y8", mask)]
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as s:
        s.setsockopt(zmq.LINGER, 0)
        s.connect(server.endpoint)
        s.send_multipart(protocol.encode("submit", submit, frames))
        replies = []
        deadline = time.monotonic() + 300
        while not replies or json.loads(replies[-1][0])["type"] in ("accepted", "progress"):
            assert time.monotonic() < deadline and s.poll(300_000)
            replies.append(s.recv_multipart())
    progress = [r for r in replies if json.loads(r[0])["type"] == "progress"]
    assert len(progress) == 8
    for step, frames in enumerate(progress, 1):
        header = json.loads(frames[0])
        assert len(frames) == 1
        assert header == {"v": 2, "type": "progress", "job": "plain", "step": step, "total": 8}
    assert json.loads(replies[-1][0])["type"] == "result"
    assert not [e for e in server.history if e["event"] == "preview"]


def test_previews_every_n_steps_over_the_wire(start_engine):
    server = start_engine()
    settings = RUN | {"steps": 30, "variants": 1}
    progress, job = run_job(server.endpoint, {"every": 3}, settings)
    steps = [e.step for e in progress if e.previews]
    assert len(progress) == 30 and steps  # every step still reported
    assert steps[0] >= 3 and min(np.diff(steps), default=3) >= 3
    recorded = [e for e in server.history if e["job"] == job.id and e["event"] == "preview"]
    assert len(recorded) == len(steps)


class Paced:
    """A method whose steps take `seconds` each on a fake clock (engine/methods: a Method)."""

    def __init__(self, steps: int, seconds: float) -> None:
        self.steps, self.seconds, self.now = steps, seconds, 0.0

    def describe(self, remote: bool = False):
        return SimpleNamespace(label="paced", device="cpu", method="pixel", weights="real",
                               resident=0, free_bytes=lambda: 0)  # fmt: skip

    def run(self, image, mask, prompt, settings, on_step, check, plan=None):
        box = Rect(0, 0, 4, 4)
        shown = [Preview(0, 1, np.zeros((4, 4, 4), np.uint8), 0.5, box)]
        for done in range(1, self.steps + 1):
            self.now += self.seconds
            check()
            on_step(done, self.steps, lambda side: shown)
        return []


@pytest.mark.parametrize(
    "seconds, expected",
    [(0.1, [3, 13, 23, 33]), (0.5, [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39])],
    ids=["time-bound", "step-bound"],
)
def test_previews_are_rate_limited_by_steps_and_by_time(seconds, expected):
    """At most every `every` steps and one a PREVIEW_INTERVAL (1 s), and as soon as both have
    passed: short steps wait for the second, long ones for the steps."""
    method = Paced(40, seconds)
    runner = Runner(Pool.serving("paced", method), print, clock=lambda: method.now)
    job = Job(b"", "j", "p", None, None, Settings(), model="paced",
              previews={"every": 3, "max_side": 16})  # fmt: skip
    sent = []
    assert runner.run(job, sent.append)[0] == "done"
    headers = [json.loads(m[0]) for m in sent]
    assert [h["step"] for h in headers] == list(range(1, 41))  # every step reported
    assert [h["step"] for h in headers if "previews" in h] == expected


@pytest.mark.parametrize(
    "previews",
    [[], "yes", {"every": 0}, {"every": 1001}, {"max_side": 8}, {"max_side": 129},
     {"every": 1.5}, {"size": 64}, {"every": True}],
)  # fmt: skip
def test_bad_preview_requests_are_refused(previews):
    image, mask, _ = ellipse_picture(32, 32)
    frames = [Pixels(32, 32, "RGBA8", image), Pixels(32, 32, "Y8", mask)]
    fields = {"job": "j", "prompt": "p", "previews": previews}
    with pytest.raises(ProtocolError) as e:
        protocol.decode_request(protocol.encode("submit", fields, frames))
    assert e.value.code == protocol.BAD_FIELD and e.value.job == "j"


def test_png_frames_are_read_as_their_bytes_and_refused_as_a_submit_image():
    data = b"\x89PNG not checked by the wire"
    frames = protocol.encode("progress", {"job": "j"}, [Pixels(3, 2, "PNG", data, name="p")])
    msg = protocol.decode_reply(frames)
    assert msg.frames[0].packed() == data and (msg.frames[0].width, msg.frames[0].height) == (3, 2)
    mask = Pixels(3, 2, "Y8", bytes(6))
    with pytest.raises(ProtocolError) as e:
        protocol.decode_request(protocol.encode("submit", {"job": "j", "prompt": "p"},
                                                [Pixels(3, 2, "PNG", data), mask]))  # fmt: skip
    assert e.value.code == protocol.BAD_FRAME


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "L", "LA"])
def test_png_reader_matches_pillow(mode):
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    ramp = np.broadcast_to(np.arange(53, dtype=np.uint8)[None, :, None] * 4, (37, 53, 4))
    for pixels in (noise, ramp.copy()):  # noise and smooth rows pick different row filters
        im = Image.fromarray(pixels, "RGBA").convert(mode)
        buffer = io.BytesIO()
        im.save(buffer, "PNG")
        assert png.decode(buffer.getvalue()) == (53, 37, im.convert("RGBA").tobytes())


def test_cli_writes_each_preview_as_a_png_named_by_step_and_variant(start_engine, tmp_path):
    server = start_engine()
    _, _, mask = ellipse_picture()
    Image.fromarray(np.full((240, 320, 3), GREEN[:3], np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    done = subprocess.run(
        [sys.executable, "-m", "engine", "edit", str(tmp_path / "in.png"),
         "--mask", str(tmp_path / "mask.png"), "--prompt", "a red ball",
         "--out", str(tmp_path / "out"), "--engine", server.endpoint,
         "--previews", str(tmp_path / "previews"), "--steps", "6", "--skip", "0",
         "--variants", "2", "--augmentations", "1", "--guidance-weight", "0",
         "--range-weight", "0"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert files and len(files) % 2 == 0
    assert all(f.startswith("step-") and f[-14:-5] == "-variant-" for f in files), files
    assert {f[-5] for f in files} == {"0", "1"}
    for f in files:
        with Image.open(tmp_path / "previews" / f) as im:
            assert im.size == (128, 64)
    refused = subprocess.run(
        [sys.executable, "-m", "engine", "edit", str(tmp_path / "in.png"),
         "--mask", str(tmp_path / "mask.png"), "--prompt", "x", "--out", str(tmp_path / "o"),
         "--previews", str(tmp_path / "p")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2 and "--previews needs --engine" in refused.stderr
