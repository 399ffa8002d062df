"""The iMAS method as pure tensor functions (docs/algorithm.md §2, §3 steps 3-8, §6.2).

Glossary (docs/algorithm.md §1):

* Suffixes: ``_l`` labeled, ``_u`` unlabeled, ``_w`` weak view, ``_s`` strong-intensity view (or *student* when it
  follows ``conf``/``labels``/``ratio``), ``_t`` teacher, ``_cm`` CutMix branch, ``_mix`` intensity-mixed branch.
* ``logits_*``: raw network outputs, (B, C, H, W).
* ``conf_*``: maximum softmax probability per pixel, (B, H, W), float32.
* ``labels_*`` / ``pseudo_*``: argmax label maps, (B, H, W), int64. The pseudo-labels and their confidences
  (``pseudo_label``, ``pseudo_conf``) always come from the **teacher**.
* ``ratio_*``: confident ratio rho = mean over pixels of 1[conf >= threshold], (B,).
* ``easiness``: e = 1 - gamma, (B,), in [0, 1], large for *easy* images (teacher and student agree confidently).
  The paper's "hardness" gamma is never stored; the reference code's ``hardness`` variables hold e
  (docs/algorithm.md §0).
* ``partners``: (B,) int64; image i receives CutMix content from image ``partners[i]``.

The CutMix box and the paste live in `imas_train.mixing` with the other methods' mixing blocks.

Every random draw comes from an explicit CPU ``torch.Generator``; nothing here reads global RNG state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from imas_core.constants import IGNORE_INDEX

__all__ = [
    "class_weighted_iou",
    "confidence_and_labels",
    "confident_ratio",
    "easiness",
    "easiness_from_predictions",
    "hard_easy_partners",
    "unsupervised_loss",
    "unsupervised_total",
    "intensity_mix",
    "cutmix_fires",
]


# ---------------------------------------------------------------------------------------------------------------
# Easiness (§2)


@torch.no_grad()
def class_weighted_iou(pred: Tensor, ref: Tensor, num_classes: int, ignore_class0: bool = True) -> Tensor:
    """Per-instance IoU averaged over classes with weights from the class frequencies of `ref` (docs/algorithm.md §2).

    IoU_c = M_cc / (|ref == c| + |pred == c| - M_cc) is symmetric; only the weights n_c / sum_k n_k, where n_c is the
    number of class-c pixels in `ref`, depend on which map is the reference. With `ignore_class0`, n_0 = 0. When every
    weight is zero (e.g. `ref` is all class 0 and the exclusion is on) the result is exactly 0, never NaN.

    Args:
        pred: (B, H, W) integer label map in [0, num_classes).
        ref: (B, H, W) integer label map in [0, num_classes); supplies the weights.
        num_classes: C.
        ignore_class0: drop class 0 from the weights.

    Returns:
        (B,) float32 on the inputs' device. Counts are integers, IoUs and weights float64 (one batched bincount).
    """
    if pred.shape != ref.shape or pred.dim() != 3:
        raise ValueError(f"pred and ref must both be (B, H, W); got {tuple(pred.shape)} and {tuple(ref.shape)}")
    return _weighted_iou(_confusion(pred, ref, num_classes), ignore_class0)


def _confusion(pred: Tensor, ref: Tensor, num_classes: int) -> Tensor:
    """(B, C, C) float64 confusion matrices, rows = ref, cols = pred, from one batched bincount."""
    b, k = pred.shape[0], num_classes
    offsets = torch.arange(b, device=pred.device).view(b, 1) * (k * k)
    index = offsets + ref.flatten(1).long() * k + pred.flatten(1).long()
    return torch.bincount(index.flatten(), minlength=b * k * k).view(b, k, k).double()


def _weighted_iou(cm: Tensor, ignore_class0: bool) -> Tensor:
    """wIoU of (B, C, C) confusion matrices (rows = the reference that supplies the weights) -> (B,) float32."""
    inter = cm.diagonal(dim1=1, dim2=2)
    n_ref, n_pred = cm.sum(2), cm.sum(1)
    union = n_ref + n_pred - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    if ignore_class0:
        n_ref = torch.cat([torch.zeros_like(n_ref[:, :1]), n_ref[:, 1:]], dim=1)
    total = n_ref.sum(1, keepdim=True)
    weights = torch.where(total > 0, n_ref / total.clamp_min(1), torch.zeros_like(n_ref))
    return (weights * iou).sum(1).float()


@torch.no_grad()
def confidence_and_labels(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Max softmax probability and argmax of (B, C, H, W) logits, softmax in float32.

    Returns:
        conf (B, H, W) float32 and labels (B, H, W) int64. Used once for the teacher, giving the pseudo-labels.
    """
    conf, labels = logits.float().softmax(dim=1).max(dim=1)
    return conf, labels


def confident_ratio(conf: Tensor, threshold: float) -> Tensor:
    """rho: the fraction of pixels with conf >= threshold (note >=), per image. (B, H, W) -> (B,) float32."""
    return (conf >= threshold).float().mean(dim=(1, 2))


@torch.no_grad()
def easiness_from_predictions(
    labels_s: Tensor,
    conf_s: Tensor,
    labels_t: Tensor,
    conf_t: Tensor,
    threshold: float,
    num_classes: int,
    ignore_class0: bool = True,
) -> Tensor:
    """e = 1/2 [wIoU(pred=labels_s, ref=labels_t) * rho_t + wIoU(pred=labels_t, ref=labels_s) * rho_s].

    Each model's confident ratio multiplies the wIoU weighted by that model's own class frequencies (the reference's
    ``hardness_v1``; paper Eq. 7 with gamma = 1 - e).

    Args:
        labels_s, conf_s: student argmax and max-probability maps, (B, H, W).
        labels_t, conf_t: teacher argmax and max-probability maps, (B, H, W).
        threshold: tau.
        num_classes: C.
        ignore_class0: drop class 0 from the wIoU weights.

    Returns:
        (B,) float32 easiness in [0, 1].
    """
    ratio_s = confident_ratio(conf_s, threshold)
    ratio_t = confident_ratio(conf_t, threshold)
    if labels_s.shape != labels_t.shape or labels_s.dim() != 3:
        raise ValueError(f"label maps must both be (B, H, W); got {tuple(labels_s.shape)}, {tuple(labels_t.shape)}")
    cm = _confusion(labels_s, labels_t, num_classes)  # rows = teacher; its transpose has rows = student
    wiou_ref_t = _weighted_iou(cm, ignore_class0)
    wiou_ref_s = _weighted_iou(cm.transpose(1, 2), ignore_class0)
    return 0.5 * (wiou_ref_t * ratio_t + wiou_ref_s * ratio_s)  # large = easy; paper gamma = 1 - e


@torch.no_grad()
def easiness(student_logits: Tensor, teacher_logits: Tensor, threshold: float, ignore_class0: bool = True) -> Tensor:
    """Easiness e of each unlabeled image from the student's and teacher's logits on the weak view (§2).

    Args:
        student_logits: (B, C, H, W), from the eval-mode no-grad student forward.
        teacher_logits: (B, C, H, W), same shape.
        threshold: tau; pixels with max probability >= tau count as confident.
        ignore_class0: drop class 0 from the wIoU weights.

    Returns:
        (B,) float32 in [0, 1] on the logits' device. An identical student and teacher give e = rho, not 1.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 4:
        raise ValueError(
            f"logits must both be (B, C, H, W); got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    conf_s, labels_s = confidence_and_labels(student_logits)
    conf_t, labels_t = confidence_and_labels(teacher_logits)
    num_classes = student_logits.shape[1]
    return easiness_from_predictions(labels_s, conf_s, labels_t, conf_t, threshold, num_classes, ignore_class0)


# ---------------------------------------------------------------------------------------------------------------
# CutMix pairing (§3 step 5)


@torch.no_grad()
def hard_easy_partners(easiness: Tensor) -> Tensor:
    """Pair the hardest image with the easiest, the second hardest with the second easiest, and so on.

    Stable ascending sort: partner[order[k]] = order[B-1-k]. The result is an involution (each pair swaps
    regions); with odd B the median image pairs with itself; B = 2 is a swap.

    Args:
        easiness: (B,) easiness values.

    Returns:
        (B,) int64 on the same device.
    """
    if easiness.dim() != 1:
        raise ValueError(f"easiness must be (B,), got {tuple(easiness.shape)}")
    order = torch.sort(easiness, stable=True).indices
    partners = torch.empty_like(order)
    partners[order] = order.flip(0)
    return partners


def cutmix_fires(easiness_mean: float, generator: torch.Generator) -> bool:
    """Adaptive trigger: one U(0, 1) draw per process per iteration; CutMix fires if it is < the mean easiness.

    Pass the per-process mean (a Python float); with the non-adaptive ablation pass the fixed probability instead.
    """
    return bool(torch.rand((), generator=generator, dtype=torch.float64).item() < easiness_mean)


# ---------------------------------------------------------------------------------------------------------------
# Intensity view and unsupervised loss (§3 step 4, §6.2)


def intensity_mix(image_s: Tensor, image_w: Tensor, easiness: Tensor) -> Tensor:
    """Adaptive intensity view: e_i * u_s + (1 - e_i) * u_w per instance, on normalised tensors.

    Args:
        image_s: (B, 3, H, W) strong-intensity view.
        image_w: (B, 3, H, W) weak view, pixel-aligned with `image_s`.
        easiness: (B,) in [0, 1].

    Returns:
        (B, 3, H, W) in the images' dtype; e = 0 gives exactly the weak view, e = 1 exactly the strong view.
    """
    if image_s.shape != image_w.shape:
        raise ValueError(f"image_s {tuple(image_s.shape)} and image_w {tuple(image_w.shape)} differ")
    weight = easiness.detach().to(device=image_w.device, dtype=image_w.dtype).view(-1, 1, 1, 1)
    return torch.lerp(image_w, image_s, weight.expand_as(image_w))


def unsupervised_loss(
    student_logits: Tensor,
    pseudo_label: Tensor,
    pseudo_conf: Tensor,
    threshold: float,
    weight: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """l = (1/B) sum_i w_i (1/(H W)) sum_j 1[conf_ij >= tau] CE(s_ij, y_ij)  (docs/algorithm.md §6.2).

    The normaliser is all H*W pixels: masked pixels count as zeros, not as ignored.

    Args:
        student_logits: (B, C, H, W); cross-entropy is computed in float32.
        pseudo_label: (B, H, W) int64 teacher pseudo-labels (255 is treated as masked, should it ever appear).
        pseudo_conf: (B, H, W) teacher confidences.
        threshold: tau (comparison >=).
        weight: (B,) per-image weight, the easiness e_i; None = 1. Detached (a constant).
        valid: optional (B, H, W) bool mask that also masks pixels (``imas.ignore_padding_in_unsup``); the
            normaliser stays H*W.

    Returns:
        Scalar float32 loss.
    """
    b, _, h, w = student_logits.shape
    ce = F.cross_entropy(student_logits.float(), pseudo_label, ignore_index=IGNORE_INDEX, reduction="none")
    mask = pseudo_conf >= threshold
    if valid is not None:
        mask = mask & valid
    per_image = (ce * mask).sum(dim=(1, 2)) / (h * w)
    if weight is not None:
        per_image = per_image * weight.detach().to(per_image.dtype)
    return per_image.sum() / b


def unsupervised_total(loss_mix: Tensor, loss_cm: Tensor | None) -> Tensor:
    """L_u = (L_I + L_C) / 2 when CutMix fired (loss_cm given), else L_I at full weight, not halved."""
    return loss_mix if loss_cm is None else 0.5 * (loss_mix + loss_cm)
