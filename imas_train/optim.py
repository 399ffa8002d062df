"""SGD parameter groups and the per-iteration poly learning-rate schedule (docs/algorithm.md §3 step 0, §7)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, Protocol

from torch import nn
from torch.optim import Optimizer

__all__ = ["poly_lr", "param_groups", "set_lrs", "scaled_lr"]


class _TwoGroupModel(Protocol):
    def parameters(self, recurse: bool = True) -> Iterable[nn.Parameter]: ...
    def backbone_parameters(self) -> Iterable[nn.Parameter]: ...
    def head_parameters(self) -> Iterable[nn.Parameter]: ...


def poly_lr(step: int, total_steps: int, base_lr: float, power: float = 0.9) -> float:
    """lr = base_lr * (1 - step / total_steps) ** power; step 0 gives base_lr, step >= total_steps gives 0.

    The reference sets this *before* each optimizer step i, with total_steps = epochs * iters_per_epoch.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    frac = min(max(step, 0), total_steps) / total_steps
    return float(base_lr * (1.0 - frac) ** power)


def param_groups(model: _TwoGroupModel, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict[str, Any]]:
    """The two optimizer groups: "backbone" at `lr` and "head" (decoder + aux) at `lr * head_lr_mult`.

    Weight decay applies to every parameter, BN weights and biases included, as in the reference. Each group stores
    its "base_lr" so `set_lrs` can scale it.

    Raises:
        ValueError: if the two groups overlap or miss a trainable parameter of the model.
    """
    backbone = [p for p in model.backbone_parameters() if p.requires_grad]
    head = [p for p in model.head_parameters() if p.requires_grad]
    ids_b, ids_h = {id(p) for p in backbone}, {id(p) for p in head}
    if ids_b & ids_h:
        raise ValueError(f"{len(ids_b & ids_h)} parameters are in both the backbone and the head group")
    missing = [p for p in model.parameters() if p.requires_grad and id(p) not in ids_b | ids_h]
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters are in neither the backbone nor the head group")
    head_lr = lr * head_lr_mult
    return [
        {"name": "backbone", "params": backbone, "lr": lr, "base_lr": lr, "weight_decay": weight_decay},
        {"name": "head", "params": head, "lr": head_lr, "base_lr": head_lr, "weight_decay": weight_decay},
    ]


def set_lrs(optimizer: Optimizer, step: int, total_steps: int, power: float = 0.9) -> None:
    """Write poly_lr(step, total_steps, group["base_lr"], power) into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(step, total_steps, group["base_lr"], power)


def scaled_lr(
    base_lr: float,
    global_batch: int,
    reference_batch: int = 16,
    rule: Literal["none", "linear", "sqrt"] = "none",
) -> float:
    """Adapt a base LR tuned for `reference_batch` labeled images per step to another global batch.

    * ``none`` (default): return base_lr unchanged. The paper's values assume a global batch of 16 + 16 (§7), and the
      per-process batch is part of the algorithm, so match it instead of rescaling where you can.
    * ``linear``: base_lr * global_batch / reference_batch, the linear scaling rule of Goyal et al., "Accurate, Large
      Minibatch SGD" (2017).
    * ``sqrt``: base_lr * sqrt(global_batch / reference_batch), a gentler alternative.

    Both rescalings change the training math; record the rule with the run.
    """
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"batches must be >= 1, got global {global_batch}, reference {reference_batch}")
    ratio = global_batch / reference_batch
    rules = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}
    if rule not in rules:
        raise ValueError(f"rule must be one of {sorted(rules)}, got {rule!r}")
    return base_lr * rules[rule]
