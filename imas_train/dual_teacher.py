"""Pure functions of Dual Teacher (shared/methods/DualTeacher.md, cited as §N): the teacher switch, the EMA schedule,
the device colour operations of its strong view and of its post-CutMix augmentation, and its three losses.

Images are float tensors (B, 3, H, W) or (3, H, W). The colour operations follow torchvision's tensor semantics,
which the reference uses: brightness, contrast and saturation blend with black, the image's mean grey and its grey
image and clamp the result to [0, 1]; hue shifts H in HSV; grayscale is 0.2989 R + 0.587 G + 0.114 B, unclamped.
Applied to *normalised* images, as the reference does for its strong view (§2 item 2, §4 row 6), the clamps send
every below-mean intensity to 0, so the view lies in [0, 1]. Every random draw comes from an explicit CPU
``torch.Generator`` in the order each docstring states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from imas_core.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "JitterDraw",
    "active_teacher",
    "uses_cutmix",
    "ema_decay_in_epoch",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "to_grayscale",
    "sample_jitter",
    "apply_jitter",
    "strong_view",
    "gaussian_blur",
    "post_mix_augment",
    "quantise_conf",
    "cutmix_image_weights",
    "cutmix_loss",
    "classmix_weight",
    "classmix_loss",
    "consistency_loss",
]

STRONG_JITTER = ((0.5, 1.5), (0.5, 1.5), (0.5, 1.5), (-0.25, 0.25))  # ColorJitter(0.5, 0.5, 0.5, 0.25), §2 item 2
POST_MIX_JITTER = ((0.75, 1.25), (0.75, 1.25), (0.75, 1.25), (-0.25, 0.25))  # §2 item 3c
_GREY = (0.2989, 0.587, 0.114)


# ---------------------------------------------------------------------------------------------------------------
# Schedule


def active_teacher(epoch: int) -> int:
    """The teacher of epoch `epoch`: 1 in even epochs (with CutMix), 2 in odd epochs (with ClassMix) (§2, §7.1)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return 1 if epoch % 2 == 0 else 2


def uses_cutmix(epoch: int) -> bool:
    """CutMix in even epochs, ClassMix in odd ones (§2 "Epoch setup")."""
    return active_teacher(epoch) == 1


def ema_decay_in_epoch(i: int, cap: float = 0.99) -> float:
    """alpha_i = min(1 - 1/(i + 1), cap) with i the iteration WITHIN the epoch (§2 item 7, §7.2).

    alpha_0 = 0: after the first step of its epoch the active teacher is a copy of the student (its restart).
    """
    if i < 0:
        raise ValueError(f"the iteration within the epoch must be >= 0, got {i}")
    return min(1.0 - 1.0 / (i + 1), cap)


# ---------------------------------------------------------------------------------------------------------------
# Colour operations (torchvision tensor semantics)


def _grey(img: Tensor) -> Tensor:
    r, g, b = img.unbind(dim=-3)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(-3)


def _blend(img: Tensor, other: Tensor, factor: float) -> Tensor:
    return (factor * img + (1.0 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(img: Tensor, factor: float) -> Tensor:
    """factor·img, clamped to [0, 1]."""
    return _blend(img, torch.zeros_like(img), factor)


def adjust_contrast(img: Tensor, factor: float) -> Tensor:
    """Blend with the mean grey level of each image, clamped to [0, 1]."""
    mean = _grey(img).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(img, mean, factor)


def adjust_saturation(img: Tensor, factor: float) -> Tensor:
    """Blend with the image's grey version, clamped to [0, 1]."""
    return _blend(img, _grey(img), factor)


def to_grayscale(img: Tensor) -> Tensor:
    """0.2989 R + 0.587 G + 0.114 B, replicated to 3 channels (no clamp)."""
    grey = _grey(img)
    return grey.expand_as(img).contiguous()


def _rgb_to_hsv(img: Tensor) -> Tensor:
    r, g, b = img.unbind(dim=-3)
    maxc, minc = img.max(dim=-3).values, img.min(dim=-3).values
    chroma = maxc - minc
    flat = chroma == 0
    sat = chroma / torch.where(flat | (maxc == 0), torch.ones_like(maxc), maxc)
    div = torch.where(flat, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    hue = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return torch.stack([hue, sat, maxc], dim=-3)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    h, s, v = hsv.unbind(dim=-3)
    sector = torch.floor(h * 6.0)
    frac = h * 6.0 - sector
    sector = sector.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * frac)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - frac))).clamp(0.0, 1.0)
    table = (  # (r, g, b) per sector
        (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q),
    )  # fmt: skip
    out = torch.zeros_like(hsv)
    for k, (r, g, b) in enumerate(table):
        here = (sector == k).unsqueeze(-3)
        out = torch.where(here, torch.stack([r, g, b], dim=-3), out)
    return out


def adjust_hue(img: Tensor, factor: float) -> Tensor:
    """Rotate the hue by `factor` (a fraction of the circle, in [-0.5, 0.5]) in HSV; p, q, t clamped to [0, 1]."""
    if not -0.5 <= factor <= 0.5:
        raise ValueError(f"hue factor must be in [-0.5, 0.5], got {factor}")
    hsv = _rgb_to_hsv(img)
    h, s, v = hsv.unbind(dim=-3)
    return _hsv_to_rgb(torch.stack([torch.fmod(h + factor + 1.0, 1.0), s, v], dim=-3))


@dataclass(frozen=True)
class JitterDraw:
    """One ColorJitter draw: (brightness, contrast, saturation, hue) factors and the order of the four ops."""

    factors: tuple[float, float, float, float]
    order: tuple[int, int, int, int]


def sample_jitter(generator: torch.Generator, ranges: tuple[tuple[float, float], ...] = STRONG_JITTER) -> JitterDraw:
    """Draw ColorJitter's factors, each uniform in its range, then a random order of the four ops.

    Draws: 4 float64 uniforms (brightness, contrast, saturation, hue), then ``randperm(4)``.
    """
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    b, c, s, h = (lo + (hi - lo) * x for (lo, hi), x in zip(ranges, u, strict=True))
    order = torch.randperm(4, generator=generator).tolist()
    return JitterDraw((b, c, s, h), (order[0], order[1], order[2], order[3]))


def apply_jitter(img: Tensor, draw: JitterDraw) -> Tensor:
    """The four ops in the drawn order (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for k in draw.order:
        img = ops[k](img, draw.factors[k])
    return img


def _stats(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(3, 1, 1)
    return mean, std


def strong_view(images: Tensor, generator: torch.Generator, *, space: str = "normalised") -> Tensor:
    """u_s = RandomGrayscale(0.2)(ColorJitter(0.5, 0.5, 0.5, 0.25)(u)), ONE draw for the whole batch (§2 item 2).

    Args:
        images: (B, 3, H, W) normalised images.
        generator: CPU generator. Draws: `sample_jitter`, then one float64 uniform (grayscale when < 0.2).
        space: ``normalised`` (faithful, §4 row 6): the ops run on the normalised tensor and clamp it, so the result
            lies in [0, 1] and is fed to the student as is; ``pixel``: de-normalise, jitter, re-normalise.

    Returns:
        (B, 3, H, W), a new tensor.
    """
    if space not in ("normalised", "pixel"):
        raise ValueError(f"space must be 'normalised' or 'pixel', got {space!r}")
    draw = sample_jitter(generator, STRONG_JITTER)
    gray = bool(torch.rand((), generator=generator, dtype=torch.float64).item() < 0.2)
    mean, std = _stats(images.device, images.dtype)
    out = images if space == "normalised" else (images * std + mean).clamp(0.0, 1.0)
    out = apply_jitter(out, draw)
    if gray:
        out = to_grayscale(out)
    return out if space == "normalised" else (out - mean) / std


def gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (3, H, W) or (B, 3, H, W): kernel radius ⌈3σ⌉, reflected borders."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    batched = img.dim() == 4
    x = img if batched else img.unsqueeze(0)
    radius = max(1, math.ceil(3.0 * sigma))
    radius = min(radius, x.shape[-2] - 1, x.shape[-1] - 1)
    if radius < 1:
        return img.clone()
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x if batched else x.squeeze(0)


def post_mix_augment(
    images: Tensor, labels: Tensor, confs: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-image augmentation after CutMix (§2 item 3c), on the device in [0, 1] pixel space.

    Per image: ColorJitter((0.75, 1.25) ×3, hue (−0.25, 0.25)) with p = 0.8; Gaussian blur σ ~ U(0.15, 1.15) with
    p = 0.5; horizontal flip with p = 0.5 of image, label and confidence together. Images are de-normalised and
    clamped to [0, 1] first and normalised again after.

    Draws, per image in batch order: jitter coin, `sample_jitter` (always drawn), blur coin, σ, flip coin (each coin a
    float64 uniform, firing when below its p; σ = 0.15 + U).

    Args:
        images: (B, 3, H, W) normalised mixed images.
        labels: (B, H, W) mixed pseudo-labels.
        confs: (B, H, W) confidences.
        generator: CPU generator.

    Returns:
        New (images, labels, confs).
    """
    mean, std = _stats(images.device, images.dtype)
    out_i, out_l, out_c = [], [], []
    for img, lab, conf in zip(images, labels, confs, strict=True):
        jitter = torch.rand((), generator=generator, dtype=torch.float64).item() < 0.8
        draw = sample_jitter(generator, POST_MIX_JITTER)
        blur = torch.rand((), generator=generator, dtype=torch.float64).item() < 0.5
        sigma = 0.15 + torch.rand((), generator=generator, dtype=torch.float64).item()
        flip = torch.rand((), generator=generator, dtype=torch.float64).item() < 0.5
        x = (img * std + mean).clamp(0.0, 1.0)
        if jitter:
            x = apply_jitter(x, draw)
        if blur:
            x = gaussian_blur(x, sigma)
        x = (x - mean) / std
        if flip:
            x, lab, conf = x.flip(-1), lab.flip(-1), conf.flip(-1)
        out_i.append(x)
        out_l.append(lab)
        out_c.append(conf)
    return torch.stack(out_i), torch.stack(out_l), torch.stack(out_c)


# ---------------------------------------------------------------------------------------------------------------
# Losses


def quantise_conf(conf: Tensor) -> Tensor:
    """The reference's 8-bit round trip of the confidence map: ⌊255·conf⌋ / 255 (§2 item 3c)."""
    return torch.floor(conf.float() * 255.0) / 255.0


def cutmix_image_weights(conf: Tensor, threshold: float) -> Tensor:
    """w_k = fraction of image k's pixels with conf ≥ threshold: (B, H, W) -> (B,) float32 (§2 item 3f)."""
    return (conf >= threshold).flatten(1).float().mean(dim=1)


def cutmix_loss(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """L_mix of a CutMix epoch: the mean over pixels with CE > 0 of w_k·CE (§2 item 3f; no per-pixel mask).

    Args:
        logits: (B, C, H, W) student logits on the mixed images.
        labels: (B, H, W) mixed pseudo-labels.
        weights: (B,) per-image weights (`cutmix_image_weights` of the receiving image's own confidence).

    Returns:
        Scalar float32 (0, still attached to the graph, when no pixel has CE > 0).
    """
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    keep = ce > 0
    weighted = ce * weights.to(ce.device).view(-1, 1, 1) * keep
    return weighted.sum() / keep.sum().clamp_min(1)


def classmix_weight(conf: Tensor, threshold: float) -> Tensor:
    """ω = fraction of ALL the batch's pixels with conf ≥ threshold, one scalar (§2 item 4g, §7.7)."""
    return (conf >= threshold).float().mean()


def classmix_loss(logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    """L_mix of a ClassMix epoch: ω · mean CE over all B·H·W pixels (§2 item 4g)."""
    return F.cross_entropy(logits.float(), labels) * weight


def consistency_loss(
    logits: Tensor, labels: Tensor, conf: Tensor, threshold: float, labeled_target: Tensor | None = None
) -> Tensor:
    """L_ic = Σ CE·mask / N between the stochastic-depth student on u_s and the teacher's labels (§2 item 5c).

    Args:
        logits: (B, C, H, W) student logits on the strong view.
        labels, conf: (B, H, W) the active teacher's argmax and confidence on u.
        threshold: the confidence threshold (0.95).
        labeled_target: faithful (§4 row 7): the LABELED batch's ground truth; mask = (conf ≥ threshold) ∧
            (labeled_target ≠ 255) and N = #(labeled_target ≠ 255). None: mask = conf ≥ threshold, N = B·H·W.

    Returns:
        Scalar float32 (0, attached to the graph, when N = 0).
    """
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    mask = conf >= threshold
    if labeled_target is None:
        count = torch.tensor(float(mask.numel()), device=ce.device)
    else:
        if labeled_target.shape != mask.shape:
            raise ValueError(
                f"the labeled batch's target {tuple(labeled_target.shape)} must match the unlabeled batch "
                f"{tuple(mask.shape)} (same batch size and crop) for the faithful consistency mask"
            )
        valid = labeled_target.to(mask.device) != IGNORE_INDEX
        mask = mask & valid
        count = valid.sum().float()
    return (ce * mask).sum() / count.clamp_min(1.0)
