"""`--gt`: mIoU of the predictions against ground-truth label PNGs, reduced like training-time evaluation.

Per image, `imas_core.scores.intersection_union` (ignore 255); over the run, the sums go through
`imas_core.scores.miou`, the same reduction the training evaluator uses, so both report the same number for the
same predictions.

Matching an input at relative path `<dir>/<stem>.<ext>` to its ground truth, the first existing candidate wins,
looked up in `<gt>/<dir>/` and then in `<gt>/`:
* `<stem><suffix>` with --gt-suffix (default `<stem>.png`);
* Cityscapes: `<base>_gtFine_labelTrainIds.png`, then `<base>_gtFine_labelIds.png`, where `<stem>` is
  `<base>_leftImg8bit` (and `<base><suffix>` with --gt-suffix).
Files whose name ends in `_labelIds.png` hold official Cityscapes label ids and are mapped to train ids.
Tier 0 + numpy + Pillow.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imas_core.classes import cityscapes_label_to_train_table
from imas_core.constants import IGNORE_INDEX
from imas_core.errors import InferError
from imas_core.images import orient_label
from imas_core.scores import format_iou_table, intersection_union, miou
from imas_infer.image_io import CITYSCAPES_IMAGE_SUFFIX, InputItem

_LABEL_IDS_SUFFIX = "_labelIds.png"


def gt_candidates(rel: Path, suffix: str | None) -> list[Path]:
    """Candidate GT paths (relative to the GT root) for an input at relative path `rel`, in priority order."""
    stem = rel.stem
    names = [stem + (suffix or ".png")]
    if stem.endswith(CITYSCAPES_IMAGE_SUFFIX):
        base = stem[: -len(CITYSCAPES_IMAGE_SUFFIX)]
        if suffix:
            names.append(base + suffix)
        names += [base + "_gtFine_labelTrainIds.png", base + "_gtFine_labelIds.png"]
    nested = [rel.parent / n for n in names]
    flat = [Path(n) for n in names] if rel.parent != Path(".") else []
    return nested + flat


def match_ground_truth(items: list[InputItem], gt_root: Path, suffix: str | None) -> dict[int, Path]:
    """Index of each input -> its GT file (inputs without one are left out).

    Raises:
        InferError: the GT folder does not exist or no input has a GT file.
    """
    if not gt_root.is_dir():
        raise InferError(f"--gt {gt_root}: not a directory")
    found: dict[int, Path] = {}
    for index, item in enumerate(items):
        for candidate in gt_candidates(item.rel, suffix):
            if (gt_root / candidate).is_file():
                found[index] = gt_root / candidate
                break
    if not found:
        first = gt_root / gt_candidates(items[0].rel, suffix)[0]
        raise InferError(
            f"--gt {gt_root}: no ground truth found for any input (looked for e.g. {first}); set --gt-suffix"
        )
    return found


def read_label_map(path: Path) -> np.ndarray:
    """(H, W) uint8 train ids from a label PNG; `*_labelIds.png` files are mapped from Cityscapes label ids."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise InferError(f"{path}: label image mode {img.mode}, expected 8-bit greyscale or palette indices")
        labels = np.asarray(img)
    if labels.dtype != np.uint8:
        if labels.min() < 0 or labels.max() > 255:
            raise InferError(f"{path}: label values outside 0-255")
        labels = labels.astype(np.uint8)
    if path.name.endswith(_LABEL_IDS_SUFFIX):
        labels = np.asarray(cityscapes_label_to_train_table(IGNORE_INDEX), dtype=np.uint8)[labels]
    return labels


@dataclass(frozen=True)
class EvalResult:
    miou: float
    per_class: np.ndarray  # (C,) IoU, NaN for classes absent from predictions and GT
    intersection: np.ndarray
    union: np.ndarray
    images: int
    missing: int  # inputs without a GT file

    def table(self, class_names: tuple[str, ...] | list[str]) -> str:
        return format_iou_table(self.per_class, list(class_names))

    def to_dict(self, class_names: tuple[str, ...] | list[str]) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        return {
            "miou": num(self.miou),
            "per_class": {name: num(v) for name, v in zip(class_names, self.per_class, strict=True)},
            "images": self.images,
            "missing_gt": self.missing,
            "intersection": [int(v) for v in self.intersection],
            "union": [int(v) for v in self.union],
        }


class Evaluator:
    """Thread-safe accumulator of per-class intersection and union over the images of a run."""

    def __init__(self, num_classes: int, gt_paths: dict[int, Path], total_inputs: int) -> None:
        self.num_classes = num_classes
        self.gt_paths = gt_paths
        self.total_inputs = total_inputs
        self._inter = np.zeros(num_classes, dtype=np.int64)
        self._union = np.zeros(num_classes, dtype=np.int64)
        self._images = 0
        self._lock = threading.Lock()

    def add(
        self, index: int, labels: np.ndarray, *, orientation: int = 1, stored_hw: tuple[int, int] | None = None
    ) -> None:
        """Score the prediction of input `index` (no-op without GT).

        `orientation` and `stored_hw` are the input's applied EXIF orientation and stored size: the GT mask is
        turned with the image when it has that stored size (`imas_core.images.orient_label`).

        Raises:
            InferError: unreadable GT, a size mismatch, or GT values that are neither class ids nor 255.
        """
        path = self.gt_paths.get(index)
        if path is None:
            return
        try:
            gt = read_label_map(path)
        except OSError as err:
            raise InferError(f"{path}: unreadable ground truth ({err})") from err
        if stored_hw is not None:
            gt = orient_label(gt, orientation, stored_hw)
        if gt.shape != labels.shape:
            raise InferError(
                f"{path}: ground truth is {gt.shape[0]}x{gt.shape[1]}, prediction {labels.shape[0]}x{labels.shape[1]}"
            )
        try:
            inter, union = intersection_union(labels, gt, self.num_classes, IGNORE_INDEX)
        except ValueError as err:
            raise InferError(f"{path}: {err}") from err
        with self._lock:
            self._inter += inter
            self._union += union
            self._images += 1

    def result(self) -> EvalResult:
        with self._lock:
            value, per_class = miou(self._inter, self._union)
            missing = self.total_inputs - len(self.gt_paths)
            return EvalResult(value, per_class, self._inter.copy(), self._union.copy(), self._images, missing)
