"""Timings of a run: per-stage totals, per-image latency percentiles, throughput, and the JSON report.

Stages: decode (reader threads), preprocess (padding + filling batches), model (the backend call), stitch
(softmax, accumulation, argmax), write (encoding + writing outputs, writer threads), eval (GT scoring, writer
threads). Reader and writer stages run in parallel with the model, so their totals may exceed the wall time; the
per-image figures divide each total by the number of images. Latency is measured per image from the start of its
decoding to the end of its last write, so it includes the time spent queued. `benchmark_model` times the model
alone (`--benchmark`). Tier 0 + numpy.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imas_core.atomic import atomic_write_json

if TYPE_CHECKING:
    from imas_core.runners.base import Backend
    from imas_infer.options import RunSettings

STAGES = ("decode", "preprocess", "model", "stitch", "write", "eval")


class Timings:
    """Thread-safe stage totals (seconds) and per-image latencies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stages: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.latencies: list[float] = []
        self.model_calls = 0
        self.windows = 0
        self.start = time.perf_counter()
        self.end: float | None = None

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.stages[stage] += seconds

    def image_done(self, latency: float) -> None:
        with self._lock:
            self.latencies.append(latency)

    def model_call(self, windows: int, seconds: float) -> None:
        with self._lock:
            self.stages["model"] += seconds
            self.model_calls += 1
            self.windows += windows

    def stop(self) -> None:
        self.end = time.perf_counter()

    @property
    def wall(self) -> float:
        return (self.end or time.perf_counter()) - self.start


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    """{"p50": ..., ...} in milliseconds (None when there are no values)."""
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=np.float64) * 1e3
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


@dataclass
class RunSummary:
    """Counts and timings of one pipeline run (`to_dict` is the JSON form)."""

    images: int  # inputs attempted
    succeeded: int
    failures: list[tuple[str, str]]  # (path, reason)
    timings: Timings
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        t = self.timings
        done = max(self.succeeded, 1)
        return {
            "images": self.images,
            "succeeded": self.succeeded,
            "failed": len(self.failures),
            "failures": [{"path": p, "reason": r} for p, r in self.failures],
            "wall_s": t.wall,
            "images_per_s": self.succeeded / t.wall if t.wall > 0 else None,
            "latency_ms": percentiles(t.latencies),
            "stage_total_s": dict(t.stages),
            "stage_ms_per_image": {k: 1e3 * v / done for k, v in t.stages.items()},
            "model_calls": t.model_calls,
            "windows": t.windows,
            **self.extra,
        }

    def lines(self) -> list[str]:
        """The human summary printed at the end of a run."""
        d = self.to_dict()
        lat = d["latency_ms"]
        rate = f"{d['images_per_s']:.2f} img/s" if d["images_per_s"] else "n/a"
        out = [
            f"done: {self.succeeded}/{self.images} images in {d['wall_s']:.1f} s ({rate}), "
            f"{d['windows']} windows in {d['model_calls']} model calls"
        ]
        if lat["p50"] is not None:
            out.append(f"latency per image: p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms, p99 {lat['p99']:.0f} ms")
        stages = ", ".join(f"{k} {v:.1f}" for k, v in d["stage_ms_per_image"].items() if v > 0)
        out.append(f"stage time per image (ms): {stages}")
        if self.failures:
            out.append(f"failed: {len(self.failures)} image(s); see the lines above")
        return out


def model_benchmark_dict(
    batch: int, window: tuple[int, int], seconds: list[float], unit: str = "windows"
) -> dict[str, Any]:
    """Figures of the model-only benchmark: `seconds` holds one entry per timed full-batch call of `batch` `unit`
    ("windows", or "images" for a stitched model, whose `window` is then the image size)."""
    mean = float(np.mean(seconds)) if seconds else float("nan")
    return {
        "batch": batch,
        "window": list(window),
        "iterations": len(seconds),
        "ms_per_batch": {"mean": 1e3 * mean, **percentiles(seconds)},
        f"{unit}_per_s": batch / mean if seconds and mean > 0 else None,
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write the JSON report atomically."""
    atomic_write_json(path, report)


def benchmark_model(
    backend: Backend, settings: RunSettings, *, iterations: int, warmup: int
) -> tuple[int, tuple[int, int], list[float]]:
    """Time the model alone on full batches of random windows (whole images for a stitched model):
    (batch, window or image size, seconds per timed call)."""
    window = backend.input_hw or settings.window
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(settings.batch, 3, *window)).astype(backend.input_dtype)
    for _ in range(warmup):
        backend.run(batch)
    seconds = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        backend.run(batch)
        seconds.append(time.perf_counter() - t0)
    return settings.batch, window, seconds
