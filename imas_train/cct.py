"""CCT as pure tensor functions: perturbations, consistency loss, weight ramp, abCE (shared/methods/CCT.md).

Glossary: ``z`` the encoder output the decoders read, (B, c, h, w) (the DeepLabV3+ classifier's last-conv input);
``labels`` the main decoder's argmax on the same images at the output resolution (B, H, W); class 0 is
"background" for the prediction-guided perturbations (CCT.md §4 item 2). Every random draw comes from an explicit
CPU ``torch.Generator`` and is moved to the tensors' device afterwards, so a resumed run repeats it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from imas_core.constants import IGNORE_INDEX

__all__ = [
    "abce_tau",
    "annealed_bootstrap_ce",
    "context_masking",
    "feature_drop",
    "feature_noise",
    "foreground",
    "guided_cutout",
    "guided_cutout_mask",
    "l2_normalize",
    "object_masking",
    "softmax_mse",
    "spatial_dropout",
    "unsup_weight",
    "vat_perturbation",
]


# ---------------------------------------------------------------------------------------------------------------
# Losses and schedules


def unsup_weight(step: int, rampup_iters: int, weight: float = 30.0) -> float:
    """w_u(t) = weight·exp(−5·(1 − min(t, T_r)/T_r)²), the sigmoid ramp-up (CCT.md §2.A item 5, §7 oracle 1).

    ``rampup_iters`` = 0 gives the constant weight of the DeepLabV3+ port (§2.B item 5).

    Args:
        step: t, the 0-based global iteration.
        rampup_iters: T_r in iterations.
        weight: the final weight (30).
    """
    if rampup_iters < 0:
        raise ValueError(f"rampup_iters must be >= 0, got {rampup_iters}")
    if rampup_iters == 0:
        return float(weight)
    frac = min(max(step, 0), rampup_iters) / rampup_iters
    return float(weight * math.exp(-5.0 * (1.0 - frac) ** 2))


def softmax_mse(logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """MSE between softmax(logits) and target probabilities, the mean over all B·C·H·W elements (§2.A item 4).

    Args:
        logits: (B, C, H, W) auxiliary-decoder logits (with grad).
        target: (B, C, H, W) probabilities of the main decoder; must not require grad (the reference asserts it).
        valid: optional (B, H, W) bool: the mean runs over the valid pixels' B_v·C elements only.

    Returns:
        Scalar float32; 0 when softmax(logits) equals the target.
    """
    if target.requires_grad:
        raise ValueError("softmax_mse: the target must be detached (no gradient flows into the main decoder)")
    if logits.shape != target.shape:
        raise ValueError(f"softmax_mse: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    sq = (logits.float().softmax(dim=1) - target.float()) ** 2
    if valid is None:
        return sq.mean()
    keep = valid.unsqueeze(1).to(sq.dtype)
    return (sq * keep).sum() / (keep.sum() * sq.shape[1]).clamp_min(1)


def abce_tau(t: int, anneal_iters: int, num_classes: int, final: float = 0.99) -> float:
    """τ(t) = 1/C + (final − 1/C)·(1 − exp(−5·min(t, T_b)/T_b)), abCE's annealed threshold (§2.B item 2).

    ``anneal_iters`` = T_b (0.4·E·L in the port); 0 gives ``final`` at once.
    """
    if anneal_iters < 0 or num_classes < 1:
        raise ValueError(f"need anneal_iters >= 0 and num_classes >= 1, got {anneal_iters}, {num_classes}")
    start = 1.0 / num_classes
    frac = 1.0 if anneal_iters == 0 else 1.0 - math.exp(-5.0 * min(max(t, 0), anneal_iters) / anneal_iters)
    return start + (final - start) * frac


def annealed_bootstrap_ce(
    logits: Tensor, target: Tensor, tau: float, min_kept: int, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor, Tensor]:
    """Annealed-bootstrapped cross-entropy (§2.B item 2, §7 oracle 11).

    p = softmax probability of the ground-truth class at every valid pixel; threshold = max(τ, p_(k)) with p_(k) the
    k-th smallest p (0-based), k = min(min_kept, n − 1); the loss is the mean CE over the valid pixels with
    p < threshold. With every p above τ only the k hardest pixels remain. No host synchronisation.

    Args:
        logits: (B, C, H, W).
        target: (B, H, W) int64 in [0, C) or `ignore_index`.
        tau: the annealed threshold (`abce_tau`).
        min_kept: k before clipping to n − 1 (1 per image in the port: the per-process batch size).
        ignore_index: the ignored label.

    Returns:
        (loss, threshold, kept): 0-d float32 loss (0 with the graph kept when no pixel is kept), the threshold used
        (1 when no pixel is valid) and the number of kept pixels.
    """
    valid = target != ignore_index
    with torch.no_grad():
        prob = logits.detach().float().softmax(dim=1)
        p = prob.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
        ordered = torch.sort(p.masked_fill(~valid, math.inf).flatten()).values  # valid first, ascending
        n = valid.sum()
        k = torch.clamp(torch.clamp(n - 1, min=0), max=min_kept)
        threshold = torch.clamp(ordered[k], min=tau).masked_fill(n == 0, 1.0)
        keep = valid & (p < threshold)
    ce = F.cross_entropy(logits.float(), target.masked_fill(~keep, ignore_index), ignore_index=ignore_index,
                         reduction="none")  # fmt: skip
    kept = keep.sum()
    return ce.sum() / kept.clamp_min(1), threshold, kept


# ---------------------------------------------------------------------------------------------------------------
# Perturbations of the encoder output (CCT.md §5); each returns a tensor shaped like z


def _uniform(shape: tuple[int, ...], generator: torch.Generator, like: Tensor, lo: float, hi: float) -> Tensor:
    """U(lo, hi) drawn on the CPU from `generator`, moved to `like`'s device and dtype."""
    return (torch.rand(shape, generator=generator) * (hi - lo) + lo).to(device=like.device, dtype=like.dtype)


def spatial_dropout(z: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Dropout2d: each channel of each sample is zeroed with probability p, survivors scaled by 1/(1 − p) (§7
    oracle 6)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    b, c = z.shape[:2]
    keep = (torch.rand((b, c), generator=generator) >= p).to(device=z.device, dtype=z.dtype)
    return z * (keep / (1.0 - p)).view(b, c, *([1] * (z.dim() - 2)))


def feature_drop(z: Tensor, generator: torch.Generator, drop_range: tuple[float, float] = (0.7, 0.9)) -> Tensor:
    """FeatureDrop: zero the positions whose channel-mean attention a reaches thr = max_spatial(a)·γ (§7 oracle 4).

    γ ~ U(drop_range) is ONE draw per call, shared by the batch; the maximum is per image. Positions with a < thr
    are kept.
    """
    lo, hi = drop_range
    attention = z.mean(dim=1, keepdim=True)  # (B, 1, h, w)
    peak = attention.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    gamma = float(torch.rand((), generator=generator)) * (hi - lo) + lo
    return z * (attention < peak * gamma).to(z.dtype)


def feature_noise(z: Tensor, generator: torch.Generator, amplitude: float = 0.3) -> Tensor:
    """FeatureNoise: z + z·N, N ~ U(−a, a) of shape (c, h, w), one sample shared by the batch (§7 oracle 5)."""
    noise = _uniform(tuple(z.shape[1:]), generator, z, -amplitude, amplitude)
    return z + z * noise.unsqueeze(0)


def foreground(labels: Tensor, size: tuple[int, int] | torch.Size, background: int = 0) -> Tensor:
    """(B, h, w) float mask of labels != background, nearest-resized from (B, H, W) to `size` (the port's guided
    masks)."""
    fg = (labels != background).unsqueeze(1).float()
    return F.interpolate(fg, size=tuple(size), mode="nearest").squeeze(1)


def context_masking(z: Tensor, fg: Tensor) -> Tensor:
    """Keep the predicted objects, remove the context: z·fg (fg from `foreground`, (B, h, w))."""
    return z * fg.unsqueeze(1).to(z.dtype)


def object_masking(z: Tensor, fg: Tensor) -> Tensor:
    """Remove the predicted objects: z·(1 − fg). ``context_masking(z, fg) + object_masking(z, fg) == z`` (oracle 3)."""
    return z * (1.0 - fg.unsqueeze(1).to(z.dtype))


def guided_cutout_mask(
    labels: Tensor,
    generator: torch.Generator,
    erase: float = 0.4,
    min_vertices: int = 50,
    background: int = 0,
) -> Tensor:
    """Guided cutout's keep-mask at the labels' resolution (§5 "Guided Cutout", §7 oracle 7).

    Per image: external contours of labels != background (OpenCV ``RETR_EXTERNAL``, ``CHAIN_APPROX_SIMPLE``, on the
    CPU); for each contour with MORE than `min_vertices` vertices, a box of ⌊erase·(y_max − y_min)⌋ rows ×
    ⌊erase·(x_max − x_min)⌋ columns (extents of the contour's points) is zeroed at a uniform integer position
    inside the contour's bounding box. Straight-edged blobs (few simplified vertices) are never cut.

    Args:
        labels: (B, H, W) integer predictions.
        generator: the box positions' draws, in image order then contour order.
        erase: the box side as a fraction of the bounding box's (0.4).
        min_vertices: contours with at most this many vertices are left alone (50).
        background: the class that is not an object.

    Returns:
        (B, H, W) float32 mask on labels' device: 0 inside the boxes, 1 elsewhere.
    """
    import cv2  # OpenCV (opencv-python-headless, installed with albumentations); only guided cutout needs it

    fg = (labels != background).to(torch.uint8).cpu().numpy()
    mask = np.ones(fg.shape, dtype=np.float32)
    for i in range(fg.shape[0]):
        contours, _ = cv2.findContours(np.ascontiguousarray(fg[i]), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        for contour in contours:
            if len(contour) <= min_vertices:
                continue
            points = contour.reshape(-1, 2)  # (x, y)
            x_min, y_min = (int(v) for v in points.min(axis=0))
            x_max, y_max = (int(v) for v in points.max(axis=0))
            cut_w, cut_h = int(erase * (x_max - x_min)), int(erase * (y_max - y_min))
            x0 = int(torch.randint(x_min, x_max - cut_w + 1, (), generator=generator))
            y0 = int(torch.randint(y_min, y_max - cut_h + 1, (), generator=generator))
            mask[i, y0 : y0 + cut_h, x0 : x0 + cut_w] = 0.0
    return torch.from_numpy(mask).to(labels.device)


def guided_cutout(z: Tensor, labels: Tensor, generator: torch.Generator, erase: float = 0.4, min_vertices: int = 50,
                  background: int = 0) -> Tensor:  # fmt: skip
    """z·mask with `guided_cutout_mask` computed at the labels' resolution and nearest-resized to z's."""
    keep = guided_cutout_mask(labels, generator, erase, min_vertices, background)
    keep = F.interpolate(keep.unsqueeze(1), size=z.shape[-2:], mode="nearest")
    return z * keep.to(z.dtype)


def l2_normalize(d: Tensor) -> Tensor:
    """Each sample of `d` divided by its L2 norm over all non-batch dimensions (zero samples stay zero)."""
    norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
    return d / torch.where(norm > 0, norm, torch.ones_like(norm))


def vat_perturbation(
    z: Tensor,
    decode: Callable[[Tensor], Tensor],
    generator: torch.Generator,
    xi: float = 1e-6,
    eps: float = 2.0,
) -> Tensor:
    """The adversarial perturbation r of intermediate VAT, one power iteration (§5 "VAT", §7 oracle 8).

    d ~ U(−0.5, 0.5) per element, L2-normalised per sample; with z DETACHED, d ← normalised ∂/∂d of
    KL(softmax(decode(z)) ‖ softmax(decode(z + ξd))) ('batchmean'); r = ε·d, so ‖r‖₂ = ε per sample.

    The power iteration runs in float64 with autocast off: ξ = 1e-6 moves the logits below float32 (let alone
    half-precision) resolution, where the difference of the two softmaxes would be rounding noise. Only
    ``torch.autograd.grad`` with respect to d is taken, so no parameter's ``.grad`` (decoder or encoder) is written
    and nothing flows into the encoder; a sample whose gradient is exactly zero keeps its random direction.

    Args:
        z: (B, c, h, w) encoder output (any dtype; not modified, its graph not used).
        decode: the auxiliary decoder as a function of its input; must accept float64 input.
        generator: draws d.
        xi: the finite-difference step ξ.
        eps: the perturbation norm ε.

    Returns:
        r, detached, shaped and typed like z.
    """
    with torch.enable_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        z0 = z.detach().double()
        d = l2_normalize(torch.rand(tuple(z.shape), generator=generator, dtype=torch.float64) - 0.5).to(z.device)
        with torch.no_grad():
            target = decode(z0).double().softmax(dim=1)
        d.requires_grad_(True)
        log_hat = decode(z0 + xi * d).double().log_softmax(dim=1)
        kl = F.kl_div(log_hat, target, reduction="batchmean")
        (grad,) = torch.autograd.grad(kl, d)
    zero = grad.flatten(1).abs().amax(dim=1) == 0
    direction = torch.where(zero.view(-1, *([1] * (z.dim() - 1))), d.detach(), grad)
    return (eps * l2_normalize(direction)).to(z.dtype).detach()
