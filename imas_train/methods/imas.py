"""``method: imas``: iMAS, a mean teacher whose per-image easiness drives augmentation, CutMix and loss weights.

One iteration (docs/algorithm.md §3 steps 3-8) is composed from the pure functions of `imas_train.imas` and
`imas_train.mixing`; `ImasMethod` adds the EMA teacher (decay 0 throughout the supervised-only epochs and epoch 0,
then min(1 - 1/(i + 1), alpha); buffers EMA'd; teacher in eval mode), the L_x-only warm-up epochs
(``imas.sup_only_epochs``), and the per-image easiness records.

Vocabulary (docs/algorithm.md §1): ``_l`` labeled, ``_u`` unlabeled, ``_w`` weak, ``_s`` strong or student, ``_t``
teacher, ``_cm`` CutMix branch, ``_mix`` intensity-mixed branch; ``easiness`` is e = 1 - gamma (large = easy).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from contextlib import nullcontext
from typing import ClassVar

import torch
from torch import Tensor, nn

from imas_core.errors import ConfigError
from imas_train.config import ImasConfig, LossConfig, TrainConfig
from imas_train.ema import EmaTeacher, ema_decay
from imas_train.imas import (
    confidence_and_labels,
    confident_ratio,
    cutmix_fires,
    easiness_from_predictions,
    hard_easy_partners,
    intensity_mix,
    unsupervised_loss,
    unsupervised_total,
)
from imas_train.methods.base import Autocast, Batch, Method, StepContext, StepResult, broadcast_buffers
from imas_train.methods.supervised import labeled_loss, supervised_step
from imas_train.mixing import box_mask, paste_cutmix, random_partners, sample_cutmix_boxes

__all__ = ["ImasMethod", "imas_step"]


@torch.no_grad()
def _easiness_pass(
    student: nn.Module, teacher: nn.Module, image_w: Tensor, imas: ImasConfig, autocast: Autocast
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 3: eval-mode no-grad forwards of u_w; returns easiness, student ratio, teacher labels and confidences."""
    student.eval()
    try:
        with autocast():
            logits_s, _ = student(image_w, with_aux=False)
            logits_t = teacher(image_w)
    finally:
        student.train()
    conf_s, labels_s = confidence_and_labels(logits_s)  # fp32 softmax
    conf_t, labels_t = confidence_and_labels(logits_t)
    easiness = easiness_from_predictions(
        labels_s, conf_s, labels_t, conf_t, imas.tau, logits_s.shape[1], imas.ignore_class0
    )
    return easiness, confident_ratio(conf_s, imas.tau), labels_t, conf_t


def imas_step(
    student: nn.Module,
    teacher: nn.Module,
    batch_l: dict[str, Tensor],
    batch_u: dict[str, Tensor],
    *,
    imas: ImasConfig,
    loss: LossConfig,
    generator: torch.Generator,
    aux_labeled_only: bool,
    autocast: Autocast = nullcontext,
) -> dict[str, Tensor]:
    """Forward and losses of one iMAS iteration (docs/algorithm.md §3 steps 3-8); no backward, no optimizer step.

    Args:
        student: a `StudentForward` (possibly prepared), in train mode; left in train mode.
        teacher: the plain EMA teacher module, in eval mode; only read.
        batch_l: {"image": (B, 3, H, W), "label": (B, H, W)} on the device.
        batch_u: {"image_w", "image_s": (B, 3, H, W) pixel-aligned, "valid": (B, H, W) bool, "index": (B,)}.
        imas: method settings and ablation switches.
        loss: supervised loss settings.
        generator: this iteration's CPU generator (`step_generator`): the trigger draw, then boxes and partners.
        aux_labeled_only: run the aux head on the labeled slice only (``model.aux_labeled_only``).
        autocast: context manager for every forward (``accelerator.autocast``); losses stay float32.

    Returns:
        "loss" (scalar with grad: L_x + lambda_u L_u) and detached "loss_x", "loss_u", "loss_mix", "loss_cm" (only
        when CutMix fired), "easiness" (B,), "ratio_s" (B,) student confident ratio, "index" (B,) dataset indices of
        the unlabeled images, "cutmix_fired" (0-d float, 0 or 1).
    """
    image_l, label_l = batch_l["image"], batch_l["label"]
    image_w, image_s = batch_u["image_w"], batch_u["image_s"]
    b, _, h, w = image_w.shape

    # 3. easiness from eval-mode no-grad forwards; pseudo-labels and confidences from the TEACHER
    easiness, ratio_s, pseudo_u, conf_u = _easiness_pass(student, teacher, image_w, imas, autocast)
    weight = easiness if imas.adaptive_loss_weight else None
    valid = batch_u["valid"] if imas.ignore_padding_in_unsup else None

    # 4. adaptive intensity view on normalised tensors
    image_mix = intensity_mix(image_s, image_w, easiness) if imas.adaptive_intensity else image_s

    # 5. adaptive CutMix on the WEAK images: one trigger draw per process and iteration
    fire_prob = float(easiness.mean()) if imas.adaptive_cutmix_trigger else imas.cutmix_fixed_prob
    fired = cutmix_fires(fire_prob, generator)
    parts = [image_l] + ([image_w] if imas.forward_unused_weak else [])
    if fired:
        boxes = sample_cutmix_boxes(b, h, w, imas.cutmix_side_range, generator)
        if imas.adaptive_cutmix_pairing:
            partners = hard_easy_partners(easiness)
        else:
            partners = random_partners(b, generator, image_w.device)
        image_cm, pseudo_cm, conf_cm = paste_cutmix(image_w, pseudo_u, conf_u, boxes, partners)
        valid_cm = None
        if valid is not None:
            valid_cm = torch.where(box_mask(boxes.to(valid.device), h, w), valid[partners.to(valid.device)], valid)
        parts.append(image_cm)
    parts.append(image_mix)

    # 6. ONE train-mode student forward: [x; u_w; u_cm; u_mix] (4B) or [x; u_w; u_mix] (3B)
    with autocast():
        logits, logits_aux = student(torch.cat(parts), aux_batch=b if aux_labeled_only else None)
    logits_l, logits_mix = logits[:b], logits[-b:]

    # 7. supervised loss on the labeled slice (aux on that slice too)
    loss_x = labeled_loss(logits_l, logits_aux, label_l, loss)

    # 8. unsupervised loss, weighted by the receiver's e_i; 1/2 over the two branches only when CutMix fired
    loss_mix = unsupervised_loss(logits_mix, pseudo_u, conf_u, imas.tau, weight, valid)
    loss_cm = None
    if fired:
        logits_cm = logits[-2 * b : -b]
        loss_cm = unsupervised_loss(logits_cm, pseudo_cm, conf_cm, imas.tau, weight, valid_cm)
    loss_u = unsupervised_total(loss_mix, loss_cm)
    total = loss_x + imas.unsup_weight * loss_u

    out = {
        "loss": total,
        "loss_x": loss_x.detach(),
        "loss_u": loss_u.detach(),
        "loss_mix": loss_mix.detach(),
        "easiness": easiness,
        "ratio_s": ratio_s,
        "index": batch_u["index"],
        "cutmix_fired": torch.tensor(float(fired)),
    }
    if loss_cm is not None:
        out["loss_cm"] = loss_cm.detach()
    return out


class ImasMethod(Method):
    """iMAS (docs/algorithm.md): student + EMA teacher; the teacher is evaluated first, model-selected and exported."""

    name: ClassVar[str] = "imas"
    uses_unlabeled: ClassVar[bool] = True
    log_keys: ClassVar[tuple[str, ...]] = (
        "loss", "loss_x", "loss_u", "loss_mix", "loss_cm", "easiness_mean", "ratio_s", "cutmix_rate",
    )  # fmt: skip

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if cfg.imas is None:
            raise ConfigError("method 'imas' needs an imas: section in the config (at least imas.tau)")
        self.imas: ImasConfig = cfg.imas
        self.ema: EmaTeacher | None = None

    @property
    def teacher(self) -> EmaTeacher:
        if self.ema is None:
            raise RuntimeError("setup_teachers has not run")
        return self.ema

    def setup_teachers(self, networks: Mapping[str, nn.Module], device: torch.device) -> None:
        self.ema = EmaTeacher(copy.deepcopy(networks["student"]).to(device))

    def warmup(self, epoch: int) -> bool:
        """Epochs of L_x only (``imas.sup_only_epochs``): no unlabeled stream, no easiness records."""
        return epoch < self.imas.sup_only_epochs

    def streams(self, epoch: int) -> tuple[str, ...]:
        return ("labeled",) if self.warmup(epoch) else ("labeled", "unlabeled")

    def step(self, forwards: Mapping[str, nn.Module], batches: Mapping[str, Batch], ctx: StepContext) -> StepResult:
        student = forwards["student"]
        if self.warmup(ctx.epoch):
            out = supervised_step(student, batches["labeled"], loss=self.cfg.loss, autocast=ctx.autocast)
            return StepResult(loss=out["loss"], logs={"loss": out["loss"].detach(), "loss_x": out["loss_x"]})
        out = imas_step(
            student,
            self.teacher.module,
            batches["labeled"],
            batches["unlabeled"],
            imas=self.imas,
            loss=self.cfg.loss,
            generator=ctx.generator,
            aux_labeled_only=self.cfg.model.aux_labeled_only,
            autocast=ctx.autocast,
        )
        fired = out["cutmix_fired"].to(out["loss"].device)
        logs = {k: out[k] for k in ("loss_x", "loss_u", "loss_mix", "loss_cm") if k in out}
        logs.update(loss=out["loss"].detach(), easiness_mean=out["easiness"].mean(),
                    ratio_s=out["ratio_s"].mean(), cutmix_rate=fired)  # fmt: skip
        per_image = {"easiness": out["easiness"], "index": out["index"], "ratio_s": out["ratio_s"],
                     "cutmix_fired": fired.expand_as(out["easiness"])}  # fmt: skip
        return StepResult(loss=out["loss"], logs=logs, per_image=per_image)

    def after_optimizer_step(self, networks: Mapping[str, nn.Module], ctx: StepContext) -> None:
        decay = ema_decay(ctx.step, ctx.iters_per_epoch, self.imas.sup_only_epochs, self.imas.ema_decay)
        self.teacher.update(networks["student"], decay)
        if ctx.world_size > 1 and ctx.device.type != "cuda":
            broadcast_buffers(self.teacher.module)  # per-process BN statistics: every rank keeps rank 0's

    def eval_models(self, networks: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        models: dict[str, nn.Module] = {"teacher": self.teacher.module}
        if self.cfg.eval.student:
            models["student"] = networks["student"]
        return models

    def artifact(self, networks: Mapping[str, nn.Module]) -> tuple[str, nn.Module]:
        return "ema_teacher", self.teacher.module

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"ema_teacher.{k}": v for k, v in self.teacher.state_dict().items()}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        prefix = "ema_teacher."
        unknown = sorted(k for k in tensors if not k.startswith(prefix))
        if unknown:
            raise ValueError(f"method 'imas' state has unknown tensors: {unknown[:5]}")
        self.teacher.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items()})
