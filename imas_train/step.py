"""One training iteration, composed from the pure functions of `imas_train.imas` (ALGORITHM.md §3 steps 1-8).

The loop in `imas_train.train` owns the schedule, the backward pass, the optimizer, the EMA and the logging; the
functions here own the math of one iteration and return every loss term plus the logging scalars.

Vocabulary (ALGORITHM.md §1): ``_l`` labeled, ``_u`` unlabeled, ``_w`` weak, ``_s`` strong or student, ``_t``
teacher, ``_cm`` CutMix branch, ``_mix`` intensity-mixed branch; ``easiness`` is e = 1 - gamma (large = easy).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import Tensor, nn

from imas_train.config import ImasConfig, LossConfig
from imas_train.imas import (
    box_mask,
    confidence_and_labels,
    confident_ratio,
    cutmix_fires,
    easiness_from_predictions,
    hard_easy_partners,
    intensity_mix,
    paste_cutmix,
    random_partners,
    sample_cutmix_boxes,
    unsupervised_loss,
    unsupervised_total,
)
from imas_train.losses import cross_entropy, ohem_cross_entropy

__all__ = [
    "LOSS_KEYS",
    "LossMeter",
    "StudentForward",
    "imas_step",
    "step_generator",
    "supervised_loss",
    "supervised_step",
]

Autocast = Callable[[], AbstractContextManager[object]]
LOSS_KEYS = ("loss", "loss_x", "loss_u", "loss_mix", "loss_cm")  # the loss terms a step may return


class StudentForward(nn.Module):
    """The module Accelerate prepares: one call returns ``(logits, logits_aux | None)``.

    The model's own ``forward`` returns logits only (STYLE.md rule 7); the training loss also needs the aux head,
    and DDP only synchronises gradients of calls that go through the wrapper's ``forward``. This adaptor exists
    for that reason only; it is never exported.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, aux_batch: int | None = None, with_aux: bool = True) -> tuple[Tensor, Tensor | None]:
        """Main logits and, with `with_aux`, aux logits on the first `aux_batch` images (None = all)."""
        if not with_aux:
            return self.model(x), None
        return self.model.forward_with_aux(x, aux_batch)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator of one iteration's draws (CutMix trigger, boxes, random partners).

    Seeded from (run seed, process rank, global iteration) only, so a resumed run reproduces every draw without
    saved RNG state, and ranks draw independently (ALGORITHM.md §10, "Seeding").
    """
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def supervised_loss(logits: Tensor, target: Tensor, loss: LossConfig) -> Tensor:
    """OHEM or plain cross-entropy (ALGORITHM.md §6.1), in float32."""
    if loss.supervised == "ohem":
        return ohem_cross_entropy(logits, target, thresh=loss.ohem_thresh, min_kept=loss.ohem_min_kept)
    return cross_entropy(logits, target)


def _loss_x(logits_l: Tensor, logits_aux: Tensor | None, label: Tensor, loss: LossConfig) -> Tensor:
    """L_x on the labeled slice: main loss + aux_weight x the same loss on the aux logits of that slice."""
    loss_x = supervised_loss(logits_l, label, loss)
    if logits_aux is not None:
        loss_x = loss_x + loss.aux_weight * supervised_loss(logits_aux[: label.shape[0]], label, loss)
    return loss_x


def supervised_step(
    student: nn.Module,
    batch_l: dict[str, Tensor],
    *,
    loss: LossConfig,
    aux_labeled_only: bool,
    autocast: Autocast = nullcontext,
) -> dict[str, Tensor]:
    """L_x only: the supervised warm-up epochs and ``method: supervised``.

    Args:
        student: a `StudentForward` (possibly prepared by Accelerate), in train mode.
        batch_l: {"image": (B, 3, H, W), "label": (B, H, W)} on the student's device.
        loss: the supervised loss settings.
        aux_labeled_only: irrelevant here (every image is labeled); kept for a uniform call.
        autocast: context manager for the forward (``accelerator.autocast``).

    Returns:
        {"loss": total with grad, "loss_x": detached}.
    """
    del aux_labeled_only
    with autocast():
        logits_l, logits_aux = student(batch_l["image"])
    loss_x = _loss_x(logits_l, logits_aux, batch_l["label"], loss)
    return {"loss": loss_x, "loss_x": loss_x.detach()}


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
    """Forward and losses of one iMAS iteration (ALGORITHM.md §3 steps 3-8); no backward, no optimizer step.

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
    loss_x = _loss_x(logits_l, logits_aux, label_l, loss)

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


class LossMeter:
    """Window sums of the logged scalars; `flush` averages each over the iterations (and processes) that have it."""

    _KEYS = (*LOSS_KEYS, "easiness_mean", "ratio_s", "cutmix_rate")
    _DENOM = {"loss": 0, "loss_x": 0, "loss_cm": 2}  # 0 every iteration, 1 iMAS iterations, 2 CutMix iterations

    def __init__(self) -> None:
        self.sums = torch.zeros(len(self._KEYS) + 3, dtype=torch.float64)  # + the three counts

    def add(self, out: dict[str, Tensor]) -> None:
        zero = out["loss"].new_zeros(())
        values = [out[k].detach().float() if k in out else zero for k in LOSS_KEYS]
        if "easiness" in out:
            fired = out["cutmix_fired"].to(zero.device)
            values += [out["easiness"].mean(), out["ratio_s"].mean(), fired, zero + 1, zero + 1, fired]
        else:
            values += [zero, zero, zero, zero + 1, zero, zero]
        self.sums += torch.stack(values).double().cpu()  # one host transfer per iteration

    def flush(self, reduce_sum: Callable[[Tensor], Tensor] = lambda t: t) -> dict[str, float]:
        """Window means; `reduce_sum` sums the window over processes (``accelerator.reduce(..., "sum")``)."""
        sums = reduce_sum(self.sums).cpu().tolist()
        self.sums.zero_()
        counts = sums[len(self._KEYS) :]
        return {
            k: sums[i] / counts[self._DENOM.get(k, 1)]
            for i, k in enumerate(self._KEYS)
            if counts[self._DENOM.get(k, 1)] > 0
        }
