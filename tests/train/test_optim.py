"""Poly LR schedule, parameter groups and LR scaling rules (docs/algorithm.md §3 step 0, §7)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from imas_train.optim import param_groups, poly_lr, scaled_lr, set_lrs


class _TwoPart(nn.Module):
    def __init__(self, head_includes_backbone: bool = False, skip_extra: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)
        self.extra = nn.Linear(2, 2)
        self._head_includes_backbone = head_includes_backbone
        self._skip_extra = skip_extra

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.head.parameters()
        if not self._skip_extra:
            yield from self.extra.parameters()
        if self._head_includes_backbone:
            yield from self.backbone.parameters()


def test_poly_lr_values() -> None:
    assert poly_lr(0, 1000, 0.01) == 0.01
    assert poly_lr(500, 1000, 0.01) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(999, 1000, 0.01, power=1.0) == pytest.approx(1e-5)
    assert poly_lr(1000, 1000, 0.01) == 0.0
    assert poly_lr(2000, 1000, 0.01) == 0.0


def test_param_groups_and_set_lrs() -> None:
    model = _TwoPart()
    groups = param_groups(model, lr=0.001, head_lr_mult=10, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["base_lr"] == 0.001 and groups[1]["base_lr"] == pytest.approx(0.01)
    assert all(g["weight_decay"] == 1e-4 for g in groups)  # BN and biases included
    assert len(groups[0]["params"]) == 4 and len(groups[1]["params"]) == 4
    optimizer = torch.optim.SGD(groups, lr=0.001, momentum=0.9)
    set_lrs(optimizer, 250, 1000, power=0.9)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * 0.75**0.9)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.01 * 0.75**0.9)
    set_lrs(optimizer, 0, 1000, power=0.9)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.01)


def test_param_groups_reject_overlap_and_gaps() -> None:
    with pytest.raises(ValueError, match="both"):
        param_groups(_TwoPart(head_includes_backbone=True), 0.01, 1.0, 5e-4)
    with pytest.raises(ValueError, match="neither"):
        param_groups(_TwoPart(skip_extra=True), 0.01, 1.0, 5e-4)


def test_scaled_lr_rules() -> None:
    assert scaled_lr(0.01, 32) == 0.01
    assert scaled_lr(0.01, 32, rule="linear") == pytest.approx(0.02)
    assert scaled_lr(0.01, 32, rule="sqrt") == pytest.approx(0.01 * math.sqrt(2))
    assert scaled_lr(0.01, 8, reference_batch=16, rule="linear") == pytest.approx(0.005)
    with pytest.raises(ValueError):
        scaled_lr(0.01, 16, rule="cubic")  # type: ignore[arg-type]
