"""Window planning, batching and stitching in numpy (the model-independent half of sliding-window inference).

An image becomes an `ImageJob`: the image padded to its canvas, the windows to run, and an accumulator. Windows of
all queued images go through a `Batcher`, which packs windows of equal shape into full batches, so one backend call
serves several images. Each result is added back into its image's canvas by a `Stitcher`:
* logits are turned into probabilities first (`softmax`), then summed with a count map; the `full_tiles` protocol's
  average and the `imas` protocol's sum have the same argmax, and saved probabilities are always the average;
* class ids (label-output models) are pasted, which is exact only where windows do not overlap (checked upstream).
Tier 0 + numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import numpy as np

from imas_core.errors import InferError
from imas_core.tiling import WINDOW_PROTOCOLS, Window, WindowProtocol, padded_shape, plan_windows


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
        mode: "full_tiles" (full tiles, last one flush with the border, small images padded), "imas" (the
            reference: truncated edge windows) or "whole" (one window: the image, or the padded static window).
            Any other value raises ValueError.
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
    if mode not in WINDOW_PROTOCOLS:
        raise ValueError(f"mode must be 'whole' or one of {', '.join(WINDOW_PROTOCOLS)}, got {mode!r}")
    protocol = cast(WindowProtocol, mode)
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
