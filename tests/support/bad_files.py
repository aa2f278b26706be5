"""Corrupt input files on purpose, for the fault-injection tests (issue 13).

The PNG helpers search for the byte to flip instead of hard-coding an offset, so that they keep making
the intended kind of damage whatever zlib or Pillow version wrote the file.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _idat(data: bytes) -> tuple[int, int]:
    """(offset of the first IDAT chunk's data, its length)."""
    at = data.index(b"IDAT")
    return at + 4, struct.unpack(">I", data[at - 4 : at])[0]


def _pixels(data: bytes) -> np.ndarray | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except Exception:  # noqa: BLE001  (any failure means "Pillow's load noticed")
        return None


def silently_corrupt_png(path: Path) -> Path:
    """Flip one byte of compressed pixel data such that Pillow's ``load()`` still succeeds and returns
    other pixels (the header is intact; only the chunk checksum tells). Issue 13, case 8."""
    data = path.read_bytes()
    good = _pixels(data)
    start, length = _idat(data)
    for off in range(length):
        bad = bytearray(data)
        bad[start + off] ^= 0xFF
        got = _pixels(bytes(bad))
        if got is not None and got.shape == good.shape and (got != good).any():
            path.write_bytes(bytes(bad))
            return path
    raise AssertionError(f"no byte of {path} corrupts it silently; use a more compressible image")


def corrupt_png_keeping_checksums(path: Path) -> Path:
    """Damage the compressed pixel data and rewrite the chunk's CRC: the file verifies, but decoding it fails."""
    data = bytearray(path.read_bytes())
    start, length = _idat(bytes(data))
    for off in range(length // 2, length):
        bad = bytearray(data)
        bad[start + off] ^= 0xFF
        crc = zlib.crc32(bytes(bad[start - 4 : start + length])) & 0xFFFFFFFF
        bad[start + length : start + length + 4] = struct.pack(">I", crc)
        if _pixels(bytes(bad)) is None:
            path.write_bytes(bytes(bad))
            return path
    raise AssertionError(f"no byte of {path} breaks its decoding")


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Keep the first ``keep`` fraction of the file's bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
