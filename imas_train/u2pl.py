"""U2PL as pure tensor functions (shared/methods/U2PL.md §2.B items 7-8, §7 oracles).

Glossary: ``entropy`` ε per pixel (nats) of the train-mode teacher's prediction on the mixed unlabeled image;
``alpha`` a percentage of pixels (α_t for the pseudo-label filter, α_c for the contrastive partition); ``rep`` the
representation head's features at the decoder resolution (B, R, h, w); ``prob_t`` the teacher's softmax at that
resolution. Labels use 255 for "ignore". Every random draw comes from an explicit CPU ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from imas_core.constants import IGNORE_INDEX
from imas_train.memory_bank import MemoryBank
from imas_train.pixel_stats import percentile

__all__ = [
    "ContrastSettings",
    "batch_onehot",
    "contrastive_loss",
    "drop_percent",
    "entropy_filter",
    "filtered_pseudo_loss",
    "info_nce",
    "class_ranks",
    "contrast_pairs",
]


def drop_percent(epoch: int, epochs: int, percent: float) -> float:
    """α(epoch) = percent · (1 − epoch/E): U2PL's dynamic partition, per epoch (§2.B items 7-8a; 20 -> 0)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return percent * (1.0 - epoch / epochs)


def entropy_filter(pseudo: Tensor, entropy: Tensor, alpha: float) -> Tensor:
    """Pseudo-labels with the most uncertain α % of pixels set to 255 (§2.B item 7).

    θ = numpy-linear percentile of ε over the pixels whose pseudo-label is not 255 at 100 − α; pixels with ε ≥ θ
    are dropped (``>=``: ties at θ are dropped, so all-equal entropies drop every pixel, §7 oracle 4).

    Args:
        pseudo: (B, H, W) int64 pseudo-labels.
        entropy: (B, H, W) float entropies.
        alpha: percentage to drop, in [0, 100].

    Returns:
        (B, H, W) int64 targets (a new tensor).
    """
    valid = pseudo != IGNORE_INDEX
    theta = percentile(entropy.float(), 100.0 - alpha, valid)
    return torch.where(entropy >= theta, torch.full_like(pseudo, IGNORE_INDEX), pseudo)


def filtered_pseudo_loss(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """L_u = (B·H·W / N_kept) · mean over kept pixels of CE (§2.B item 7 "Normalisation").

    With no kept pixel the reference returns NaN; this returns 0 (with the graph kept) and reports the event.

    Args:
        logits: (B, C, H, W) student logits on the mixed unlabeled images.
        target: (B, H, W) int64 from `entropy_filter`.

    Returns:
        (loss, kept_fraction): the 0-d loss (float32) and N_kept / (B·H·W).
    """
    kept = (target != IGNORE_INDEX).sum()
    total = target.numel()
    if int(kept) == 0:
        return logits.float().sum() * 0.0, kept.float() / total
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)  # mean over kept pixels
    return ce * (total / kept.float()), kept.float() / total


def batch_onehot(labels: Tensor, num_classes: int, *, per_image: bool) -> Tensor:
    """One-hot maps of (B, H, W) labels as (B, C, H, W) bool; 255 gives an all-false row.

    ``per_image=False`` reproduces the official function (§2.B item 8c, §7 oracle 13): only batch slot 0 is
    written, with the union over the batch of every image's one-hot (another image's 255 counts as class 0), and
    the pixels where image 0 itself is 255 are cleared; slots 1..B−1 are all false. ``per_image=True`` is the
    ordinary one-hot.
    """
    ignore = labels == IGNORE_INDEX
    classes = torch.where(ignore, torch.zeros_like(labels), labels)
    onehot = F.one_hot(classes, num_classes).permute(0, 3, 1, 2).bool()  # (B, C, H, W)
    if per_image:
        return onehot & ~ignore.unsqueeze(1)
    out = torch.zeros_like(onehot)
    out[0] = onehot.any(dim=0) & ~ignore[0].unsqueeze(0)
    return out


def class_ranks(prob: Tensor) -> Tensor:
    """Rank of every class in each pixel's descending probability order: (B, C, h, w) int64, 0 = most probable."""
    order = torch.sort(prob, dim=1, descending=True, stable=True).indices
    return torch.argsort(order, dim=1)


def contrast_pairs(valid: list[int], *, fix_class_indexing: bool) -> list[tuple[int, int]]:
    """(anchor class, bank class) per term of L_c over the valid classes v_0 < v_1 < ... (§2.B item 8e).

    Faithful: the loop index k picks the anchors and the positive, v_k the bank (the reference's indexing bug), so
    valid {0, 2, 5} gives (0, 0), (1, 2), (2, 5) (§7 oracle 9). Fixed: (v_k, v_k).
    """
    return [(v if fix_class_indexing else k, v) for k, v in enumerate(valid)]


def info_nce(anchors: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """InfoNCE with the positive first (§2.B item 8e): mean over anchors of CE(cos(anchor, keys) / τ, 0).

    Args:
        anchors: (N, R) query features (with grad).
        positive: (R,) the positive key.
        negatives: (N, K, R) negative keys.
        temperature: τ.

    Returns:
        0-d float32 loss. With the anchor along the positive and every negative orthogonal to it, τ = 0.5 and
        K = 50: log(1 + 50·e^-2) = 2.04985 (§7 oracle 8).
    """
    n = anchors.shape[0]
    keys = torch.cat([positive.expand(n, 1, -1), negatives], dim=1)  # (N, 1 + K, R)
    logits = F.cosine_similarity(anchors.unsqueeze(1).float(), keys.float(), dim=2) / temperature
    return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=logits.device))


@dataclass(frozen=True)
class ContrastSettings:
    """The contrastive loss's settings (U2PL.md §3 and §9 flags)."""

    alpha: float  # α_c of this epoch, percent of pixels in each entropy partition
    low_rank: int = 3  # r_l
    high_rank: int = 20  # r_h
    anchor_threshold: float = 0.3  # δ_p
    negative_threshold: float = 1.0  # δ_n
    num_anchors: int = 256
    num_negatives: int = 50
    temperature: float = 0.5
    negatives_require_label: bool = True  # faithful: negatives of class c need one-hot c (§4 rows 4-5)
    fix_class_indexing: bool = False  # faithful: anchors of class k against the bank of class v_k (§4 row 6)
    per_image_onehot: bool = False  # faithful: the batch-slot-0 union one-hot (§2.B 8c)


def _nearest(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, ..., H, W) bool -> (B, ..., h, w) bool, nearest neighbour (the reference's F.interpolate 'nearest')."""
    shape = mask.shape
    flat = mask.reshape(shape[0], -1, shape[-2], shape[-1]).float()
    out = F.interpolate(flat, size=size, mode="nearest") > 0.5
    return out.reshape(*shape[:-2], *size)


def contrastive_loss(
    rep_s: Tensor,
    rep_t: Tensor,
    prob_t: Tensor,
    label_l: Tensor,
    pseudo_u: Tensor,
    entropy: Tensor,
    bank: MemoryBank,
    settings: ContrastSettings,
    generator: torch.Generator,
    gather_rows: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, int]:
    """U2PL's contrastive loss L_c of one iteration; pushes this iteration's negative keys into `bank` first
    (§2.B item 8, faithful quirks per `settings`).

    Args:
        rep_s: (2B, R, h, w) student representation of [x; ũ] (with grad).
        rep_t: (2B, R, h, w) teacher representation (no grad).
        prob_t: (2B, C, h, w) teacher softmax at the decoder resolution.
        label_l: (B, H, W) labels of x (255 = ignore).
        pseudo_u: (B, H, W) pseudo-labels of ũ (the eval-mode teacher's, mixed with ũ).
        entropy: (B, H, W) entropy of the train-mode teacher on ũ.
        bank: the per-class negative memory bank (identical on every process).
        settings: α_c and the constants and flags.
        generator: CPU generator for anchor and negative sampling.
        gather_rows: ``ctx.gather_rows`` (concatenate rows of every process in rank order); None = one process.

    Returns:
        (L_c as a 0-d float32 tensor, the number V of valid classes).
    """
    _, rdim, h, w = rep_s.shape
    b, num_classes = label_l.shape[0], prob_t.shape[1]
    size = (h, w)
    # a. entropy partitions of the unlabeled pixels: bottom α_c % reliable, top α_c % unreliable
    flat = entropy.float()
    low_u = flat <= percentile(flat, settings.alpha)
    high_u = flat >= percentile(flat, 100.0 - settings.alpha)
    # b. masks over [x; ũ] at the decoder resolution; every valid labeled pixel is in both
    valid_l = label_l != IGNORE_INDEX
    low_mask = _nearest(torch.cat([valid_l, low_u]), size)  # (2B, h, w)
    high_mask = _nearest(torch.cat([valid_l, high_u]), size)
    # c. one-hot labels (faithful: the batch-slot-0 union), nearest to (h, w)
    onehot_l = _nearest(batch_onehot(label_l, num_classes, per_image=settings.per_image_onehot), size)
    onehot_u = _nearest(batch_onehot(pseudo_u, num_classes, per_image=settings.per_image_onehot), size)
    onehot = torch.cat([onehot_l, onehot_u])  # (2B, C, h, w)
    ranks = class_ranks(prob_t)
    feats_s = rep_s.permute(0, 2, 3, 1)  # (2B, h, w, R)
    feats_t = rep_t.detach().permute(0, 2, 3, 1)
    anchors: list[Tensor] = []
    positives: list[Tensor | None] = []
    valid: list[int] = []
    keys: list[Tensor] = []
    for c in range(num_classes):
        low_valid = onehot[:, c] & low_mask
        high_valid = (onehot[:, c] if settings.negatives_require_label else torch.ones_like(high_mask)) & high_mask
        anchors.append(feats_s[(prob_t[:, c] > settings.anchor_threshold) & low_valid])
        positives.append(feats_t[low_valid].mean(dim=0) if low_valid.any() else None)
        if low_valid.any():
            valid.append(c)
        # d. negative keys: labeled rows need c among the top r_l and "not c" (the same one-hot); unlabeled rows
        #    need rank r_l..r_h-1
        rank_c = ranks[:, c]
        in_rank = torch.cat(
            [(rank_c[:b] < settings.low_rank) & ~onehot_l[:, c],
             (rank_c[b:] >= settings.low_rank) & (rank_c[b:] < settings.high_rank)]
        )  # fmt: skip
        negative = (prob_t[:, c] < settings.negative_threshold) & high_valid & in_rank
        found = feats_t[negative]
        keys.append(torch.cat([found, torch.full((found.shape[0], 1), float(c), device=found.device)], 1))
    # enqueue every class's keys of every process (one gather, rank order kept per class)
    rows = torch.cat(keys).float()
    if gather_rows is not None:
        rows = gather_rows(rows)
    rows = rows.cpu()
    for c in range(num_classes):
        bank.push(c, rows[rows[:, -1] == c, :-1])
    # e. InfoNCE over the valid classes; terms without anchors or negatives add 0 but still count in the 1/V
    if len(valid) <= 1:
        return rep_s.float().sum() * 0.0, len(valid)
    total = rep_s.float().sum() * 0.0
    for anchor_class, bank_class in contrast_pairs(valid, fix_class_indexing=settings.fix_class_indexing):
        pool = anchors[anchor_class]
        positive = positives[anchor_class]
        if pool.shape[0] == 0 or positive is None or bank.count(bank_class) == 0:
            continue
        pick = torch.randint(pool.shape[0], (settings.num_anchors,), generator=generator).to(pool.device)
        negatives = bank.sample(bank_class, settings.num_anchors * settings.num_negatives, generator)
        negatives = negatives.view(settings.num_anchors, settings.num_negatives, rdim).to(pool.device)
        total = total + info_nce(pool[pick], positive, negatives, settings.temperature)
    return total / len(valid), len(valid)
