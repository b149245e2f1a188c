"""The wire format on its own: round trips, every rejection with its code, and a fuzz."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.shared import protocol
from engine.shared.protocol import (
    Limits,
    Pixels,
    ProtocolError,
    decode_reply,
    decode_request,
    encode,
)


def submit_frames(width=4, height=3, **header) -> list[bytes]:
    image = Pixels(width, height, "RGBA8", bytes(width * height * 4), name="image")
    mask = Pixels(width, height, "Y8", b"\xff" * (width * height), name="mask")
    fields = {"job": "j1", "prompt": "a red ball", "settings": {"variants": 2}, **header}
    return encode("submit", fields, [image, mask])


def with_header(frames: list[bytes], /, **changes) -> list[bytes]:
    header = json.loads(frames[0])
    header.update(changes)
    return [json.dumps(header).encode(), *frames[1:]]


def test_submit_round_trip_keeps_pixels_and_fields():
    msg = decode_request(submit_frames(seed=None))
    assert (msg.type, msg.job, msg.header["prompt"]) == ("submit", "j1", "a red ball")
    assert msg.header["settings"].variants == 2
    assert msg.header["settings"].wire() == {"variants": 2}  # the rest: the schema's defaults
    image, mask = msg.frames
    assert (image.width, image.height, image.format, image.stride) == (4, 3, "RGBA8", 16)
    assert bytes(mask.data) == b"\xff" * 12


def test_grow_and_feather_are_accepted_in_their_range():
    shaping = {"grow": 0, "feather": 1000}
    checked = decode_request(with_header(submit_frames(), settings=shaping)).header["settings"]
    assert (checked.grow, checked.feather) == (0, 1000)


def test_padded_rows_are_described_by_stride_and_unpacked():
    data = b"".join(bytes([y] * 3) + b"pad" for y in range(2))  # 1 RGB8 pixel + 3 padding bytes
    p = Pixels(1, 2, "RGB8", data, stride=6)
    msg = decode_reply(encode("result", {"job": "j"}, [p]))
    assert msg.frames[0].stride == 6
    assert msg.frames[0].packed() == bytes([0, 0, 0, 1, 1, 1])


def test_result_reply_decodes_variants():
    frames = [Pixels(2, 2, "RGBA8", bytes(range(16)), name="rank-1")]
    variants = [{"rank": 1, "x": 5, "y": 6, "width": 2, "height": 2, "distance": 0.5, "seed": 7}]
    msg = decode_reply(encode("result", {"job": "j", "variants": variants}, frames))
    assert msg.header["variants"] == variants
    assert bytes(msg.frames[0].data) == bytes(range(16))


# (frames, expected code): one case per rule the engine enforces.
BAD = {
    "empty header": ([b""], protocol.BAD_MESSAGE),
    "not json": ([b"{nope"], protocol.BAD_MESSAGE),
    "not utf-8": ([b"\xff\xfe"], protocol.BAD_MESSAGE),
    "json array": ([b"[1, 2]"], protocol.BAD_MESSAGE),
    "NaN": ([b'{"v": 2, "type": "ping", "x": NaN}'], protocol.BAD_MESSAGE),
    "no version": ([b'{"type": "hello"}'], protocol.BAD_MESSAGE),
    "old version": ([b'{"v": 0, "type": "hello"}'], protocol.VERSION_MISMATCH),
    "bool version": ([b'{"v": true, "type": "hello"}'], protocol.VERSION_MISMATCH),
    "float version": ([b'{"v": 2.0, "type": "hello"}'], protocol.VERSION_MISMATCH),
    "no type": ([b'{"v": 2}'], protocol.BAD_MESSAGE),
    "unknown type": ([b'{"v": 2, "type": "explode"}'], protocol.UNKNOWN_TYPE),
    "reply type as request": ([b'{"v": 2, "type": "result"}'], protocol.UNKNOWN_TYPE),
    "ping with pixels": ([b'{"v": 2, "type": "ping"}', b"x"], protocol.BAD_MESSAGE),
    "cancel without job": ([b'{"v": 2, "type": "cancel"}'], protocol.BAD_FIELD),
    "job id with slash": (with_header(submit_frames(), job="../x"), protocol.BAD_FIELD),
    "missing prompt": (with_header(submit_frames(), prompt=None), protocol.BAD_FIELD),
    "blank prompt": (with_header(submit_frames(), prompt="  "), protocol.BAD_FIELD),
    "long prompt": (with_header(submit_frames(), prompt="x" * 501), protocol.LIMIT),
    "9 variants": (with_header(submit_frames(), settings={"variants": 9}), protocol.LIMIT),
    "0 variants": (with_header(submit_frames(), settings={"variants": 0}), protocol.LIMIT),
    "bool variants": (
        with_header(submit_frames(), settings={"variants": True}),
        protocol.BAD_FIELD,
    ),
    "float steps": (with_header(submit_frames(), settings={"steps": 2.5}), protocol.BAD_FIELD),
    "huge steps": (with_header(submit_frames(), settings={"steps": 10**6}), protocol.LIMIT),
    "negative seed": (with_header(submit_frames(), settings={"seed": -1}), protocol.BAD_FIELD),
    "bad sampler": (
        with_header(submit_frames(), settings={"sampler": "euler"}),
        protocol.BAD_FIELD,
    ),
    "negative grow": (with_header(submit_frames(), settings={"grow": -1}), protocol.BAD_FIELD),
    "huge feather": (
        with_header(submit_frames(), settings={"feather": 10**6}),
        protocol.BAD_FIELD,
    ),
    "float feather": (with_header(submit_frames(), settings={"feather": 2.5}), protocol.BAD_FIELD),
    "refine not a bool": (with_header(submit_frames(), settings={"refine": 1}), protocol.BAD_FIELD),
    "no refine noise": (
        with_header(submit_frames(), settings={"refine_strength": 0}),
        protocol.BAD_FIELD,
    ),
    "refine cap under 1": (
        with_header(submit_frames(), settings={"refine_cap": 0.5}),
        protocol.BAD_FIELD,
    ),
    "huge refine guidance": (
        with_header(submit_frames(), settings={"refine_guidance": 11}),
        protocol.BAD_FIELD,
    ),
    "unknown setting": (with_header(submit_frames(), settings={"stepz": 3}), protocol.BAD_FIELD),
    "settings list": (with_header(submit_frames(), settings=[1]), protocol.BAD_FIELD),
    "one frame": (submit_frames()[:2], protocol.BAD_MESSAGE),
    "extra frame": ([*submit_frames(), b"x"], protocol.BAD_MESSAGE),
    "short image": ([*submit_frames()[:1], b"x" * 47, submit_frames()[2]], protocol.BAD_FRAME),
    "long mask": ([*submit_frames()[:2], b"x" * 13], protocol.BAD_FRAME),
}


def _frames_desc(**change):
    frames = submit_frames()
    header = json.loads(frames[0])
    header["frames"][0].update(change)
    return [json.dumps(header).encode(), *frames[1:]]


BAD.update(
    {
        "negative width": (_frames_desc(width=-4), protocol.LIMIT),
        "zero height": (_frames_desc(height=0), protocol.LIMIT),
        "huge side": (_frames_desc(width=100_000, height=100_000), protocol.LIMIT),
        "huge stride": (_frames_desc(stride=2**40), protocol.BAD_FIELD),
        "small stride": (_frames_desc(stride=3), protocol.BAD_FIELD),
        "string width": (_frames_desc(width="4"), protocol.BAD_FIELD),
        "bad format": (_frames_desc(format="RGB16"), protocol.BAD_FIELD),
        "mask as image": (_frames_desc(format="Y8", stride=4), protocol.BAD_FRAME),
        "mask size differs": (_frames_desc(width=2, stride=8), protocol.BAD_FRAME),
    }
)


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_are_rejected_with_their_code(case):
    frames, code = BAD[case]
    with pytest.raises(ProtocolError) as e:
        decode_request(frames)
    assert e.value.code == code, str(e.value)
    assert str(e.value)  # a message for people too


def test_version_mismatch_names_both_versions():
    with pytest.raises(ProtocolError) as e:
        decode_request([b'{"v": 7, "type": "hello"}'])
    assert "7" in str(e.value) and str(protocol.PROTOCOL_VERSION) in str(e.value)
    with pytest.raises(ProtocolError) as e:
        decode_reply([b'{"v": 7, "type": "hello"}'])
    assert "engine speaks 7" in str(e.value)
    assert f"client speaks {protocol.PROTOCOL_VERSION}" in str(e.value)


def test_errors_about_a_job_carry_its_id():
    with pytest.raises(ProtocolError) as e:
        decode_request(with_header(submit_frames(), prompt=""))
    assert e.value.job == "j1"


def test_header_size_limit():
    big = json.dumps({"v": 2, "type": "hello", "pad": "x" * 70_000}).encode()
    with pytest.raises(ProtocolError, match="over the limit"):
        decode_request([big])
    assert Limits(max_side=64).max_frame == Limits().max_header  # header frames always fit


def test_the_engines_own_options_are_not_a_clients_to_send():
    for name in ("precision", "recompute", "batch"):  # the engine's hardware decides them
        with pytest.raises(ProtocolError, match=f"unknown settings {name}") as e:
            decode_request(with_header(submit_frames(), settings={name: "auto"}))
        assert e.value.code == protocol.BAD_FIELD

@pytest.mark.parametrize(
    "endpoint, loopback",
    [
        ("tcp://127.0.0.1:5557", True),
        ("tcp://127.3.2.1:5557", True),
        ("tcp://localhost:5557", True),
        ("tcp://[::1]:5557", True),
        ("ipc:///tmp/engine", True),
        ("tcp://0.0.0.0:5557", False),
        ("tcp://*:5557", False),
        ("tcp://192.168.1.5:5557", False),
        ("tcp://eth0:5557", False),
        ("tcp://[::]:5557", False),
    ],
)
def test_loopback_endpoints(endpoint, loopback):
    assert protocol.is_loopback(endpoint) is loopback


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    key=st.sampled_from(["v", "type", "job", "prompt", "settings", "frames", "steps"]),
    value=json_values,
    extra=st.lists(st.binary(max_size=64), max_size=3),
)
def test_decode_request_only_ever_raises_protocol_errors(key, value, extra):
    frames = with_header(submit_frames(), **{key: value})
    for candidate in (frames, [*frames, *extra], frames[: 1 + len(extra) % 3]):
        try:
            decode_request(candidate)
        except ProtocolError as e:
            assert e.code in (
                protocol.BAD_MESSAGE,
                protocol.VERSION_MISMATCH,
                protocol.UNKNOWN_TYPE,
                protocol.BAD_FIELD,
                protocol.BAD_FRAME,
                protocol.LIMIT,
            )
