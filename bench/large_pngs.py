"""Large pictures that are small files, for the benchmark and the tests of admission before work: a
PNG of one colour is a few hundred KB however many pixels it has, and is written here row by row, so
that making a 10000 x 10000 one costs neither 300 MB nor seconds of Pillow."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def flat_png(width: int, height: int, colour: tuple[int, ...] = (90, 120, 200)) -> bytes:
    """A PNG of ``width`` x ``height`` pixels of one colour (RGB, or RGBA with four values)."""
    colour_type = 6 if len(colour) == 4 else 2
    row = b"\x00" + bytes(colour) * width  # filter type 0, then the pixels
    packer = zlib.compressobj(9)
    rows = 256
    block = row * rows
    parts = [packer.compress(block) for _ in range(height // rows)]
    parts.append(packer.compress(row * (height % rows)))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
