"""Supervised losses (docs/algorithm.md §6.1): plain cross-entropy (VOC) and OHEM cross-entropy (Cityscapes).

Both compute in float32 whatever the logits' dtype, ignore label 255, and return 0 (still attached to the graph)
when no pixel is left, instead of the NaN of an empty mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from imas_core.constants import IGNORE_INDEX

__all__ = ["cross_entropy", "ohem_cross_entropy"]


def _masked_mean_ce(logits: Tensor, target: Tensor, keep: Tensor, ignore_index: int) -> Tensor:
    """Mean CE over pixels where `keep` is True; 0 with a gradient path when none is kept."""
    target = target.masked_fill(~keep, ignore_index)
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")  # 0 where ignored
    return ce.sum() / keep.sum().clamp_min(1)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over the non-ignored pixels of the batch, no class weights.

    Args:
        logits: (B, C, H, W).
        target: (B, H, W) int64 in [0, C) or `ignore_index`.
        ignore_index: label excluded from the loss and from the mean.

    Returns:
        Scalar float32.
    """
    return _masked_mean_ce(logits, target, target != ignore_index, ignore_index)


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Online hard example mining cross-entropy over the whole (per-process) batch.

    q_j is the softmax probability of the ground-truth class at valid pixel j (ignored pixels get q = 1). If fewer
    than `min_kept` pixels are valid, every valid pixel is kept. Otherwise t = max(thresh, k-th smallest q) with
    k = min_kept, and the valid pixels with q_j <= t are kept (``kthvalue`` gives the reference's full-sort value).
    The loss is the mean CE over the kept pixels.

    Args:
        logits: (B, C, H, W).
        target: (B, H, W) int64 in [0, C) or `ignore_index`.
        thresh: probability threshold (0.7).
        min_kept: minimum number of pixels kept when enough are valid (100,000); 0 means t = thresh.
        ignore_index: ignored label.

    Returns:
        Scalar float32.
    """
    valid = target != ignore_index
    with torch.no_grad():  # branch-free, so no host sync: the mask falls back to `valid` when too few are valid
        prob = logits.detach().float().softmax(dim=1)
        q = prob.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
        q = q.masked_fill(~valid, 1.0)
        k = min(min_kept, q.numel())
        t = torch.tensor(thresh, device=q.device)
        if k > 0:
            t = torch.maximum(torch.kthvalue(q.flatten(), k).values, t)
        too_few = valid.sum() < min_kept
        keep = valid & ((q <= t) | too_few)
    return _masked_mean_ce(logits, target, keep, ignore_index)
