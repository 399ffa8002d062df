"""Whole images for a stitched model (the sliding window runs inside its graph): batched, run, no stitching.

Images are queued until `settings.batch` of them fill a call; the model's output is already the final label map
(or averaged probabilities), so the only host work is copying pixels in and, for probabilities, the argmax. With
--flip (probability outputs only) the mirrored batch runs too and the two results are averaged. Tier 0 + numpy.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np

from imas_core.runners.base import Backend
from imas_core.stitching import argmax_channels
from imas_infer.options import RunSettings
from imas_infer.report import Timings


class Finished(NamedTuple):
    """One image's result, ready for the writers."""

    input_index: int  # position in the input list
    payload: Any  # the pipeline's bookkeeping (input item, image, start time)
    labels: np.ndarray  # (H, W) uint8
    probs: np.ndarray | None  # (C, H, W) float32 when asked


class WholeImageBatches:
    """Queues whole images of the model's static size and runs them `settings.batch` at a time.

    Args:
        backend: a stitched model (`backend.info.stitched`).
        settings: resolved settings (mode "stitched"): batch in images, flip, keep_probs.
        timings: where preprocess, model and argmax ("stitch") time is added.
    """

    def __init__(self, backend: Backend, settings: RunSettings, timings: Timings) -> None:
        if backend.input_hw is None:
            raise ValueError(f"{backend.info.path.name} has no static image size; it is not a stitched model")
        self.backend, self.settings, self.timings = backend, settings, timings
        self.size: tuple[int, int] = backend.input_hw
        self.buffer = np.empty((settings.batch, 3, *self.size), dtype=backend.input_dtype)
        self.queued: list[tuple[int, Any]] = []

    def refusal(self, image: np.ndarray) -> str | None:
        """Why this (H, W, 3) image cannot run (another size than the model's), or None."""
        h, w = image.shape[:2]
        if (h, w) == self.size:
            return None
        return (
            f"{h}x{w} image, but {self.backend.info.path.name} is stitched for {self.size[0]}x{self.size[1]} images "
            f"(re-export with imas-export onnx --image-size {h} {w}, or use a window model)"
        )

    def add(self, index: int, payload: Any, image: np.ndarray) -> list[Finished]:
        """Queue an image (of the right size: see `refusal`); returns the results when it completed a batch."""
        t0 = time.perf_counter()
        self.buffer[len(self.queued)] = image.transpose(2, 0, 1)
        self.queued.append((index, payload))
        self.timings.add("preprocess", time.perf_counter() - t0)
        return self.flush() if len(self.queued) >= self.settings.batch else []

    def flush(self) -> list[Finished]:
        """Run the queued images (a partial batch at the end of the input) and return their results."""
        queued, self.queued = self.queued, []
        if not queued:
            return []
        batch = self.buffer[: len(queued)]
        t0 = time.perf_counter()
        out = self.backend.run(batch)
        if self.settings.flip:  # probability outputs only (resolve_settings refuses class ids)
            out = np.array(out, dtype=np.float32)  # a copy: the next call may reuse the backend's output buffer
            out += self.backend.run(np.ascontiguousarray(batch[..., ::-1]))[..., ::-1]
            out *= 0.5
        calls = 2 if self.settings.flip else 1
        windows = len(queued) * max(1, self.backend.info.windows_in_graph) * calls
        self.timings.model_call(windows, time.perf_counter() - t0)
        t1 = time.perf_counter()
        results = []
        for i, (index, payload) in enumerate(queued):
            if out.ndim == 3:  # class ids, copied: the backend may reuse its output buffer on the next call
                results.append(Finished(index, payload, np.array(out[i], dtype=np.uint8), None))
            else:
                probs = np.array(out[i], dtype=np.float32) if self.settings.keep_probs else None
                results.append(Finished(index, payload, argmax_channels(out[i]), probs))
        self.timings.add("stitch", time.perf_counter() - t1)
        return results
