"""mIoU bookkeeping in numpy (tier 0: stdlib + numpy only, no torch).

Training-time evaluation (per-image counts from `imas_train.metrics`) and ``imas-infer --gt`` both reduce through
`miou`, so their numbers agree by construction (docs/algorithm.md §8).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imas_core.constants import IGNORE_INDEX

__all__ = ["intersection_union", "miou", "format_iou_table"]


def intersection_union(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class intersection and union counts of one image, pixels labelled `ignore_index` excluded.

    Args:
        pred: (H, W) integer predictions in [0, C).
        gt: (H, W) integer labels in [0, C) or `ignore_index`.
        num_classes: C.
        ignore_index: label excluded from both counts.

    Returns:
        inter, union: (C,) int64 each.

    Raises:
        ValueError: on a shape mismatch or a value outside [0, C) (other than `ignore_index` in `gt`).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ")
    valid = gt != ignore_index
    p = pred[valid].astype(np.int64)
    g = gt[valid].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_classes or g.min() < 0 or g.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index}")
    area_inter = np.bincount(g[p == g], minlength=num_classes).astype(np.int64)
    area_pred = np.bincount(p, minlength=num_classes).astype(np.int64)
    area_gt = np.bincount(g, minlength=num_classes).astype(np.int64)
    return area_inter, area_pred + area_gt - area_inter


def miou(inter_total: np.ndarray, union_total: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean IoU over the classes with a non-empty union, and the per-class IoU.

    Args:
        inter_total, union_total: (C,) counts summed over the whole evaluation set.

    Returns:
        (miou, per_class): miou is a float in [0, 1] (NaN if no class has a non-empty union); per_class is (C,)
        float64 with NaN where the union is 0.
    """
    inter = np.asarray(inter_total, dtype=np.float64)
    union = np.asarray(union_total, dtype=np.float64)
    if inter.shape != union.shape or inter.ndim != 1:
        raise ValueError(f"inter {inter.shape} and union {union.shape} must be equal (C,) vectors")
    present = union > 0
    per_class = np.full(inter.shape, np.nan)
    per_class[present] = inter[present] / union[present]
    mean = float(per_class[present].mean()) if present.any() else float("nan")
    return mean, per_class


def format_iou_table(per_class: np.ndarray, class_names: Sequence[str]) -> str:
    """An aligned plain-text table of per-class IoU in percent (2 decimals, "n/a" for absent classes) and mIoU.

    The mIoU row averages the classes that are not NaN, as `miou` does.
    """
    values = np.asarray(per_class, dtype=np.float64)
    if len(class_names) != values.shape[0]:
        raise ValueError(f"{len(class_names)} class names for {values.shape[0]} IoU values")
    present = ~np.isnan(values)
    mean = float(values[present].mean()) if present.any() else float("nan")
    rows = [(str(name), value) for name, value in zip(class_names, values, strict=True)] + [("mIoU", mean)]
    width = max(len("class"), *(len(name) for name, _ in rows))

    def cell(value: float) -> str:
        return "n/a" if np.isnan(value) else f"{100.0 * value:.2f}"

    lines = [f"{'class':<{width}}  {'IoU %':>7}", "-" * (width + 9)]
    lines += [f"{name:<{width}}  {cell(value):>7}" for name, value in rows[:-1]]
    lines += ["-" * (width + 9), f"{rows[-1][0]:<{width}}  {cell(rows[-1][1]):>7}"]
    return "\n".join(lines)
