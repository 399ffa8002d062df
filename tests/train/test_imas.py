"""The iMAS math (docs/algorithm.md §2, §3, §6.2): hand-computed cases and slow per-image numpy oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imas_train.imas import (
    class_weighted_iou,
    confidence_and_labels,
    cutmix_fires,
    easiness,
    easiness_from_predictions,
    hard_easy_partners,
    intensity_mix,
    unsupervised_loss,
    unsupervised_total,
)
from imas_train.mixing import paste_cutmix, random_partners, sample_cutmix_boxes

# ---------------------------------------------------------------------------------------------------------------
# Slow oracles, one image at a time, like the reference's numpy code


def np_wiou(pred: np.ndarray, ref: np.ndarray, num_classes: int, ignore_class0: bool) -> float:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (ref.ravel(), pred.ravel()), 1)  # rows = ref, cols = pred
    inter = np.diag(cm).astype(np.float64)
    n_ref = cm.sum(1).astype(np.float64)
    union = n_ref + cm.sum(0) - inter
    iou = np.array([inter[c] / union[c] if union[c] > 0 else 0.0 for c in range(num_classes)])
    if ignore_class0:
        n_ref[0] = 0
    if n_ref.sum() == 0:
        return 0.0
    return float(np.sum(n_ref / n_ref.sum() * iou))


def np_easiness(logits_s: np.ndarray, logits_t: np.ndarray, tau: float, ignore_class0: bool) -> np.ndarray:
    out = []
    for ls, lt in zip(logits_s, logits_t, strict=True):
        ps = np.exp(ls - ls.max(0)) / np.exp(ls - ls.max(0)).sum(0)
        pt = np.exp(lt - lt.max(0)) / np.exp(lt - lt.max(0)).sum(0)
        ys, yt = ps.argmax(0), pt.argmax(0)
        rho_s, rho_t = (ps.max(0) >= tau).mean(), (pt.max(0) >= tau).mean()
        c = ls.shape[0]
        out.append(0.5 * (np_wiou(ys, yt, c, ignore_class0) * rho_t + np_wiou(yt, ys, c, ignore_class0) * rho_s))
    return np.array(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# wIoU


def test_wiou_hand_case_and_swap_changes_only_weights() -> None:
    ref = torch.tensor([[[1, 1], [2, 2]]])
    pred = torch.tensor([[[1, 2], [2, 2]]])
    # IoU_1 = 1/2, IoU_2 = 2/3 either way; weights (1/2, 1/2) from ref, (1/4, 3/4) from pred.
    w_ref = class_weighted_iou(pred, ref, num_classes=3)
    w_pred = class_weighted_iou(ref, pred, num_classes=3)
    torch.testing.assert_close(w_ref, torch.tensor([0.5 * 0.5 + 0.5 * 2 / 3]))
    torch.testing.assert_close(w_pred, torch.tensor([0.25 * 0.5 + 0.75 * 2 / 3]))
    assert w_ref.dtype == torch.float32 and w_ref.shape == (1,)


def test_wiou_class_present_only_in_pred_enlarges_union() -> None:
    ref = torch.tensor([[[1, 1, 1, 1]]])
    pred = torch.tensor([[[1, 1, 2, 2]]])  # class 2 has no weight but halves IoU_1
    torch.testing.assert_close(class_weighted_iou(pred, ref, 3), torch.tensor([0.5]))


def test_wiou_identical_maps_is_one() -> None:
    maps = torch.randint(0, 4, (3, 7, 9), generator=torch.Generator().manual_seed(0))
    maps[:, 0, 0] = 1  # every image has a non-zero class
    torch.testing.assert_close(class_weighted_iou(maps, maps, 4, ignore_class0=True), torch.ones(3))
    torch.testing.assert_close(class_weighted_iou(maps, maps, 4, ignore_class0=False), torch.ones(3))


def test_wiou_all_class0_reference_is_exactly_zero() -> None:
    ref = torch.zeros(2, 5, 6, dtype=torch.long)
    pred = torch.randint(0, 3, (2, 5, 6), generator=torch.Generator().manual_seed(1))
    for p in (pred, ref):
        out = class_weighted_iou(p, ref, 3, ignore_class0=True)
        assert torch.equal(out, torch.zeros(2))  # exactly 0, no NaN
    # Without the exclusion, identical all-zero maps are a perfect match.
    assert torch.equal(class_weighted_iou(ref, ref, 3, ignore_class0=False), torch.ones(2))


@pytest.mark.parametrize("ignore_class0", [True, False])
def test_wiou_matches_numpy_oracle(ignore_class0: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    pred = torch.randint(0, 5, (6, 8, 11), generator=gen)
    ref = torch.randint(0, 5, (6, 8, 11), generator=gen)
    ref[0] = 0  # the all-background case inside a batch
    ref[1] = torch.where(ref[1] > 2, ref[1], 0)  # sparse classes
    expected = [np_wiou(p.numpy(), r.numpy(), 5, ignore_class0) for p, r in zip(pred, ref, strict=True)]
    torch.testing.assert_close(class_weighted_iou(pred, ref, 5, ignore_class0), torch.tensor(expected))


# ---------------------------------------------------------------------------------------------------------------
# Easiness


def test_identical_models_give_easiness_equal_to_ratio() -> None:
    logits = torch.randn(3, 4, 9, 13, generator=torch.Generator().manual_seed(3)) * 2
    ratio = (logits.softmax(1).amax(1) >= 0.5).float().mean((1, 2))
    e = easiness(logits, logits, threshold=0.5, ignore_class0=False)
    torch.testing.assert_close(e, ratio)  # e = rho, not 1
    assert not torch.allclose(e, torch.ones(3))


def test_identical_models_with_class0_exclusion_and_no_class0_pixels() -> None:
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 3
    logits[:, 0] = -50.0  # class 0 never wins
    ratio = (logits.softmax(1).amax(1) >= 0.7).float().mean((1, 2))
    torch.testing.assert_close(easiness(logits, logits, 0.7, ignore_class0=True), ratio)


def test_easiness_hand_case_and_ge_threshold() -> None:
    labels_s, labels_t = torch.tensor([[[0, 1]]]), torch.tensor([[[1, 1]]])
    conf_s, conf_t = torch.tensor([[[0.9, 0.6]]]), torch.tensor([[[0.7, 0.8]]])  # 0.7 == tau counts (>=)
    # rho_s = 1/2, rho_t = 1; wIoU(pred=s, ref=t) = IoU_1 = 1/2; wIoU(pred=t, ref=s) = (0 + 1/2) / 2 = 1/4.
    e = easiness_from_predictions(labels_s, conf_s, labels_t, conf_t, 0.7, num_classes=2, ignore_class0=False)
    torch.testing.assert_close(e, torch.tensor([0.5 * (0.5 * 1.0 + 0.25 * 0.5)]))


@pytest.mark.parametrize("ignore_class0", [True, False])
def test_easiness_matches_numpy_oracle(ignore_class0: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    logits_s = torch.randn(5, 4, 9, 10, generator=gen) * 2
    logits_t = logits_s + torch.randn(5, 4, 9, 10, generator=gen)
    logits_t[0, 0] += 100  # teacher predicts all class 0 on image 0
    e = easiness(logits_s, logits_t, 0.6, ignore_class0)
    expected = np_easiness(logits_s.double().numpy(), logits_t.double().numpy(), 0.6, ignore_class0)
    torch.testing.assert_close(e, torch.from_numpy(expected))
    assert e.dtype == torch.float32 and e.shape == (5,)
    assert bool(((e >= 0) & (e <= 1)).all())


def test_easiness_in_unit_interval_no_grad_and_wrapper_agrees() -> None:
    gen = torch.Generator().manual_seed(6)
    logits_s = torch.randn(8, 3, 6, 7, generator=gen, requires_grad=True)
    logits_t = torch.randn(8, 3, 6, 7, generator=gen).to(torch.bfloat16)
    e = easiness(logits_s, logits_t.float(), 0.4)
    assert not e.requires_grad
    assert bool(((e >= 0) & (e <= 1)).all())
    conf_s, labels_s = confidence_and_labels(logits_s)
    conf_t, labels_t = confidence_and_labels(logits_t)  # bf16 in, fp32 softmax out
    assert conf_t.dtype == torch.float32 and labels_t.dtype == torch.int64
    e2 = easiness_from_predictions(labels_s, conf_s, labels_t, conf_t, 0.4, 3, True)
    torch.testing.assert_close(e, e2)


# ---------------------------------------------------------------------------------------------------------------
# Pairing


def _stable_oracle(e: list[float]) -> list[int]:
    order = sorted(range(len(e)), key=lambda i: e[i])  # Python's sort is stable
    partner = [0] * len(e)
    for k, i in enumerate(order):
        partner[i] = order[len(e) - 1 - k]
    return partner


def test_hard_easy_partners_random_with_ties() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        b = int(rng.integers(1, 9))
        e = (rng.integers(0, 4, b) / 4).tolist()  # many ties
        partners = hard_easy_partners(torch.tensor(e))
        assert partners.dtype == torch.int64
        assert partners.tolist() == _stable_oracle(e)
        assert torch.equal(partners[partners], torch.arange(b))  # involution
        if b % 2 == 1:
            order = torch.sort(torch.tensor(e), stable=True).indices
            median = int(order[b // 2])
            assert int(partners[median]) == median
            assert int((partners == torch.arange(b)).sum()) == 1  # only the median is unpaired


def test_hard_easy_partners_small_cases() -> None:
    assert hard_easy_partners(torch.tensor([0.9, 0.1])).tolist() == [1, 0]  # B = 2: a swap
    assert hard_easy_partners(torch.tensor([0.2, 0.2])).tolist() == [1, 0]
    assert hard_easy_partners(torch.tensor([0.5, 0.5, 0.5, 0.5])).tolist() == [3, 2, 1, 0]
    assert hard_easy_partners(torch.tensor([0.3, 0.9, 0.1, 0.5])).tolist() == [3, 2, 1, 0]
    assert hard_easy_partners(torch.tensor([0.3, 0.9, 0.1])).tolist() == [0, 2, 1]


def test_random_partners_is_a_seeded_permutation() -> None:
    a = random_partners(6, torch.Generator().manual_seed(0))
    b = random_partners(6, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert sorted(a.tolist()) == list(range(6)) and a.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------------------
# Unsupervised loss


def test_unsupervised_loss_normaliser_counts_masked_pixels() -> None:
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)  # CE = ln 2 at every pixel
    label = torch.zeros(1, 2, 2, dtype=torch.long)
    conf = torch.tensor([[[0.9, 0.1], [0.1, 0.1]]])
    loss = unsupervised_loss(logits, label, conf, threshold=0.7)
    torch.testing.assert_close(loss, torch.tensor(math.log(2) / 4))
    conf_eq = torch.tensor([[[0.7, 0.7], [0.1, 0.1]]])  # >= tau
    torch.testing.assert_close(unsupervised_loss(logits, label, conf_eq, 0.7), torch.tensor(math.log(2) / 2))
    loss.backward()
    assert logits.grad is not None and logits.grad[0, :, 1, 1].abs().sum() == 0  # masked pixel has no gradient


def test_unsupervised_loss_weight_valid_and_oracle() -> None:
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 4, 5, 6, generator=gen, requires_grad=True)
    label = torch.randint(0, 4, (3, 5, 6), generator=gen)
    conf = torch.rand(3, 5, 6, generator=gen)
    weight = torch.tensor([0.2, 0.5, 1.0], requires_grad=True)
    valid = torch.rand(3, 5, 6, generator=gen) > 0.3
    inputs = [t.detach().clone() for t in (logits, label, conf, weight, valid)]

    loss = unsupervised_loss(logits, label, conf, 0.5, weight=weight, valid=valid)
    expected = 0.0
    for i in range(3):
        ce = F.cross_entropy(logits[i : i + 1].detach(), label[i : i + 1], reduction="none")[0]
        keep = (conf[i] >= 0.5) & valid[i]
        expected += float(weight[i].detach()) * float((ce * keep).sum()) / 30
    torch.testing.assert_close(loss, torch.tensor(expected / 3))

    loss_w1 = unsupervised_loss(logits, label, conf, 0.5, valid=valid)
    loss_w2 = unsupervised_loss(logits, label, conf, 0.5, weight=torch.full((3,), 2.0), valid=valid)
    torch.testing.assert_close(loss_w2, 2 * loss_w1)
    loss.backward()
    assert weight.grad is None  # the easiness weight is a constant
    for before, after in zip(inputs, (logits, label, conf, weight, valid), strict=True):
        assert torch.equal(before, after.detach())  # inputs untouched


def test_unsupervised_loss_bf16_logits_give_fp32() -> None:
    logits = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    loss = unsupervised_loss(logits, torch.zeros(2, 4, 4, dtype=torch.long), torch.ones(2, 4, 4), 0.5)
    assert loss.dtype == torch.float32


def test_unsupervised_total_halves_only_when_cutmix_fired() -> None:
    a, b = torch.tensor(0.6), torch.tensor(0.2)
    assert unsupervised_total(a, None) is a
    torch.testing.assert_close(unsupervised_total(a, b), torch.tensor(0.4))


# ---------------------------------------------------------------------------------------------------------------
# Intensity mix and CutMix


def test_intensity_mix_endpoints_and_middle() -> None:
    gen = torch.Generator().manual_seed(9)
    image_s, image_w = torch.randn(3, 3, 5, 4, generator=gen), torch.randn(3, 3, 5, 4, generator=gen)
    out = intensity_mix(image_s, image_w, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(out[0], image_w[0])
    assert torch.equal(out[1], image_s[1])
    torch.testing.assert_close(out[2], 0.25 * image_s[2] + 0.75 * image_w[2])


def test_cutmix_fires_trigger() -> None:
    gen = torch.Generator().manual_seed(10)
    assert not any(cutmix_fires(0.0, gen) for _ in range(200))
    assert all(cutmix_fires(1.0, gen) for _ in range(200))
    rate = sum(cutmix_fires(0.3, gen) for _ in range(2000)) / 2000
    assert abs(rate - 0.3) < 0.05
    seq_a = [cutmix_fires(0.5, torch.Generator().manual_seed(s)) for s in range(20)]
    seq_b = [cutmix_fires(0.5, torch.Generator().manual_seed(s)) for s in range(20)]
    assert seq_a == seq_b


def test_cutmix_boxes_geometry() -> None:
    h, w, lo, hi = 64, 96, 0.1, 0.9
    gen = torch.Generator().manual_seed(11)
    vs = np.arange(lo, hi, 1e-4)
    for _ in range(150):
        boxes = sample_cutmix_boxes(5, h, w, (lo, hi), generator=gen)
        assert boxes.shape == (5, 4) and boxes.dtype == torch.int64
        y0, y1, x0, x1 = boxes.T
        assert bool(((0 <= y0) & (y0 <= y1) & (y1 <= h) & (0 <= x0) & (x0 <= x1) & (x1 <= w)).all())
        # One side ratio v per batch: every v in [lo, hi) consistent with all unclipped boxes.
        full_h = (y0 > 0) & (y1 < h)
        full_w = (x0 > 0) & (x1 < w)
        half_h = {int(v) for v in (y1 - y0)[full_h] // 2}
        half_w = {int(v) for v in (x1 - x0)[full_w] // 2}
        assert len(half_h) <= 1 and len(half_w) <= 1
        ok = np.ones_like(vs, dtype=bool)
        for s in half_h:
            ok &= np.floor(h * vs) // 2 == s
        for s in half_w:
            ok &= np.floor(w * vs) // 2 == s
        assert ok.any()
        # Centres r in [H/16, H-1], c in [W/16, W-1], recovered from an unclipped edge.
        for i in range(5):
            for a0, a1, size, halves in ((y0[i], y1[i], h, half_h), (x0[i], x1[i], w, half_w)):
                if not halves:
                    continue
                half = next(iter(halves))
                centre = int(a0) + half if a0 > 0 else int(a1) - half if a1 < size else None
                if centre is not None:
                    assert size // 16 <= centre <= size - 1


def test_cutmix_boxes_seeded_and_mean_area() -> None:
    a = sample_cutmix_boxes(4, 769, 769, generator=torch.Generator().manual_seed(3))
    b = sample_cutmix_boxes(4, 769, 769, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(12)
    areas = []
    for _ in range(1500):
        boxes = sample_cutmix_boxes(4, 769, 769, generator=gen)
        areas.append(((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).double() / 769**2)
    mean_area = float(torch.cat(areas).mean())
    assert abs(mean_area - 0.22) < 0.02  # docs/algorithm.md §3 step 5: about 22% mixed area at 769²


def test_paste_cutmix_matches_loop_and_leaves_inputs() -> None:
    gen = torch.Generator().manual_seed(13)
    b, h, w = 4, 12, 15
    images = torch.randn(b, 3, h, w, generator=gen)
    labels = torch.randint(0, 5, (b, h, w), generator=gen)
    confs = torch.rand(b, h, w, generator=gen)
    boxes = sample_cutmix_boxes(b, h, w, (0.3, 0.7), generator=gen)
    boxes[3] = torch.tensor([0, 0, 0, 0])  # an empty box: image 3 stays itself
    partners = torch.tensor([2, 3, 0, 1])
    before = [t.clone() for t in (images, labels, confs, boxes, partners)]

    images_cm, labels_cm, confs_cm = paste_cutmix(images, labels, confs, boxes, partners)
    exp_i, exp_l, exp_c = images.clone(), labels.clone(), confs.clone()
    for i in range(b):
        y0, y1, x0, x1 = boxes[i].tolist()
        j = int(partners[i])
        exp_i[i, :, y0:y1, x0:x1] = images[j, :, y0:y1, x0:x1]
        exp_l[i, y0:y1, x0:x1] = labels[j, y0:y1, x0:x1]
        exp_c[i, y0:y1, x0:x1] = confs[j, y0:y1, x0:x1]
    assert torch.equal(images_cm, exp_i) and torch.equal(labels_cm, exp_l) and torch.equal(confs_cm, exp_c)
    assert torch.equal(images_cm[3], images[3])
    for i in range(b):  # the receiver keeps its own pixels outside its box
        y0, y1, x0, x1 = boxes[i].tolist()
        outside = torch.ones(h, w, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert torch.equal(labels_cm[i][outside], labels[i][outside])
    for old, new in zip(before, (images, labels, confs, boxes, partners), strict=True):
        assert torch.equal(old, new)
