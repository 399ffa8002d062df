"""Sliding-window geometry, shared by training-time evaluation (torch) and inference (numpy). Tier 0: stdlib only.

Two protocols (docs/algorithm.md §8):
* ``imas``: the reference evaluation. Starts are 0, stride, 2*stride, ... < size; each window spans
  [start, min(start + window, size)), so edge windows are *truncated* (a 6-px strip at height 1030 is faithful).
  Probabilities are summed; windows have variable sizes.
* ``full_tiles``: every window is a full tile; the last one per axis is moved back flush with the border; an image
  smaller than a tile is padded bottom/right to the tile size and cropped back. Overlaps are averaged with a count
  map. Static shapes, so it suits TensorRT engines. Training-time evaluation, `imas-export` (stitched models) and
  `imas-infer --protocol full_tiles` all use this name.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

WindowProtocol = Literal["imas", "full_tiles"]
WINDOW_PROTOCOLS: tuple[WindowProtocol, ...] = ("full_tiles", "imas")  # every value of `WindowProtocol`


class Window(NamedTuple):
    """Half-open pixel box [y0, y1) x [x0, x1) in (padded) image coordinates."""

    y0: int
    y1: int
    x0: int
    x1: int


def default_stride(window: int) -> int:
    """floor(window * 2 / 3): 512 for the 769 window of the reference."""
    return max(1, window * 2 // 3)


def window_starts(size: int, window: int, stride: int, *, flush_last: bool) -> list[int]:
    """Start offsets along one axis.

    flush_last=False is the iMAS protocol (range(0, size, stride), edge windows truncated);
    True gives full windows with the last one moved back so it ends exactly at `size` (or one window at 0 when
    `size <= window`; the caller pads).
    """
    if size < 1 or window < 1 or stride < 1:
        raise ValueError(f"size, window and stride must be >= 1, got {size}, {window}, {stride}")
    if stride > window:
        raise ValueError(f"stride {stride} is larger than the window {window}: pixels between windows would be skipped")
    if not flush_last:
        return list(range(0, size, stride))
    if size <= window:
        return [0]
    n = math.ceil((size - window) / stride) + 1
    return [min(k * stride, size - window) for k in range(n)]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def padded_shape(height: int, width: int, window: int | tuple[int, int], protocol: WindowProtocol) -> tuple[int, int]:
    """Canvas size the windows live on: the image itself for `imas`, at least one tile for `full_tiles`."""
    wh, ww = _pair(window)
    if protocol == "imas":
        return height, width
    return max(height, wh), max(width, ww)


def plan_windows(
    height: int,
    width: int,
    window: int | tuple[int, int],
    stride: int | tuple[int, int],
    protocol: WindowProtocol,
) -> list[Window]:
    """All windows of one image, row-major. For `full_tiles` every window has exactly the window size and lies
    inside `padded_shape(...)`; for `imas` windows lie inside the image and may be smaller at the edges."""
    if protocol not in WINDOW_PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(WINDOW_PROTOCOLS)}, got {protocol!r}")
    wh, ww = _pair(window)
    sh, sw = _pair(stride)
    flush = protocol == "full_tiles"
    ph, pw = padded_shape(height, width, (wh, ww), protocol)
    rows = window_starts(ph, wh, sh, flush_last=flush)
    cols = window_starts(pw, ww, sw, flush_last=flush)
    return [Window(y, min(y + wh, ph), x, min(x + ww, pw)) for y in rows for x in cols]
