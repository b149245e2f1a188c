"""PNG to RGBA bytes in pure Python (zlib), for hosts whose Python has no imaging library.

The engine's previews are small 8-bit PNGs (RGBA, or RGB, grey, grey + alpha); this reads those:
any of PNG's five row filters, no interlace, no palette.
"""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> channels (grey, RGB, grey+alpha, RGBA)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(kind: int, row: bytearray, prior: bytes | bytearray, bpp: int) -> None:
    """Undo one row's filter in place (`prior`: the row above, already unfiltered)."""
    n = len(row)
    if kind == 1:
        for i in range(bpp, n):
            row[i] = (row[i] + row[i - bpp]) & 255
    elif kind == 2:
        for i in range(n):
            row[i] = (row[i] + prior[i]) & 255
    elif kind == 3:
        for i in range(n):
            left = row[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + ((left + prior[i]) >> 1)) & 255
    elif kind == 4:
        for i in range(n):
            left, upleft = (row[i - bpp], prior[i - bpp]) if i >= bpp else (0, 0)
            row[i] = (row[i] + _paeth(left, prior[i], upleft)) & 255
    elif kind != 0:
        raise ValueError(f"not a PNG row filter: {kind}")


def decode(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGBA8 bytes, rows top first) of an 8-bit non-interlaced PNG."""
    if data[:8] != SIGNATURE:
        raise ValueError("not a PNG")
    pos, idat, head = 8, bytearray(), None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    if head is None:
        raise ValueError("PNG without a header")
    width, height, depth, colour, _, _, interlace = head
    if depth != 8 or colour not in CHANNELS or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}, interlace")
    bpp = CHANNELS[colour]
    stride = width * bpp
    raw = zlib.decompress(bytes(idat))
    out = bytearray()
    prior = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        row = bytearray(raw[start + 1 : start + 1 + stride])
        _unfilter(raw[start], row, prior, bpp)
        prior = row
        if bpp == 4:
            out += row
        elif bpp == 3:
            rgba = bytearray(b"\xff" * (width * 4))
            for c in range(3):
                rgba[c::4] = row[c::3]
            out += rgba
        else:
            rgba = bytearray(b"\xff" * (width * 4))
            for c in range(3):
                rgba[c::4] = row[0::bpp]
            if bpp == 2:
                rgba[3::4] = row[1::2]
            out += rgba
    return width, height, bytes(out)
