"""Per-pixel statistics of predictions: entropy and a percentile equal to numpy's, on the tensors' device.

U2PL filters pseudo-labels by an entropy percentile and picks its anchors and negatives by probability ranks
(``shared/methods/U2PL.md`` §2.B items 7-8); both must agree with numpy's default linear percentile exactly, without a
copy to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["entropy", "percentile"]


def entropy(probs: Tensor, dim: int = 1, eps: float = 1e-10) -> Tensor:
    """Shannon entropy in nats of **probabilities** along ``dim``: ε = −Σ_c p_c·log(p_c + eps) (U2PL.md §2.B item 7).

    Pass ``logits.softmax(1)``. With the reference's eps = 1e-10 a one-hot float32 input gives exactly 0 and a
    uniform one log C (§7 oracle 1). Half-precision inputs are computed in float32.

    Args:
        probs: e.g. (B, C, H, W) probabilities summing to 1 along ``dim``.
        dim: the class dimension.
        eps: added inside the log.

    Returns:
        ``probs`` without ``dim``, e.g. (B, H, W), float32 (float64 for float64 input).
    """
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating tensor, got {probs.dtype}")
    if probs.dtype not in (torch.float32, torch.float64):
        probs = probs.float()
    return -(probs * torch.log(probs + eps)).sum(dim=dim)


def percentile(x: Tensor, q: float | Sequence[float] | Tensor, valid: Tensor | None = None) -> Tensor:
    """``numpy.percentile(x[valid], q)`` with numpy's default linear method, bit for bit, on x's device.

    U2PL thresholds entropies with ``np.percentile`` over the valid pixels of the per-GPU batch (U2PL.md §2.B items
    7–8, §9 ``u2pl.percentile``). Replicated details (numpy 2.x): index v = (n − 1)·(q/100) in float64; γ = v −
    ⌊v⌋, or v + 1 at the top (where numpy clamps both neighbours to the last element); result ``b − (b − a)(1 − γ)``
    when γ >= 0.5 else ``a + (b − a)γ``; any NaN among the elements gives NaN (so do ±inf neighbours, as in numpy).
    Output dtype as numpy: x's dtype when q is a Python int or float, float64 when q is a sequence or tensor.

    No host synchronisation: invalid elements are sorted to the end as +inf and n is counted on the device. With no
    valid element the result is NaN (numpy raises on an empty array).

    Args:
        x: float32 or float64 tensor, any shape (flattened).
        q: percentile(s) in [0, 100]: a number, a sequence, or a 0-d/1-d tensor.
        valid: optional bool tensor shaped like ``x``; only True elements count.

    Returns:
        0-d tensor for a Python number q, else (len(q),), on x's device.
    """
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError("x is empty")
    if valid is not None and (valid.shape != x.shape or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool tensor shaped like x {tuple(x.shape)}, got {tuple(valid.shape)}")
    weak = type(q) in (int, float)  # numpy's rule: only a Python scalar keeps x's dtype
    q_values = torch.as_tensor(q, dtype=torch.float64).reshape(-1)
    if q_values.numel() == 0 or q_values.dim() != 1 or not bool(((q_values >= 0) & (q_values <= 100)).all()):
        raise ValueError(f"q must be percentiles in [0, 100], got {q}")
    q_values = q_values.to(x.device)

    flat = x.reshape(-1)
    if valid is None:
        n = torch.tensor(flat.numel(), device=x.device)
        has_nan = torch.isnan(flat).any()
    else:
        valid = valid.reshape(-1)
        n = valid.sum()
        has_nan = (torch.isnan(flat) & valid).any()
        flat = torch.where(valid, flat, torch.full_like(flat, math.inf))
    ordered = torch.sort(flat).values

    last = n - 1
    virtual = last.double() * (q_values / 100)
    previous = torch.floor(virtual)
    at_top = virtual >= last
    gamma = torch.where(at_top, virtual + 1, virtual - previous)
    lo_index = torch.where(at_top, last, previous.long()).clamp_min(0)
    hi_index = torch.where(at_top, last, previous.long() + 1).clamp(0, flat.numel() - 1)
    a, b = ordered[lo_index], ordered[hi_index]
    diff = b - a  # in x's dtype, as numpy
    if weak:
        t, one_minus_t = gamma.to(x.dtype), (1 - gamma).to(x.dtype)
    else:
        a, b, diff, t, one_minus_t = a.double(), b.double(), diff.double(), gamma, 1 - gamma
    result = torch.where(gamma >= 0.5, b - diff * one_minus_t, a + diff * t)
    result = torch.where(has_nan | (n == 0), torch.full_like(result, math.nan), result)
    return result[0] if weak else result
