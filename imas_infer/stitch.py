"""Window planning, batching and stitching in numpy (the model-independent half of sliding-window inference).

An image becomes an `ImageJob`: the image padded to its canvas, the windows to run, and an accumulator. Windows of
all queued images go through a `Batcher`, which packs windows of equal shape into full batches, so one backend call
serves several images. Each result is added back into its image's canvas by a `Stitcher`:
* logits are turned into probabilities first (`softmax`), then summed with a count map; the `fast` protocol's
  average and the `imas` protocol's sum have the same argmax, and saved probabilities are always the average;
* class ids (label-output models) are pasted, which is exact only where windows do not overlap (checked upstream).
Tier 0 + numpy.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from imas_train.errors import InferError
from imas_train.tiling import Window, padded_shape, plan_windows


def plan_image(
    height: int,
    width: int,
    mode: str,
    window: tuple[int, int],
    stride: tuple[int, int],
    static_window: tuple[int, int] | None,
) -> tuple[tuple[int, int], list[Window]]:
    """Canvas size and windows of one image.

    Args:
        height, width: image size.
        mode: "fast" (full tiles, last one flush with the border, small images padded), "imas" (the reference:
            truncated edge windows) or "whole" (one window: the image, or the padded static window).
        window, stride: (H, W) sliding-window geometry (unused in whole mode).
        static_window: the model's fixed input size, or None when it takes any size.

    Returns:
        ((canvas_h, canvas_w), windows); the image sits at the top left of the canvas, the rest is padding.
    """
    if mode == "whole":
        if static_window is None:
            return (height, width), [Window(0, height, 0, width)]
        wh, ww = static_window
        if height > wh or width > ww:
            raise InferError(
                f"--whole-image: a {height}x{width} image does not fit the model's static {wh}x{ww} input; use a "
                "dynamic-HW export or the sliding window (drop --whole-image)"
            )
        return (wh, ww), [Window(0, wh, 0, ww)]
    protocol = "imas" if mode == "imas" else "full_tiles"
    return padded_shape(height, width, window, protocol), plan_windows(height, width, window, stride, protocol)


def windows_overlap(windows: list[Window]) -> bool:
    """True when some pixel lies in two windows (windows form a grid of row and column intervals)."""
    for lo, hi in ((0, 1), (2, 3)):
        spans = sorted({(w[lo], w[hi]) for w in windows})
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
            return True
    return False


def pad_image(image: np.ndarray, canvas_hw: tuple[int, int], pad_rgb: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (canvas_h, canvas_w, 3), padded bottom/right with `pad_rgb` (no copy when no padding)."""
    h, w = image.shape[:2]
    if (h, w) == tuple(canvas_hw):
        return image
    canvas = np.empty((*canvas_hw, 3), dtype=np.uint8)
    canvas[...] = np.asarray(pad_rgb, dtype=np.uint8)
    canvas[:h, :w] = image
    return canvas


@dataclass(eq=False)
class ImageJob:
    """One image in flight: its padded pixels, its accumulator and how many window results are still due."""

    index: int
    image: np.ndarray  # (canvas_h, canvas_w, 3) uint8, padded
    image_hw: tuple[int, int]  # the real image size, top left of the canvas
    canvas: Any  # the stitcher's accumulator
    remaining: int
    payload: Any = None  # the pipeline's bookkeeping (input item, timestamps)


class Task(NamedTuple):
    """One window of one image (flipped: the horizontal mirror, for --flip)."""

    job: ImageJob
    window: Window
    flipped: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.window.y1 - self.window.y0, self.window.x1 - self.window.x0


class Batcher:
    """Packs tasks of equal window shape into batches of `size`; pending partial batches stay until flushed."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.size = size
        self._pending: dict[tuple[int, int], list[Task]] = {}

    def add(self, task: Task) -> list[Task] | None:
        """Queue a task; returns the batch it completed, if any."""
        tasks = self._pending.setdefault(task.shape, [])
        tasks.append(task)
        if len(tasks) < self.size:
            return None
        del self._pending[task.shape]
        return tasks

    def take(self, job: ImageJob) -> list[list[Task]]:
        """Remove and return the partial batches that hold windows of `job` (to finish it early)."""
        keys = [k for k, tasks in self._pending.items() if any(t.job is job for t in tasks)]
        return [self._pending.pop(k) for k in keys]

    def drain(self) -> list[list[Task]]:
        """Remove and return every partial batch."""
        batches = list(self._pending.values())
        self._pending.clear()
        return batches


def fill_batch(tasks: list[Task], buffer: np.ndarray) -> np.ndarray:
    """Copy the tasks' windows, as (3, h, w) in the buffer's dtype, into `buffer[:len(tasks)]` and return that view."""
    for i, task in enumerate(tasks):
        y0, y1, x0, x1 = task.window
        crop = task.job.image[y0:y1, x0:x1]
        if task.flipped:
            crop = crop[:, ::-1]
        buffer[i] = crop.transpose(2, 0, 1)
    return buffer[: len(tasks)]


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
