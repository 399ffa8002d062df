"""``method: supervised``: the labeled images alone (the SupOnly baseline and the warm-up epochs of other methods).

One student, no teacher; an epoch is one pass over the labeled set; the artifact is the student itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import ClassVar

from torch import Tensor, nn

from imas_train.config import LossConfig
from imas_train.losses import cross_entropy, ohem_cross_entropy
from imas_train.methods.base import Autocast, Batch, Method, StepContext, StepResult

__all__ = ["SupervisedMethod", "labeled_loss", "supervised_loss", "supervised_step"]


def supervised_loss(logits: Tensor, target: Tensor, loss: LossConfig) -> Tensor:
    """OHEM or plain cross-entropy (docs/algorithm.md §6.1), in float32."""
    if loss.supervised == "ohem":
        return ohem_cross_entropy(logits, target, thresh=loss.ohem_thresh, min_kept=loss.ohem_min_kept)
    return cross_entropy(logits, target)


def labeled_loss(logits_l: Tensor, logits_aux: Tensor | None, label: Tensor, loss: LossConfig) -> Tensor:
    """L_x on the labeled slice: main loss + aux_weight x the same loss on the aux logits of that slice."""
    loss_x = supervised_loss(logits_l, label, loss)
    if logits_aux is not None:
        loss_x = loss_x + loss.aux_weight * supervised_loss(logits_aux[: label.shape[0]], label, loss)
    return loss_x


def supervised_step(
    student: nn.Module,
    batch_l: Batch,
    *,
    loss: LossConfig,
    autocast: Autocast = nullcontext,
) -> dict[str, Tensor]:
    """L_x only: one train-mode forward of the labeled batch.

    Args:
        student: a `StudentForward` (possibly prepared by Accelerate), in train mode.
        batch_l: {"image": (B, 3, H, W) normalised, "label": (B, H, W)} on the student's device.
        loss: the supervised loss settings.
        autocast: context manager for the forward (``accelerator.autocast``).

    Returns:
        {"loss": total with grad, "loss_x": detached}.
    """
    with autocast():
        logits_l, logits_aux = student(batch_l["image"])
    loss_x = labeled_loss(logits_l, logits_aux, batch_l["label"], loss)
    return {"loss": loss_x, "loss_x": loss_x.detach()}


class SupervisedMethod(Method):
    """Cross-entropy (or OHEM) on the labeled stream; the student is evaluated and exported."""

    name: ClassVar[str] = "supervised"
    uses_unlabeled: ClassVar[bool] = False
    log_keys: ClassVar[tuple[str, ...]] = ("loss", "loss_x")

    def step(self, forwards: Mapping[str, nn.Module], batches: Mapping[str, Batch], ctx: StepContext) -> StepResult:
        out = supervised_step(forwards["student"], batches["labeled"], loss=self.cfg.loss, autocast=ctx.autocast)
        return StepResult(loss=out["loss"], logs={"loss": out["loss"].detach(), "loss_x": out["loss_x"]})
