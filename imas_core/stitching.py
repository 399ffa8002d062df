"""Accumulating window results into whole-image canvases, in numpy: the stitchers every runner hands out.

A `Stitcher` turns a runner's window outputs into scores (softmax for logits), adds each window into its image's
canvas (a float32 sum with a count map, or pasted class ids for label-output models), and finishes a canvas into an
(H, W) uint8 label map and optionally the (C, H, W) average probabilities. `NumpyStitcher` is the host one; the torch
runner provides one on the GPU. Numpy only.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from imas_core.errors import InferError
from imas_core.tiling import Window

__all__ = ["NumpyStitcher", "Stitcher", "argmax_channels", "softmax_", "softmax_batch_"]

_THREADS = min(8, os.cpu_count() or 1)  # numpy releases the GIL inside its loops, so threads scale on big arrays


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_THREADS, thread_name_prefix="imas-stitch")


def _parallel(fn: Callable[[int], None], n: int) -> None:
    """Call fn(0), ..., fn(n - 1), spread over the stitching threads."""
    if n <= 1 or _THREADS <= 1:
        for i in range(n):
            fn(i)
        return
    list(_pool().map(fn, range(n)))


def softmax_(scores: np.ndarray, axis: int = 1) -> np.ndarray:
    """Softmax over `axis`, in place for float32 input (returns the array)."""
    if scores.dtype != np.float32:
        scores = scores.astype(np.float32)
    np.subtract(scores, scores.max(axis=axis, keepdims=True), out=scores)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=axis, keepdims=True)
    return scores


def softmax_batch_(scores: np.ndarray) -> np.ndarray:
    """Softmax over the channels of (N, C, h, w), in place, one window per thread."""
    if scores.dtype != np.float32:
        scores = scores.astype(np.float32)
    _parallel(lambda i: softmax_(scores[i : i + 1]), scores.shape[0])
    return scores


def argmax_channels(scores: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) uint8 index of the largest channel, the first one on ties (as np.argmax).

    A running maximum over the channels, in row bands on threads: np.argmax(axis=0) walks the channel axis with a
    stride of H*W and is several times slower on Cityscapes-sized maps.
    """
    channels, height, width = scores.shape
    if channels > 256:
        raise InferError(f"{channels} classes do not fit 8-bit label maps")
    labels = np.zeros((height, width), dtype=np.uint8)
    edges = np.linspace(0, height, max(1, min(_THREADS, height // 64)) + 1).astype(int)

    def band(i: int) -> None:
        rows = slice(edges[i], edges[i + 1])
        best = scores[0, rows].copy()
        larger = np.empty(best.shape, dtype=bool)
        for k in range(1, channels):
            np.greater(scores[k, rows], best, out=larger)
            np.copyto(labels[rows], np.uint8(k), where=larger)
            np.maximum(best, scores[k, rows], out=best)

    _parallel(band, len(edges) - 1)
    return labels


class Stitcher(Protocol):
    """Accumulates window results into per-image canvases (numpy here; torch tensors in the torch backend)."""

    def scores(self, out: Any) -> Any:
        """Prepare one backend result batch (softmax when configured)."""

    def new_canvas(self, canvas_hw: tuple[int, int]) -> Any:
        """A zeroed accumulator for a canvas of this size."""

    def add(self, canvas: Any, scores: Any, index: int, window: Window, flipped: bool) -> None:
        """Add `scores[index]` (the result for `window`) into `canvas`."""

    def finish(self, canvas: Any, image_hw: tuple[int, int], keep_probs: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(H, W) uint8 class ids and, if asked, (C, H, W) float32 average probabilities, cropped to the image."""


class NumpyStitcher:
    """The host stitcher: float32 sum + count map, or a pasted uint8 label map for label-output models."""

    def __init__(self, output_kind: str, num_classes: int, *, softmax: bool) -> None:
        self.labels = output_kind == "labels"
        self.num_classes = num_classes
        self.softmax = softmax and output_kind == "logits"

    def scores(self, out: np.ndarray) -> np.ndarray:
        if self.labels:
            return out
        return softmax_batch_(out) if self.softmax else out.astype(np.float32, copy=False)

    def new_canvas(self, canvas_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        if self.labels:
            return np.full(canvas_hw, 255, dtype=np.uint8), None
        return np.zeros((self.num_classes, *canvas_hw), dtype=np.float32), np.zeros(canvas_hw, dtype=np.float32)

    def add(self, canvas: Any, scores: np.ndarray, index: int, window: Window, flipped: bool) -> None:
        total, count = canvas
        y0, y1, x0, x1 = window
        result = scores[index]
        if flipped:
            result = result[..., ::-1]
        if self.labels:
            total[y0:y1, x0:x1] = result
            return
        total[:, y0:y1, x0:x1] += result
        count[y0:y1, x0:x1] += 1.0

    def finish(self, canvas: Any, image_hw: tuple[int, int], keep_probs: bool) -> tuple[np.ndarray, np.ndarray | None]:
        total, count = canvas
        h, w = image_hw
        if self.labels:
            return np.ascontiguousarray(total[:h, :w]), None
        region = total[:, :h, :w]
        labels = argmax_channels(region)
        probs = region / count[:h, :w] if keep_probs else None
        return labels, probs
