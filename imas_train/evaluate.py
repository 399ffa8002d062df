"""Validation during training: sliding-window prediction, per-image counts gathered across processes, mIoU.

`evaluate` returns an `EvalResult` and writes nothing; the epoch-end phase of the training loop decides what to
record and save (the best model, plots).

Every val image is scored exactly once on any number of processes (docs/algorithm.md §10, "Val sampling"): the val
loader is prepared by Accelerate, which pads the last round of batches with duplicates so all processes take part;
``gather_for_metrics`` drops those duplicates again. Counts are gathered per image as (B, C) rows and summed only
afterwards, which is what makes the duplicate removal possible.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from imas_core.scores import miou as reduce_miou
from imas_train.augment import normalise_images
from imas_train.metrics import intersection_union
from imas_train.sliding_window import EvalProtocol, predict_sliding

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Scores of one evaluation, identical on every process.

    Attributes:
        miou: mean IoU over the classes with a non-empty union, in [0, 1].
        per_class: (C,) float64 IoU, NaN for classes absent from both prediction and ground truth.
        inter, union: (C,) int64 counts summed over the val set.
        indices: dataset index of every scored image, sorted (each exactly once).
    """

    miou: float
    per_class: np.ndarray
    inter: np.ndarray
    union: np.ndarray
    indices: list[int]

    @property
    def num_images(self) -> int:
        return len(self.indices)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    accelerator: Accelerator,
    *,
    num_classes: int,
    window: int,
    stride: int | None,
    protocol: EvalProtocol,
) -> EvalResult:
    """Score `model` on the (prepared) val loader; every process must call this.

    Args:
        model: an unwrapped segmentation model (logits at input size); put in eval mode for the call and restored.
        loader: the val loader prepared by `accelerator` (uint8 images on the device, padded duplicates marked).
        accelerator: gathers the per-image counts and supplies autocast.
        num_classes: C.
        window, stride, protocol: the sliding-window settings (``eval.*``).

    Returns:
        The scores, reduced over all processes.
    """
    was_training = model.training
    model.eval()
    inter_sum = torch.zeros(num_classes, dtype=torch.int64)
    union_sum = torch.zeros(num_classes, dtype=torch.int64)
    indices: list[int] = []
    try:
        for batch in loader:
            with accelerator.autocast():
                image = normalise_images(batch["image"])
                probs = predict_sliding(model, image, num_classes, window, stride, protocol)
            inter, union = intersection_union(probs.argmax(dim=1), batch["label"], num_classes)
            inter, union, index = accelerator.gather_for_metrics((inter, union, batch["index"]))
            inter_sum += inter.sum(dim=0).cpu()
            union_sum += union.sum(dim=0).cpu()
            indices.extend(int(i) for i in index.cpu())
    finally:
        model.train(was_training)
    miou, per_class = reduce_miou(inter_sum.numpy(), union_sum.numpy())
    return EvalResult(miou, per_class, inter_sum.numpy(), union_sum.numpy(), sorted(indices))
