"""Supervised losses (docs/algorithm.md §6.1): CE and OHEM against slow, sort-based oracles."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from imas_train.losses import cross_entropy, ohem_cross_entropy


def slow_ohem(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """The reference recipe: flatten, full argsort of the GT-class probabilities, threshold, plain CE."""
    c = logits.shape[1]
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, c)
    flat_target = target.reshape(-1).clone()
    valid = flat_target != 255
    num_valid = int(valid.sum())
    if num_valid >= min_kept:
        prob = flat_logits.softmax(1).detach()
        q = torch.ones(flat_target.numel())
        for j in range(flat_target.numel()):
            if valid[j]:
                q[j] = prob[j, flat_target[j]]
        threshold = thresh
        index = q.argsort()
        kth = float(q[index[min(len(index), min_kept) - 1]])
        if kth > thresh:
            threshold = kth
        valid = valid & (q <= threshold)
        flat_target[~valid] = 255
    return F.cross_entropy(flat_logits, flat_target, ignore_index=255)


def _batch(seed: int, ignore_frac: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 4, 9, 11, generator=gen) * 2).requires_grad_()
    target = torch.randint(0, 4, (2, 9, 11), generator=gen)
    target[torch.rand(2, 9, 11, generator=gen) < ignore_frac] = 255
    return logits, target


def test_cross_entropy_matches_torch_and_is_fp32() -> None:
    logits, target = _batch(0)
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits, target, ignore_index=255))
    assert cross_entropy(logits.to(torch.bfloat16), target).dtype == torch.float32


@pytest.mark.parametrize("loss_fn", [cross_entropy, lambda x, y: ohem_cross_entropy(x, y, 0.7, 10)])
def test_all_ignored_gives_zero_with_grad(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = loss_fn(logits, torch.full((1, 4, 4), 255))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_ohem_too_few_valid_keeps_all_valid() -> None:
    logits, target = _batch(1)
    num_valid = int((target != 255).sum())
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=num_valid + 1)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=255))
    torch.testing.assert_close(loss, slow_ohem(logits, target, 0.7, num_valid + 1))


@pytest.mark.parametrize(("thresh", "min_kept"), [(0.7, 20), (0.05, 40), (0.3, 60), (0.9, 1)])
def test_ohem_mining_matches_sort_oracle(thresh: float, min_kept: int) -> None:
    logits, target = _batch(2)
    assert int((target != 255).sum()) >= min_kept  # the mining branch
    loss = ohem_cross_entropy(logits, target, thresh=thresh, min_kept=min_kept)
    torch.testing.assert_close(loss, slow_ohem(logits, target, thresh, min_kept))
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_ohem_kth_threshold_keeps_exactly_min_kept() -> None:
    # With a tiny thresh the k-th smallest q decides: exactly min_kept pixels are kept (no ties in random data).
    logits, target = _batch(3, ignore_frac=0.0)
    q = logits.detach().softmax(1).gather(1, target.unsqueeze(1)).squeeze(1).flatten()
    hardest = q.argsort()[:25]
    ce = F.cross_entropy(logits.detach(), target, reduction="none").flatten()
    expected = ce[hardest].mean()
    torch.testing.assert_close(ohem_cross_entropy(logits, target, thresh=1e-6, min_kept=25), expected)


def test_ohem_threshold_floor_keeps_everything_below_thresh() -> None:
    logits, target = _batch(4, ignore_frac=0.0)
    q = logits.detach().softmax(1).gather(1, target.unsqueeze(1)).squeeze(1)
    keep = q <= 0.7
    assert 1 <= int(keep.sum())
    ce = F.cross_entropy(logits.detach(), target, reduction="none")
    torch.testing.assert_close(ohem_cross_entropy(logits, target, thresh=0.7, min_kept=1), ce[keep].mean())
