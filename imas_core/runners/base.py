"""The backend interface every runtime implements (docs/design.md, "Inference backends").

A backend runs a batch of windows: (N, 3, h, w) raw RGB 0-255 in `input_dtype` -> (N, C, h, w) float32 logits or
probabilities, or (N, h, w) uint8 class ids. Everything else (windows, stitching, files) is the pipeline's job, so
`imas_export verify` can reuse the same runners for parity checks. A *stitched* model (`ModelInfo.stitched`) runs
the sliding window inside its graph: its batch is N whole images of `image_size`, and its output is final.
Tier 0 + numpy.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imas_core.artifacts import ExportedModelMeta
from imas_core.errors import ArtifactError
from imas_core.stitching import NumpyStitcher, Stitcher
from imas_core.tiling import plan_windows


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a model, read from its sidecar and checked against the model."""

    path: Path
    format: str  # "onnx" | "tensorrt" | "teacher"
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    window: tuple[int, int] | None  # static input height/width; None: any size (dynamic HW)
    default_window: tuple[int, int] | None  # sliding window of a dynamic model when --window is not given
    default_stride: tuple[int, int]
    max_batch: int | None  # None: no declared maximum
    max_batch_is_hard: bool  # True: larger batches cannot run (engine profile, static ONNX batch)
    output_kind: str  # "logits" | "probs" | "labels"
    input_dtype: str  # "float32" | "uint8"
    precision: str  # "fp32" | "fp16" | "int8"
    eval_protocol: str
    stitched: bool = False  # whole images in, the sliding window inside the graph; `window`/`default_stride` its plan
    image_size: tuple[int, int] | None = None  # the static (H, W) of the images a stitched model takes
    windows_in_graph: int = 0  # K, the windows a stitched model runs per image

    @property
    def input_hw(self) -> tuple[int, int] | None:
        """The static (H, W) the model takes: the image size if stitched, else the window (None: any size)."""
        return self.image_size if self.stitched else self.window


def _pair(values: list[int] | None) -> tuple[int, int] | None:
    return (int(values[0]), int(values[1])) if values else None


def info_from_exported(path: Path, meta: ExportedModelMeta, fmt: str) -> ModelInfo:
    """ModelInfo of an ONNX model or engine from its sidecar (the backend checks it against the real model)."""
    window = _pair(meta.window)
    stride = (int(meta.stride[0]), int(meta.stride[1]))
    image_size = _pair(meta.image_size) if meta.stitched else None
    windows = 0
    if image_size is not None and window is not None:
        windows = len(plan_windows(image_size[0], image_size[1], window, stride, "full_tiles"))
    return ModelInfo(
        path=Path(path),
        format=fmt,
        num_classes=meta.num_classes,
        class_names=tuple(meta.class_names),
        palette=tuple((int(c[0]), int(c[1]), int(c[2])) for c in meta.palette),
        window=window,
        default_window=window or _pair(meta.default_window),  # dynamic HW: the teacher's window, when recorded
        default_stride=stride,
        max_batch=meta.max_batch,
        max_batch_is_hard=False,
        output_kind=meta.output_kind,
        input_dtype=meta.input_dtype,
        precision=meta.precision,
        eval_protocol=meta.eval_protocol,
        stitched=meta.stitched,
        image_size=image_size,
        windows_in_graph=windows,
    )


def check_class_count(sidecar: Path, sidecar_classes: int, model_classes: int, source: str) -> None:
    """Refuse a sidecar whose class count differs from what the model itself says (`source`, e.g. "the graph of
    m.onnx outputs").

    A sidecar can be consistent with itself (num_classes, class names and palette agree) and still belong to
    another model; without this check the run fails later inside the runtime, far from the cause.

    Raises:
        ArtifactError: naming the sidecar file, the model file (in `source`) and both numbers.
    """
    if sidecar_classes != model_classes:
        raise ArtifactError(
            f"{sidecar}: the sidecar says {sidecar_classes} classes, but {source} {model_classes}; the sidecar "
            "belongs to another model (restore the matching sidecar or re-export)"
        )


class Backend(abc.ABC):
    """One loaded model. Subclasses set `name`, `runtime` and `info` in their constructor and implement `run`.

    The pipeline calls `run_device` and hands the result to `stitcher()`; both default to host numpy arrays. A
    backend that keeps results on an accelerator (torch on CUDA) overrides the two together.
    """

    name: str  # "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "torch"
    runtime: str  # what actually runs it, e.g. "CPUExecutionProvider", "TensorRT 10.3.0 on NVIDIA A100"
    info: ModelInfo

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self.info.input_dtype)

    @property
    def window(self) -> tuple[int, int] | None:
        return self.info.window

    @property
    def input_hw(self) -> tuple[int, int] | None:
        return self.info.input_hw

    @property
    def max_batch(self) -> int | None:
        return self.info.max_batch

    @property
    def output_kind(self) -> str:
        return self.info.output_kind

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch.

        Args:
            batch: (N, 3, h, w) raw RGB 0-255, C-contiguous, `input_dtype`; h, w = `input_hw` for static models
                (the window, or the whole image of a stitched model).

        Returns:
            (N, C, h, w) float32 logits/probabilities, or (N, h, w) uint8 class ids. The array may be a buffer the
            backend reuses on its next call: read or copy it before calling `run` again. Callers may modify it.
        """

    def run_device(self, batch: np.ndarray) -> Any:
        """Like `run`, but the result may stay on the device; it is only ever given to `stitcher()`."""
        return self.run(batch)

    def stitcher(self, *, softmax: bool) -> Stitcher:
        """The accumulator for `run_device` results (numpy on the host by default)."""
        return NumpyStitcher(self.info.output_kind, self.info.num_classes, softmax=softmax)

    def close(self) -> None:  # noqa: B027  (optional hook: most backends hold nothing to release)
        """Release runtime resources (sessions, device buffers). Idempotent."""

    def describe(self) -> str:
        """One line for the user, e.g. "model.onnx (onnx, CPUExecutionProvider, window 769x769, batch 4, fp32)"."""
        window = f"window {self.info.window[0]}x{self.info.window[1]}" if self.info.window else "dynamic window"
        batch = f"batch {self.info.max_batch}" if self.info.max_batch else "dynamic batch"
        if self.info.stitched and self.info.image_size is not None:
            (h, w), k = self.info.image_size, self.info.windows_in_graph
            window = f"stitched {h}x{w}, {k} window{'s' * (k != 1)} in-graph"
            batch += " images"
        return f"{self.info.path.name} ({self.info.format}, {self.runtime}, {window}, {batch}, {self.info.precision})"

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
