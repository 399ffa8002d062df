"""A minimal method on the method interface, used only by tests (and shown in docs/design.md, "Methods").

Self-training without a teacher: L_x on the labeled batch plus cross-entropy of the student's strong view against
its own confident predictions on the weak view. It keeps a little JSON state (confident pixels seen so far) to show
that extra state survives a resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from imas_train.methods.base import Batch, Method, StepContext, StepResult
from imas_train.methods.supervised import labeled_loss


class SelfTraining(Method):
    name: ClassVar[str] = "self_training"
    uses_unlabeled: ClassVar[bool] = True
    log_keys: ClassVar[tuple[str, ...]] = ("loss", "loss_x", "loss_u", "confident")
    threshold: ClassVar[float] = 0.5

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.confident_pixels = 0

    def step(self, forwards: Mapping[str, nn.Module], batches: Mapping[str, Batch], ctx: StepContext) -> StepResult:
        student, batch_l, batch_u = forwards["student"], batches["labeled"], batches["unlabeled"]
        with torch.no_grad(), ctx.autocast():
            logits_w, _ = student(batch_u["image_w"], with_aux=False)
        conf, pseudo = logits_w.float().softmax(1).max(1)
        pseudo[conf < self.threshold] = 255
        b = batch_l["image"].shape[0]
        with ctx.autocast():
            logits, aux = student(torch.cat([batch_l["image"], batch_u["image_s"]]), aux_batch=b)
        loss_x = labeled_loss(logits[:b].float(), aux, batch_l["label"], self.cfg.loss)
        confident = (pseudo != 255).sum()
        loss_u = F.cross_entropy(logits[b:].float(), pseudo, ignore_index=255) if confident > 0 else logits.sum() * 0
        self.confident_pixels += int(confident)
        loss = loss_x + loss_u
        logs = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "confident": conf.mean()}
        return StepResult(loss=loss, logs=logs)

    def state(self) -> dict[str, Any]:
        return {"confident_pixels": self.confident_pixels}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.confident_pixels = int(state["confident_pixels"])
