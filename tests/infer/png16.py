"""16-bit test images. Pillow writes 16-bit greyscale PNGs (mode "I;16") but has no 16-bit RGB mode to save, so
16-bit RGB PNGs are encoded here by hand (IHDR bit depth 16, colour type 2, filter 0 rows, one IDAT)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gradient16(height: int, width: int, channels: int = 0) -> np.ndarray:
    """uint16 values over the whole 0..65535 range: (H, W), or (H, W, channels) with channels > 0."""
    n = height * width * max(channels, 1)
    values = (np.arange(n, dtype=np.int64) * 7919 % 65536).astype(np.uint16)
    return values.reshape((height, width, channels) if channels else (height, width))


def save_grey16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit greyscale PNG written by Pillow (mode I;16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def save_rgb16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit RGB PNG (big-endian samples) from (H, W, 3) uint16 values."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path
