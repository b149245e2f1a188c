"""The wire format between the plug-ins and the engine (docs/protocol.md), in pure Python.

A message is a ZeroMQ multipart message: frame 0 is a UTF-8 JSON header (protocol version `v`,
message `type`, `job` id, the type's fields, and a `frames` list describing each pixel frame), then
one raw pixel frame per description. Nothing is ever pickled. The engine decodes every request
with `decode_request`, which checks types, sizes and limits and raises `ProtocolError` with a code
the engine sends back. Imports only the standard library: the hosts' Python has no numpy.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from engine.shared import request

PROTOCOL_VERSION = 2  # 2: several models an engine, a job names its model (docs/protocol.md)

# Channels per pixel of each layout; rows are `stride` bytes apart, top row first.
FORMATS = {"RGBA8": 4, "BGRA8": 4, "RGB8": 3, "Y8": 1}
# Compressed pictures (a file's bytes, `stride` 0): the previews in `progress`.
ENCODED = ("PNG",)

# Previews (`submit`'s `previews`): the x0 estimate of each variant, at most every `every` steps,
# at most one every PREVIEW_INTERVAL seconds, at most `max_side` pixels on the longer side.
PREVIEW_INTERVAL = 1.0
PREVIEW_MAX_SIDE = 128
PREVIEW_MIN_SIDE = 16
PREVIEW_MAX_EVERY = 1000

REQUESTS = ("hello", "submit", "cancel", "status", "ping")
MAX_FRAMES = 3  # a header and at most two pixel frames (a submit's image and mask)
MAX_PING_JOBS = 256
MAX_MODEL_NAME = 200
REPLIES = ("hello", "accepted", "progress", "result", "error", "cancelled", "status", "pong")

# Error codes (docs/protocol.md explains each).
BAD_MESSAGE = "bad_message"  # frames or header unreadable
VERSION_MISMATCH = "version_mismatch"
UNKNOWN_TYPE = "unknown_type"
BAD_FIELD = "bad_field"  # a field is missing or has the wrong type or value
BAD_FRAME = "bad_frame"  # a pixel frame does not match its description
LIMIT = "limit"  # over a limit: image side, message size, prompt, variants, queue, memory
BAD_INPUT = "bad_input"  # the engine rejected the edit itself (e.g. empty selection)
NON_FINITE = "non_finite"  # the edit diverged (NaN/inf); the message names the setting to lower
OUT_OF_MEMORY = "out_of_memory"  # the device ran out of memory during the edit
LOST = "lost"  # (client side) the engine no longer knows the job: restarted, crashed, lost it
UNKNOWN_JOB = "unknown_job"
UNKNOWN_MODEL = "unknown_model"  # a submit names a model the engine does not serve
MODEL_UNAVAILABLE = "model_unavailable"  # the model's files are missing or corrupt, or too big
DUPLICATE_JOB = "duplicate_job"
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"

_JOB_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")


class ProtocolError(ValueError):
    """A message the other side must reject: `code` for programs, the text for people."""

    def __init__(self, code: str, message: str, job: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.job = job


@dataclass(frozen=True)
class Limits:
    max_side: int = 4096  # pixels, width and height alike
    max_prompt: int = 500  # characters
    max_variants: int = 8
    max_steps: int = 1000
    max_augmentations: int = 64
    max_queue: int = 32  # jobs waiting or running, all clients together
    max_client_queue: int = 4  # jobs waiting or running, per client
    max_header: int = 65536  # bytes of JSON

    @property
    def max_frame(self) -> int:
        """The largest frame accepted, in bytes (the engine's ZMQ_MAXMSGSIZE)."""
        return max(self.max_side * self.max_side * 4, self.max_header)

    @property
    def max_message(self) -> int:
        """The largest message accepted, all frames together: a header, an RGBA8 image and a Y8
        mask at the largest side, with up to 64 bytes of row padding each."""
        return self.max_header + (self.max_side * 5 + 128) * self.max_side

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "max_frame": self.max_frame, "max_message": self.max_message}

    @classmethod
    def from_json(cls, fields: Any) -> Limits:
        """The limits an engine announced (unknown fields ignored, absent ones the defaults)."""
        if not isinstance(fields, dict):
            return cls()
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in fields.items() if k in names and type(v) is int})


@dataclass
class Pixels:
    """One pixel frame: `height` rows of `stride` bytes, each starting with `width` pixels."""

    width: int
    height: int
    format: str
    data: bytes | bytearray | memoryview
    stride: int = 0  # 0: packed, width * channels
    name: str = ""

    def __post_init__(self) -> None:
        if not self.stride and self.format in FORMATS:
            self.stride = self.width * FORMATS[self.format]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "stride": self.stride,
        }

    def packed(self) -> bytes:
        """The pixels without row padding (`width * channels` bytes a row); an encoded
        picture's bytes as they are."""
        if self.format in ENCODED:
            return bytes(self.data)
        row = self.width * FORMATS[self.format]
        data = bytes(self.data)
        if self.stride == row:
            return data
        return b"".join(data[y * self.stride : y * self.stride + row] for y in range(self.height))


@dataclass
class Message:
    type: str
    header: dict[str, Any]
    frames: list[Pixels]

    @property
    def job(self) -> str | None:
        return self.header.get("job")


def encode(type_: str, fields: dict[str, Any] | None = None, frames=()) -> list[bytes]:
    """The multipart frames of a message: header JSON, then each pixel frame's bytes."""
    header = {"v": PROTOCOL_VERSION, "type": type_, **(fields or {})}
    if frames:
        header["frames"] = [f.describe() for f in frames]
    head = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    return [head, *(f.data for f in frames)]


def error(code: str, message: str, job: str | None = None, **extra: Any) -> list[bytes]:
    return encode("error", {"job": job, "code": code, "message": message, **extra})


def is_loopback(endpoint: str) -> bool:
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):  # local by nature
        return True
    if scheme != "tcp":
        return False
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface or a host name: may be reachable from outside
        return False


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def read_header(frames: list, limits: Limits) -> dict[str, Any]:
    """Frame 0 as a JSON object of the right version; raises ProtocolError."""
    if not frames:
        raise ProtocolError(BAD_MESSAGE, "empty message")
    raw = frames[0]
    if len(raw) > limits.max_header:
        raise ProtocolError(
            BAD_MESSAGE, f"header is {len(raw)} bytes, over the limit of {limits.max_header}"
        )
    try:
        header = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(BAD_MESSAGE, f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(BAD_MESSAGE, "header must be a JSON object")
    v = header.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:  # not True, not 1.0
        if "v" not in header:
            raise ProtocolError(BAD_MESSAGE, "header has no protocol version 'v'")
        raise ProtocolError(
            VERSION_MISMATCH,
            f"protocol version mismatch: the client speaks {v!r}, "
            f"the engine speaks {PROTOCOL_VERSION}; update the plug-in or the engine",
        )
    if not isinstance(header.get("type"), str):
        raise ProtocolError(BAD_MESSAGE, "header has no message 'type' string")
    return header


def _int(value: Any, name: str, lo: int, hi: int, code: str = BAD_FIELD) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(BAD_FIELD, f"{name} must be an integer, got {value!r:.40}")
    if not lo <= value <= hi:
        raise ProtocolError(code, f"{name} must be {lo} to {hi}, got {value}")
    return value


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise ProtocolError(BAD_FIELD, f"{name} must be one of {', '.join(choices)}")
    return value


def read_frames(header: dict[str, Any], frames: list, limits: Limits) -> list[Pixels]:
    """The pixel frames after the header, each checked against its description."""
    described = header.get("frames", [])
    if not isinstance(described, list):
        raise ProtocolError(BAD_MESSAGE, "'frames' must be a list of frame descriptions")
    if len(described) != len(frames) - 1:
        raise ProtocolError(
            BAD_MESSAGE,
            f"header describes {len(described)} pixel frames but {len(frames) - 1} follow",
        )
    out = []
    for i, (d, data) in enumerate(zip(described, frames[1:], strict=True)):
        if not isinstance(d, dict):
            raise ProtocolError(BAD_MESSAGE, f"frame {i + 1}: description must be an object")
        name = d.get("name", "")
        name = name if isinstance(name, str) else ""
        what = f"frame {i + 1} ({name:.20})" if name else f"frame {i + 1}"
        w = _int(d.get("width"), f"{what} width", 1, limits.max_side, LIMIT)
        h = _int(d.get("height"), f"{what} height", 1, limits.max_side, LIMIT)
        fmt = _choice(d.get("format"), f"{what} format", (*FORMATS, *ENCODED))
        if fmt in ENCODED:  # a file's bytes: its size is its own
            if not 0 < len(data) <= limits.max_frame:
                raise ProtocolError(BAD_FRAME, f"{what}: {len(data)} bytes of {fmt}")
            out.append(Pixels(w, h, fmt, data, 0, name))
            continue
        stride = _int(d.get("stride"), f"{what} stride", w * FORMATS[fmt], limits.max_frame)
        if stride * h > limits.max_frame:
            raise ProtocolError(LIMIT, f"{what}: {stride * h} bytes, over {limits.max_frame}")
        if len(data) != stride * h:
            raise ProtocolError(
                BAD_FRAME,
                f"{what}: {w}x{h} {fmt} with stride {stride} is {stride * h} bytes, "
                f"but the frame has {len(data)}",
            )
        out.append(Pixels(w, h, fmt, data, stride, name))
    return out


def job_id(header: dict[str, Any], required: bool = True) -> str | None:
    job = header.get("job")
    if job is None and not required:
        return None
    if not isinstance(job, str) or not _JOB_ID.match(job):
        raise ProtocolError(BAD_FIELD, "job must be 1 to 64 characters of A-Z a-z 0-9 _ . : -")
    return job


def check_settings(settings: Any, limits: Limits, method: str | None = None) -> request.Settings:
    """The edit settings a client may send (engine/shared/request.py, the one schema) for the
    engine's `method` (hello's); absent ones take their defaults. Over an engine's limit: LIMIT,
    else BAD_FIELD."""
    try:
        return request.check(settings, limits.to_json(), wire=True, method=method)
    except request.SettingError as e:
        raise ProtocolError(LIMIT if e.limit else BAD_FIELD, str(e)) from None


def check_previews(previews: Any) -> dict[str, int] | None:
    """`submit`'s `previews`: absent or null = none; an object asks for them (defaults filled)."""
    if previews is None:
        return None
    if not isinstance(previews, dict):
        raise ProtocolError(BAD_FIELD, "previews must be an object ({} for the defaults) or null")
    unknown = sorted(k for k in previews if k not in ("every", "max_side"))
    if unknown:
        raise ProtocolError(BAD_FIELD, f"unknown previews fields {', '.join(unknown)[:200]}")
    every = previews.get("every", 1)
    side = previews.get("max_side", PREVIEW_MAX_SIDE)
    return {
        "every": _int(every, "previews.every", 1, PREVIEW_MAX_EVERY),
        "max_side": _int(side, "previews.max_side", PREVIEW_MIN_SIDE, PREVIEW_MAX_SIDE),
    }


def check_model(
    header: dict[str, Any], models: Mapping[str, str] | None, default: str | None
) -> str | None:
    """`submit`'s `model`, absent or null for the engine's `default`; returns its method (None:
    not known here, the settings of either method are checked). `models`: name -> method."""
    model = header.get("model")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_NAME):
        raise ProtocolError(
            BAD_FIELD, f"model must be a model's name of 1 to {MAX_MODEL_NAME} characters or null"
        )
    header["model"] = model = model if model is not None else default
    if models is None:
        return None
    if model not in models:
        raise ProtocolError(
            UNKNOWN_MODEL, f"unknown model {model[:80]!r}: this engine serves {', '.join(models)}"
        )
    return models[model]


def _check_submit(
    header: dict[str, Any],
    frames: list[Pixels],
    limits: Limits,
    models: Mapping[str, str] | None,
    default: str | None,
) -> None:
    method = check_model(header, models, default)
    prompt = header.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ProtocolError(BAD_FIELD, "prompt must be a non-empty string")
    if len(prompt) > limits.max_prompt:
        raise ProtocolError(
            LIMIT, f"prompt is {len(prompt)} characters, over the limit of {limits.max_prompt}"
        )
    header["settings"] = check_settings(header.get("settings", {}), limits, method)
    header["previews"] = check_previews(header.get("previews"))
    if len(frames) != 2:
        raise ProtocolError(
            BAD_MESSAGE, f"submit needs 2 pixel frames (image, mask), not {len(frames)}"
        )
    image, mask = frames
    if image.format not in ("RGBA8", "BGRA8", "RGB8"):
        raise ProtocolError(
            BAD_FRAME, f"the image must be RGBA8, BGRA8 or RGB8, not {image.format}"
        )
    if mask.format != "Y8":
        raise ProtocolError(BAD_FRAME, f"the mask must be Y8, not {mask.format}")
    if (mask.width, mask.height) != (image.width, image.height):
        raise ProtocolError(
            BAD_FRAME,
            f"the mask is {mask.width}x{mask.height} but the image is "
            f"{image.width}x{image.height}: they must be the same size",
        )


def _check_ping(header: dict[str, Any]) -> None:
    jobs = header.get("jobs", [])
    if not isinstance(jobs, list) or len(jobs) > MAX_PING_JOBS:
        raise ProtocolError(BAD_FIELD, f"jobs must be a list of at most {MAX_PING_JOBS} job ids")
    for job in jobs:
        job_id({"job": job})


def decode_request(
    frames: list,
    limits: Limits | None = None,
    models: Mapping[str, str] | None = None,
    default: str | None = None,
) -> Message:
    """A client's request, fully validated (a submit's model among `models`, name -> method,
    `default` when it names none, and its settings for that model's method); raises
    ProtocolError (with the job id when known)."""
    limits = limits or Limits()
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(BAD_MESSAGE, f"{len(frames)} frames, over the limit of {MAX_FRAMES}")
    size = sum(len(f) for f in frames)
    if size > limits.max_message:
        raise ProtocolError(LIMIT, f"message is {size} bytes, over {limits.max_message}")
    header = read_header(frames, limits)
    kind = header["type"]
    if kind not in REQUESTS:
        raise ProtocolError(
            UNKNOWN_TYPE, f"unknown message type {kind[:40]!r}; requests: {', '.join(REQUESTS)}"
        )
    job = None
    try:
        job = job_id(header, required=kind in ("submit", "cancel"))
        pixels = read_frames(header, frames, limits)
        if kind == "submit":
            _check_submit(header, pixels, limits, models, default)
        elif pixels:
            raise ProtocolError(BAD_MESSAGE, f"{kind} carries no pixel frames")
        if kind == "ping":
            _check_ping(header)
    except ProtocolError as e:
        e.job = job
        raise
    return Message(kind, header, pixels)


def decode_reply(frames: list, limits: Limits | None = None) -> Message:
    """An engine's reply; the client trusts the engine but still checks the framing."""
    limits = limits or Limits()
    try:
        header = read_header(frames, limits)
    except ProtocolError as e:
        if e.code != VERSION_MISMATCH:
            raise
        # an error from an engine of another version still explains itself
        theirs = json.loads(bytes(frames[0])).get("v")
        raise ProtocolError(
            VERSION_MISMATCH,
            f"protocol version mismatch: the engine speaks {theirs!r}, "
            f"this client speaks {PROTOCOL_VERSION}; update the plug-in or the engine",
        ) from None
    if header["type"] not in REPLIES:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown reply type {header['type'][:40]!r}")
    return Message(header["type"], header, read_frames(header, frames, limits))
