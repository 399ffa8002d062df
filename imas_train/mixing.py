"""Mixing blocks of every method: the CutMix boxes of iMAS, U2PL, CPS and Dual Teacher, ClassMix, and the pastes.

Specs: docs/algorithm.md §3 step 5 (iMAS); ``shared/methods/U2PL.md``, ``CPS.md``, ``DualTeacher.md`` (``README.md`` §4
lists these blocks).
Conventions are those of ``imas_train/imas.py``:

* ``boxes``: int64 rows ``(y0, y1, x0, x1)``, half-open, pixel coordinates, on the CPU; (B, 4), or (B, N, 4) for
  several boxes per image.
* ``mask``: (B, H, W) bool. Its meaning is stated by the function that consumes it (`paste_from_partners`: True =
  the partner's pixel; `class_mix`: True = the image's own pixel; `mask_mix`: True = ``inside``).
* ``partners``: (B,) int64; image i is mixed with image ``partners[i]``.
* Every random draw comes from an explicit CPU ``torch.Generator`` in the order each docstring states; nothing here
  reads global RNG state. The references draw from numpy (U2PL: the global RNG seeded identically on every rank; CPS:
  the data-loader worker's RNG); these functions keep their distributions, not their random streams.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "box_mask",
    "toggled_box_mask",
    "cyclic_partners",
    "permutation_partners",
    "sample_u2pl_boxes",
    "u2pl_cutmix",
    "sample_cps_boxes",
    "sample_beta_boxes",
    "class_mix_mask",
    "mask_mix",
    "paste_from_partners",
    "class_mix",
    "sample_cutmix_boxes",
    "paste_cutmix",
    "random_partners",
]

# ---------------------------------------------------------------------------------------------------------------
# Box masks and partners


def box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """(B, 4) boxes (y0, y1, x0, x1) -> (B, H, W) bool, True inside each image's own box (on the boxes' device)."""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (B, 4), got {tuple(boxes.shape)}")
    ys = torch.arange(height, device=boxes.device).view(1, height, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, width)
    y0, y1, x0, x1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)


def toggled_box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """CPS's mask: start from 0 and let each box toggle its pixels, i.e. the XOR of the boxes (CPS.md §2.B).

    A pixel covered by an even number of boxes is False. True marks pixels taken from the second image
    (u^mix = u0·(1 − M) + u1·M, CPS.md §2.A item 2); ``mask.unsqueeze(1).float()`` is the reference's (B, 1, H, W) M.

    Args:
        boxes: (B, N, 4) int64, from `sample_cps_boxes`.
        height, width: H, W.

    Returns:
        (B, H, W) bool on the boxes' device.
    """
    if boxes.dim() != 3 or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be (B, N, 4), got {tuple(boxes.shape)}")
    b, n, _ = boxes.shape
    per_box = box_mask(boxes.reshape(b * n, 4), height, width).view(b, n, height, width)
    return (per_box.sum(dim=1) % 2).bool()


def cyclic_partners(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """U2PL's CutMix partner: image k receives from image (k + 1) mod B (U2PL.md §2.B item 3). B = 1 pairs with itself.

    Returns:
        (B,) int64 on `device` (CPU when None).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return (torch.arange(batch_size, device=device) + 1) % batch_size


def permutation_partners(
    batch_size: int,
    generator: torch.Generator,
    *,
    swap_pair: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Dual Teacher's partners: ``torch.randperm(B)``, self-pairing possible (DualTeacher.md §2 items 3b, 4c).

    Args:
        batch_size: B.
        generator: CPU generator; one ``randperm`` draw (none when the pair is swapped).
        swap_pair: ClassMix rule: with B = 2 return [1, 0] without drawing (item 4c); CutMix epochs use False.
        device: where to put the result (CPU when None).

    Returns:
        (B,) int64 permutation.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    partners = (
        torch.tensor([1, 0]) if swap_pair and batch_size == 2 else torch.randperm(batch_size, generator=generator)
    )
    return partners if device is None else partners.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Box generators


def sample_u2pl_boxes(batch_size: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """U2PL's CutMix box, one per image, covering 50 % of the image (U2PL.md §2.B item 3, §7 oracle 10).

    Per image: width w uniform integer in [⌊W/2 + 1⌋, W − 1]; height h = round(H·W/2 / w), rounded half to even
    (numpy's ``np.round``; the spec says "round", so the tie rule is an assumption); top-left y0 uniform in
    [0, H − h], x0 uniform in [0, W − w], so the box is always inside the image. The area h·w is H·W/2 up to the
    rounding of h: |h·w − H·W/2| <= w/2 (0.499–0.501 of the image at 769²).

    Draws: B widths (``randint``), then B float64 uniforms for y0, then B for x0.

    Args:
        batch_size: B.
        height, width: H, W (W >= 3 so that the width range is not empty).
        generator: CPU generator.

    Returns:
        (B, 4) int64 on the CPU, rows (y0, y1, x0, x1).
    """
    if height < 1 or width < 3:
        raise ValueError(f"the U2PL box needs H >= 1 and W >= 3, got {height}x{width}")
    w = torch.randint(width // 2 + 1, width, (batch_size,), generator=generator)
    h = torch.round((height * width / 2) / w.double()).long()  # torch.round rounds half to even, as np.round
    y0 = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * (height - h + 1)).floor().long()
    x0 = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * (width - w + 1)).floor().long()
    return torch.stack([y0, y0 + h, x0, x0 + w], dim=1)


def u2pl_cutmix(
    images: Tensor, labels: Tensor, confs: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """U2PL's CutMix when it fires: 50 % boxes and the cyclic partner (U2PL.md §2.B item 3).

    ũ_k = u_k outside its box and u_{(k+1) mod B} inside; pseudo-labels and confidences are mixed the same way. The
    firing coin (p = 0.5 per iteration) is the caller's: ``imas.cutmix_fires(0.5, generator)`` draws it.

    Args:
        images: (B, 3, H, W) unlabeled images.
        labels: (B, H, W) teacher pseudo-labels.
        confs: (B, H, W) teacher confidences (or any per-pixel map, e.g. logits (B, C, H, W)).
        generator: CPU generator for `sample_u2pl_boxes`.

    Returns:
        images, labels, confs: new mixed tensors.
    """
    b, _, h, w = images.shape
    mask = box_mask(sample_u2pl_boxes(b, h, w, generator).to(images.device), h, w)
    mixed = paste_from_partners(mask, cyclic_partners(b, images.device), images, labels, confs)
    return mixed[0], mixed[1], mixed[2]


def sample_cps_boxes(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator,
    *,
    n_boxes: int = 3,
    prop_range: tuple[float, float] = (0.25, 0.5),
) -> Tensor:
    """CPS's boxes: N per image, each of area p/N of the image, p ~ U(lo, hi) (CPS.md §2.B).

    Per image and box: p ~ U(lo, hi); u ~ U(0, 1); y = p^u (= exp(u·ln p)), x = p / y, both scaled by √(1/N), so
    y·x = p/N; size (h, w) = round(y·H), round(x·W), half to even; top-left round((H − h)·U₁), round((W − w)·U₂), so
    every box lies inside the image. The spec states the scale √(1/3) for its N = 3; √(1/N) for other N is an
    assumption (it gives area p for N = 1, matching CPS.md §7 oracle 5). Combine with `toggled_box_mask`.

    Draws, each (B, N) float64 uniforms in this order: p, u, U₁, U₂.

    Args:
        batch_size: B.
        height, width: H, W.
        generator: CPU generator.
        n_boxes: N (3 in every CPS config).
        prop_range: (lo, hi) of p, 0 < lo <= hi <= 1.

    Returns:
        (B, N, 4) int64 on the CPU, rows (y0, y1, x0, x1).
    """
    lo, hi = prop_range
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"prop_range must satisfy 0 < lo <= hi <= 1, got {prop_range}")
    if n_boxes < 1:
        raise ValueError(f"n_boxes must be >= 1, got {n_boxes}")
    shape = (batch_size, n_boxes)
    p = lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    y = torch.exp(u * torch.log(p))
    x = p / y
    scale = math.sqrt(1.0 / n_boxes)
    h = torch.round(y * scale * height)
    w = torch.round(x * scale * width)
    y0 = torch.round((height - h) * torch.rand(shape, generator=generator, dtype=torch.float64))
    x0 = torch.round((width - w) * torch.rand(shape, generator=generator, dtype=torch.float64))
    return torch.stack([y0, y0 + h, x0, x0 + w], dim=2).long()


def _centred_boxes(rows: Tensor, cols: Tensor, half_h: int, half_w: int, height: int, width: int) -> Tensor:
    """(B, 4) int64 boxes (y0, y1, x0, x1) of half-sides `half_h`, `half_w` around centres (rows, cols), clipped to
    the image: the box rule of iMAS and Dual Teacher, which differ only in how they draw sides and centres."""
    return torch.stack(
        [
            (rows - half_h).clamp(0, height),
            (rows + half_h).clamp(0, height),
            (cols - half_w).clamp(0, width),
            (cols + half_w).clamp(0, width),
        ],
        dim=1,
    )


def sample_beta_boxes(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator,
    *,
    alpha: int = 4,
    beta: int = 4,
) -> Tensor:
    """Dual Teacher's CutMix box (``rand_bbox_1``): one λ ~ Beta(α, β) per batch (DualTeacher.md §2 item 3b).

    r = √(1 − λ); half-sides ⌊⌊H·r⌋/2⌋ rows and ⌊⌊W·r⌋/2⌋ columns around a per-image centre with row uniform in
    [⌊H/8⌋, H) and column uniform in [⌊W/8⌋, W); clipped to the image. The reference's variable names swap H and W
    (harmless for its square crops); here H always goes with rows. Mixed fraction at 512²: mean ≈ 0.36, p10 ≈ 0.19,
    p90 ≈ 0.54 (§7 oracle 5).

    λ is drawn as the α-th smallest of α + β − 1 uniforms, which is exactly Beta(α, β) for integer α, β (torch's Beta
    sampler takes no generator), so only integer shape parameters are accepted.

    Draws: α + β − 1 float64 uniforms for λ, then B row centres, then B column centres (``randint``).

    Args:
        batch_size: B.
        height, width: H, W.
        generator: CPU generator.
        alpha, beta: Beta shape parameters, positive integers (4, 4 in the reference).

    Returns:
        (B, 4) int64 on the CPU, rows (y0, y1, x0, x1).
    """
    if alpha < 1 or beta < 1 or int(alpha) != alpha or int(beta) != beta:
        raise ValueError(f"alpha and beta must be positive integers, got {alpha}, {beta}")
    uniforms = torch.rand(alpha + beta - 1, generator=generator, dtype=torch.float64)
    lam = torch.sort(uniforms).values[alpha - 1].item()
    r = math.sqrt(1.0 - lam)
    half_h, half_w = math.floor(height * r) // 2, math.floor(width * r) // 2
    rows = torch.randint(height // 8, height, (batch_size,), generator=generator)
    cols = torch.randint(width // 8, width, (batch_size,), generator=generator)
    return _centred_boxes(rows, cols, half_h, half_w, height, width)


# ---------------------------------------------------------------------------------------------------------------
# ClassMix and applying masks


def class_mix_mask(labels: Tensor, generator: torch.Generator, *, ignore_index: int = 255) -> Tensor:
    """ClassMix mask: per image, ⌊n/2⌋ of its n present classes, chosen without replacement (DualTeacher.md §2 4b).

    ``ignore_index`` is not a class: it is never chosen and its pixels are False. n = 1 (or 0) chooses nothing, so the
    mask is all False (§7 oracle 3).

    Draws: per image with n >= 2, one ``randperm(n)`` over its sorted present classes; the first ⌊n/2⌋ are chosen.

    Args:
        labels: (B, H, W) integer label map (the active teacher's argmax).
        generator: CPU generator.
        ignore_index: the label value that is not a class.

    Returns:
        (B, H, W) bool on the labels' device: True where the pixel's class was chosen (the image's own pixels).
    """
    if labels.dim() != 3 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer (B, H, W) map, got {labels.dtype} {tuple(labels.shape)}")
    masks = []
    for label in labels:
        classes = torch.unique(label)
        classes = classes[classes != ignore_index]
        n = classes.numel()
        if n < 2:
            masks.append(torch.zeros_like(label, dtype=torch.bool))
            continue
        pick = torch.randperm(n, generator=generator)[: n // 2].to(classes.device)
        masks.append(torch.isin(label, classes[pick]))
    return torch.stack(masks)


def mask_mix(mask: Tensor, inside: Tensor, outside: Tensor) -> Tensor:
    """``inside`` where ``mask`` is True, ``outside`` elsewhere; the mask broadcasts over channel dims.

    CPS: ``mask_mix(M, u1, u0)`` is u^mix, and ``mask_mix(M, f(u1), f(u0)).argmax(1)`` its pseudo-label (logits are
    mixed before the argmax, CPS.md §2.A item 4).

    Args:
        mask: (B, H, W) bool.
        inside, outside: same shape (B, H, W) or (B, ..., H, W).

    Returns:
        A new tensor shaped like ``inside``.
    """
    if inside.shape != outside.shape:
        raise ValueError(f"inside {tuple(inside.shape)} and outside {tuple(outside.shape)} differ")
    _check_mask(mask, inside)
    view = (mask.shape[0],) + (1,) * (inside.dim() - 3) + tuple(mask.shape[1:])
    return torch.where(mask.to(inside.device).view(view), inside, outside)


def paste_from_partners(mask: Tensor, partners: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """CutMix: inside image i's mask take image ``partners[i]``'s pixels, outside keep its own.

    U2PL mixes image, pseudo-label and confidence (U2PL.md §2.B item 3); Dual Teacher image and pseudo-label only,
    the confidence stays the receiver's own (DualTeacher.md §2 item 3b).

    Args:
        mask: (B, H, W) bool, e.g. `box_mask` of the boxes.
        partners: (B,) int64.
        *tensors: each (B, H, W) or (B, ..., H, W).

    Returns:
        One new tensor per input, in order.
    """
    return tuple(mask_mix(mask, t[partners.to(t.device)], t) for t in tensors)


def class_mix(mask: Tensor, partners: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """ClassMix: M·a + (1 − M)·a[π], i.e. the image's own pixels where ``mask`` is True (DualTeacher.md §2 4d, 4f).

    Mix the strong views and the teacher probabilities q = M·p + (1 − M)·p[π]. Because M is binary, max and argmax of
    the mixed probabilities equal the mixed max and argmax, so mixing (conf, labels) gives the same result.

    Args:
        mask: (B, H, W) bool, from `class_mix_mask`.
        partners: (B,) int64, from `permutation_partners(..., swap_pair=True)`.
        *tensors: each (B, H, W) or (B, ..., H, W).

    Returns:
        One new tensor per input, in order.
    """
    return tuple(mask_mix(mask, t, t[partners.to(t.device)]) for t in tensors)


def _check_mask(mask: Tensor, like: Tensor) -> None:
    if mask.dtype != torch.bool or mask.dim() != 3 or like.dim() < 3:
        raise ValueError(f"mask must be (B, H, W) bool and the tensor (B, ..., H, W); got {mask.dtype} mask")
    if mask.shape[0] != like.shape[0] or mask.shape[1:] != like.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match tensor {tuple(like.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# iMAS (docs/algorithm.md §3 step 5)


def random_partners(batch_size: int, generator: torch.Generator, device: torch.device | str | None = None) -> Tensor:
    """Non-adaptive pairing ablation: a uniformly random permutation; image i receives from partners[i].

    Returns:
        (B,) int64, drawn on the generator's (CPU) device, then moved to `device` when given.
    """
    partners = torch.randperm(batch_size, generator=generator)
    return partners if device is None else partners.to(device)


def sample_cutmix_boxes(
    batch_size: int,
    height: int,
    width: int,
    side_range: tuple[float, float] = (0.1, 0.9),
    generator: torch.Generator | None = None,
) -> Tensor:
    """One CutMix box per image (docs/algorithm.md §3 step 5).

    One side ratio v ~ U(lo, hi) for the whole batch gives sides s_h = floor(H v), s_w = floor(W v). Each image draws
    a centre r uniform in {floor(H/16), ..., H-1} and c uniform in {floor(W/16), ..., W-1}; its box is rows
    [r - floor(s_h/2), r + floor(s_h/2)) and cols [c - floor(s_w/2), c + floor(s_w/2)), clipped to the image. The
    side ratio is not scaled by easiness (the reference's mapping flags are off in every run).

    Args:
        batch_size: B.
        height, width: H, W of the crop.
        side_range: (lo, hi) of v.
        generator: CPU generator supplying every draw (None: torch's default generator).

    Returns:
        (B, 4) int64 on the CPU, rows (y0, y1, x0, x1); move it to the images' device (or let `paste_cutmix` do it).
    """
    lo, hi = side_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"side_range must satisfy 0 <= lo <= hi <= 1, got {side_range}")
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    v = lo + (hi - lo) * u
    half_h, half_w = math.floor(height * v) // 2, math.floor(width * v) // 2
    rows = torch.randint(height // 16, height, (batch_size,), generator=generator)
    cols = torch.randint(width // 16, width, (batch_size,), generator=generator)
    return _centred_boxes(rows, cols, half_h, half_w, height, width)


def paste_cutmix(
    images: Tensor,
    labels: Tensor,
    confs: Tensor,
    boxes: Tensor,
    partners: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Inside image i's box, copy image, pseudo-label and confidence from image partners[i], same coordinates.

    Outside its box each image keeps its own pixels. The inputs are not modified. The loss weight of image i stays
    the receiver's own easiness e_i.

    Args:
        images: (B, 3, H, W) weak views u_w (normalised).
        labels: (B, H, W) teacher pseudo-labels.
        confs: (B, H, W) teacher confidences.
        boxes: (B, 4) int64 (y0, y1, x0, x1), from `sample_cutmix_boxes`.
        partners: (B,) int64, from `hard_easy_partners` or `random_partners`.

    Returns:
        images_cm (B, 3, H, W), labels_cm (B, H, W), confs_cm (B, H, W): new tensors.
    """
    b, _, h, w = images.shape
    if labels.shape != (b, h, w) or confs.shape != (b, h, w) or boxes.shape != (b, 4) or partners.shape != (b,):
        raise ValueError(
            f"shape mismatch: images {tuple(images.shape)}, labels {tuple(labels.shape)}, confs {tuple(confs.shape)},"
            f" boxes {tuple(boxes.shape)}, partners {tuple(partners.shape)}"
        )
    device = images.device
    mask = box_mask(boxes.to(device), h, w)
    partners = partners.to(device)
    images_cm = torch.where(mask.unsqueeze(1), images[partners], images)
    labels_cm = torch.where(mask, labels[partners], labels)
    confs_cm = torch.where(mask, confs[partners], confs)
    return images_cm, labels_cm, confs_cm
