"""Per-image intersection/union in torch and numpy, and the shared mIoU reduction (docs/algorithm.md §8)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from imas_core import scores
from imas_train.metrics import intersection_union


def test_hand_case() -> None:
    gt = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
    pred = torch.tensor([[[0, 1, 1], [2, 0, 2]]])  # the pixel under 255 is ignored
    inter, union = intersection_union(pred, gt, num_classes=4)
    assert inter.tolist() == [[1, 1, 1, 0]]
    assert union.tolist() == [[2, 3, 2, 0]]
    assert inter.dtype == union.dtype == torch.int64
    np_inter, np_union = scores.intersection_union(pred[0].numpy(), gt[0].numpy(), 4)
    assert np_inter.tolist() == [1, 1, 1, 0] and np_union.tolist() == [2, 3, 2, 0]
    assert np_inter.dtype == np_union.dtype == np.int64


def test_torch_matches_numpy_on_random_maps() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 6, (4, 13, 17), generator=gen)
    gt = torch.randint(0, 6, (4, 13, 17), generator=gen)
    gt[torch.rand(4, 13, 17, generator=gen) < 0.2] = 255
    gt[2] = 255  # an image with nothing to score
    inter, union = intersection_union(pred, gt, 6)
    assert inter.shape == union.shape == (4, 6)
    for i in range(4):
        np_inter, np_union = scores.intersection_union(pred[i].numpy(), gt[i].numpy(), 6)
        assert np.array_equal(inter[i].numpy(), np_inter) and np.array_equal(union[i].numpy(), np_union)
    # Both paths reduce through the same miou.
    total_t = scores.miou(inter.sum(0).numpy(), union.sum(0).numpy())
    per_image = [scores.intersection_union(p.numpy(), g.numpy(), 6) for p, g in zip(pred, gt, strict=True)]
    total_n = scores.miou(sum(a for a, _ in per_image), sum(b for _, b in per_image))
    assert total_t[0] == total_n[0]


def test_miou_skips_empty_classes() -> None:
    mean, per_class = scores.miou(np.array([1, 0, 3]), np.array([2, 0, 4]))
    assert mean == pytest.approx((0.5 + 0.75) / 2)
    assert per_class[0] == 0.5 and np.isnan(per_class[1]) and per_class[2] == 0.75
    assert np.isnan(scores.miou(np.zeros(3), np.zeros(3))[0])


def test_numpy_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        scores.intersection_union(np.array([[3]]), np.array([[0]]), 3)


def test_format_iou_table() -> None:
    table = scores.format_iou_table(np.array([0.5, np.nan, 0.123456]), ["road", "sidewalk", "traffic sign"])
    lines = table.splitlines()
    assert "road" in lines[2] and lines[2].endswith("50.00")
    assert lines[3].endswith("n/a")
    assert lines[4].endswith("12.35")
    assert lines[-1].startswith("mIoU") and lines[-1].endswith(f"{100 * (0.5 + 0.123456) / 2:.2f}")
    assert len({len(line) for line in lines}) == 1  # aligned


def test_scores_imports_without_torch() -> None:
    code = "import sys, imas_core.scores; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
