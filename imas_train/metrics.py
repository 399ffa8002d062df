"""Per-image intersection and union on the device (torch). Reduce the summed counts with `imas_core.scores.miou`.

Per-image rows (rather than one running confusion matrix) let Accelerate's ``gather_for_metrics`` drop the padded
duplicates of the last batch, so every val image is scored exactly once (docs/algorithm.md §10).
"""

from __future__ import annotations

import torch
from torch import Tensor

from imas_core.constants import IGNORE_INDEX

__all__ = ["intersection_union"]


@torch.no_grad()
def intersection_union(
    pred: Tensor, gt: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Per-image, per-class intersection and union counts, pixels labelled `ignore_index` excluded.

    Args:
        pred: (B, H, W) integer predictions in [0, C).
        gt: (B, H, W) integer labels in [0, C) or `ignore_index`.
        num_classes: C.
        ignore_index: label excluded from both counts.

    Returns:
        inter, union: (B, C) int64 each, on the inputs' device (one batched bincount, no host sync).
    """
    if pred.shape != gt.shape or pred.dim() != 3:
        raise ValueError(f"pred and gt must both be (B, H, W); got {tuple(pred.shape)} and {tuple(gt.shape)}")
    b, k = gt.shape[0], num_classes
    valid = gt != ignore_index
    offsets = torch.arange(b, device=gt.device).view(b, 1, 1) * (k * k)
    index = offsets + gt.long() * k + pred.long()
    index = torch.where(valid, index, torch.full_like(index, b * k * k))  # ignored pixels go to one spare bin
    cm = torch.bincount(index.flatten(), minlength=b * k * k + 1)[: b * k * k].view(b, k, k)  # rows gt, cols pred
    inter = cm.diagonal(dim1=1, dim2=2)
    union = cm.sum(2) + cm.sum(1) - inter
    return inter.contiguous(), union
