"""Parity of an exported model with the PyTorch teacher: max/mean absolute difference, argmax agreement, mIoU.

The reference is always the teacher in float32 PyTorch on the same raw pixels, normalised exactly as the graph does
(`ExportWrapper`); for stitched models, the teacher run through the torch `full_tiles` sliding window at the same
image size. Reduced-precision models are judged against it too, so "agreement" is the accuracy cost of fp16
or int8 relative to the model that was trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from imas_core.errors import DataError, ExportError
from imas_export.options import DEFAULT_MAX_ABS, DEFAULT_MIN_AGREEMENT, OutputKind, ParityOptions
from imas_export.stitched import sliding_reference
from imas_export.wrapper import ExportWrapper

Runner = Callable[[np.ndarray], np.ndarray]  # (N, 3, H, W) uint8 raw RGB -> the model's output for them
ReferenceKind = Literal["logits", "probs"]


@dataclass(frozen=True)
class ParityReport:
    """How far one backend's outputs are from the teacher's on the same images. Fractions are in [0, 1]."""

    backend: str  # "onnxruntime-cpu", "tensorrt", ...
    precision: str
    images: int
    source: str  # where the images came from: a folder, "demo:val", "calibration hold-out of ..."
    compared: str  # what max/mean_abs measure: "logits", "probs" (vs softmax of the teacher) or "labels" (none)
    agreement: float  # fraction of pixels whose argmax equals the teacher's
    max_abs: float | None
    mean_abs: float | None
    min_agreement: float  # the thresholds applied
    max_abs_limit: float | None
    miou_reference: float | None = None  # teacher vs ground truth, when labels are known
    miou: float | None = None  # this backend vs ground truth
    miou_delta: float | None = None  # miou - miou_reference (negative = accuracy lost)

    @property
    def passed(self) -> bool:
        ok = self.agreement >= self.min_agreement
        if self.max_abs_limit is not None and self.max_abs is not None:
            ok = ok and self.max_abs <= self.max_abs_limit
        return ok

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON fields (non-finite numbers become the strings 'inf'/'nan') plus `passed`."""
        raw = dataclasses.asdict(self)
        safe = {k: str(v) if isinstance(v, float) and not np.isfinite(v) else v for k, v in raw.items()}
        return {**safe, "passed": self.passed}

    def line(self) -> str:
        """One-line summary, e.g. ``onnxruntime-cpu fp32: agreement 100.000% max-abs 2.1e-05 ...``."""
        text = f"{self.backend} {self.precision}: agreement {100 * self.agreement:.3f}% on {self.images} images"
        if self.source:
            text += f" ({self.images_described()})"
        if self.max_abs is not None and self.mean_abs is not None:
            text += f", {self.compared} max-abs {self.max_abs:.2e} mean-abs {self.mean_abs:.2e}"
        if self.miou is not None and self.miou_reference is not None and self.miou_delta is not None:
            text += (
                f", mIoU {100 * self.miou:.2f} on these {self.images} images"
                f" (torch {100 * self.miou_reference:.2f}, {100 * self.miou_delta:+.2f})"
            )
        return text

    def images_described(self) -> str:
        """Which images were compared: the folder, or for the demo set that they are not training's validation."""
        if self.source.startswith("demo:"):
            split = self.source.split(":", 1)[1]
            return (
                f"the first {self.images} demo {split} scenes rendered at the model's input size, not the images or "
                "the count training evaluated, so the mIoU differs from training's"
            )
        return self.source


def thresholds(precision: str, options: ParityOptions) -> tuple[float, float | None]:
    """(min_agreement, max_abs_limit): the options' overrides, else the documented per-precision defaults."""
    min_agreement = options.min_agreement if options.min_agreement is not None else DEFAULT_MIN_AGREEMENT[precision]
    max_abs = options.max_abs_diff if options.max_abs_diff is not None else DEFAULT_MAX_ABS[precision]
    return min_agreement, max_abs


def torch_reference(teacher: nn.Module, mean: list[float], std: list[float], images: np.ndarray) -> np.ndarray:
    """Teacher logits (N, C, H, W) float32 for raw uint8 images, one image at a time (bounded memory)."""
    wrapper = ExportWrapper(teacher, mean, std, "logits").eval()
    outs = []
    with torch.inference_mode():
        for i in range(images.shape[0]):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + 1])).float()
            outs.append(wrapper(x).float().numpy())
    return np.concatenate(outs)


def teacher_reference(
    teacher: nn.Module,
    mean: list[float],
    std: list[float],
    images: np.ndarray,
    *,
    num_classes: int,
    stitch: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> tuple[np.ndarray, ReferenceKind]:
    """The teacher's output to judge an export by: (logits, "logits") of each image, or for a stitched model
    (`stitch` = (window, stride)) the averaged probabilities of the torch full_tiles sliding window, "probs"."""
    if stitch is None:
        return torch_reference(teacher, mean, std, images), "logits"
    window, stride = stitch
    return sliding_reference(teacher, mean, std, images, num_classes, window, stride), "probs"


def run_batched(runner: Runner, images: np.ndarray, batch: int) -> np.ndarray:
    """Apply `runner` in chunks of at most `batch` images and concatenate."""
    return np.concatenate([runner(images[i : i + batch]) for i in range(0, images.shape[0], batch)])


def _miou(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """mIoU over the whole set (per-class counts summed over images first), as training evaluation computes it."""
    from imas_core.scores import intersection_union, miou

    inter_total = np.zeros(num_classes, dtype=np.int64)
    union_total = np.zeros(num_classes, dtype=np.int64)
    for p, g in zip(pred, labels, strict=True):
        try:
            inter, union = intersection_union(p, g, num_classes)
        except ValueError as err:
            raise DataError(f"ground truth does not fit a {num_classes}-class model: {err}") from err
        inter_total += inter
        union_total += union
    return miou(inter_total, union_total)[0]


def compare(
    reference_logits: np.ndarray,
    output: np.ndarray,
    output_kind: OutputKind,
    *,
    backend: str,
    precision: str,
    source: str,
    min_agreement: float,
    max_abs_limit: float | None,
    labels: np.ndarray | None = None,
    reference_kind: ReferenceKind = "logits",
) -> ParityReport:
    """Compare a backend's `output` of kind `output_kind` with the teacher's on the same images.

    The reference is the teacher's logits, or its probabilities (`reference_kind` "probs": the averaged sliding
    window of a stitched model, which a `probs` output is compared with directly).
    """
    if reference_kind == "probs" and output_kind == "logits":
        raise ExportError(f"{backend}: logits output cannot be compared with a probability reference")
    ref = reference_logits.astype(np.float32)
    if output_kind == "labels":
        pred = output.astype(np.int64)
        max_abs = mean_abs = None
    else:
        out = output.astype(np.float32)
        if out.shape != ref.shape:
            raise ExportError(f"{backend}: output shape {out.shape} differs from the teacher's {ref.shape}")
        if output_kind == "probs" and reference_kind == "logits":
            ref = torch.softmax(torch.from_numpy(ref), dim=1).numpy()
        diff = np.abs(out - ref)
        max_abs, mean_abs = float(diff.max()), float(diff.mean())
        if not np.isfinite(max_abs):
            max_abs = float("inf")
        pred = out.argmax(1)
    ref_pred = reference_logits.argmax(1)
    if pred.shape != ref_pred.shape:
        raise ExportError(f"{backend}: label map shape {pred.shape} differs from the teacher's {ref_pred.shape}")
    miou_ref = miou_out = delta = None
    if labels is not None:
        num_classes = reference_logits.shape[1]
        miou_ref, miou_out = _miou(ref_pred, labels, num_classes), _miou(pred, labels, num_classes)
        delta = miou_out - miou_ref
    return ParityReport(
        backend=backend,
        precision=precision,
        images=int(ref.shape[0]),
        source=source,
        compared=output_kind,
        agreement=float((pred == ref_pred).mean()),
        max_abs=max_abs,
        mean_abs=mean_abs,
        min_agreement=min_agreement,
        max_abs_limit=max_abs_limit,
        miou_reference=miou_ref,
        miou=miou_out,
        miou_delta=delta,
    )


def require_passed(report: ParityReport, artifact: Path, consequence: str = "nothing was written") -> None:
    """Raise ExportError explaining the failed threshold, its `consequence` and how to proceed."""
    if report.passed:
        return
    if report.agreement < report.min_agreement:
        why = f"argmax agreement {100 * report.agreement:.3f}% < {100 * report.min_agreement:.3f}%"
    else:
        why = f"{report.compared} max-abs difference {report.max_abs:.3g} > {report.max_abs_limit:.3g}"
    raise ExportError(
        f"{artifact.name}: parity check failed on {report.images} images ({report.backend} {report.precision}): "
        f"{why}; {consequence}. Check the export (opset, precision), or relax the threshold knowingly "
        "with --min-agreement / --max-abs-diff"
    )
