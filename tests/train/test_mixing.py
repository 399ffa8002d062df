"""Mixing blocks (U2PL.md §2.B, §7; CPS.md §2.B, §7; DualTeacher.md §2, §7): boxes, partners, ClassMix, entropy and
a percentile that must equal numpy's bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imas_train.mixing import (
    box_mask,
    class_mix,
    class_mix_mask,
    cyclic_partners,
    mask_mix,
    paste_from_partners,
    permutation_partners,
    sample_beta_boxes,
    sample_cps_boxes,
    sample_u2pl_boxes,
    toggled_box_mask,
    u2pl_cutmix,
)
from imas_train.pixel_stats import entropy, percentile


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 1] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 2])


def assert_inside(boxes: torch.Tensor, height: int, width: int) -> None:
    y0, y1, x0, x1 = boxes.unbind(-1)
    assert bool(((0 <= y0) & (y0 <= y1) & (y1 <= height) & (0 <= x0) & (x0 <= x1) & (x1 <= width)).all())


# ---------------------------------------------------------------------------------------------------------------
# Partners


def test_cyclic_partner_is_next_image() -> None:
    assert cyclic_partners(5).tolist() == [1, 2, 3, 4, 0]
    assert cyclic_partners(1).tolist() == [0]


def test_permutation_partners() -> None:
    p = permutation_partners(7, gen())
    assert sorted(p.tolist()) == list(range(7))
    assert torch.equal(p, permutation_partners(7, gen()))
    assert permutation_partners(2, gen(), swap_pair=True).tolist() == [1, 0]
    assert sorted(permutation_partners(3, gen(), swap_pair=True).tolist()) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------
# U2PL: 50 % box, partner k + 1


def test_u2pl_box_rule_and_half_area() -> None:
    h, w = 769, 769
    boxes = sample_u2pl_boxes(2000, h, w, gen())
    assert boxes.dtype == torch.int64 and boxes.shape == (2000, 4)
    assert_inside(boxes, h, w)
    widths, heights = boxes[:, 3] - boxes[:, 2], boxes[:, 1] - boxes[:, 0]
    assert int(widths.min()) >= w // 2 + 1 and int(widths.max()) <= w - 1
    expected_h = [round(h * w / 2 / int(bw)) for bw in widths]  # Python round = half to even, as np.round
    assert heights.tolist() == expected_h
    fraction = box_area(boxes).double() / (h * w)
    assert float(fraction.min()) >= 0.499 and float(fraction.max()) <= 0.501  # U2PL.md §7 oracle 10
    assert bool(((box_area(boxes) - h * w / 2).abs() <= widths / 2).all())


def test_u2pl_box_covers_the_whole_width_range_on_a_small_image() -> None:
    boxes = sample_u2pl_boxes(500, 6, 9, gen())
    assert set((boxes[:, 3] - boxes[:, 2]).tolist()) == {5, 6, 7, 8}
    assert_inside(boxes, 6, 9)
    with pytest.raises(ValueError, match="W >= 3"):
        sample_u2pl_boxes(1, 4, 2, gen())


def test_u2pl_cutmix_takes_the_next_image_inside_the_box() -> None:
    b, h, w = 3, 20, 24
    images = torch.arange(b).view(b, 1, 1, 1).expand(b, 3, h, w).float()
    labels = torch.arange(b).view(b, 1, 1).expand(b, h, w).clone()
    confs = torch.rand(b, h, w, generator=gen(5))
    images_cm, labels_cm, confs_cm = u2pl_cutmix(images, labels, confs, gen(1))
    mask = box_mask(sample_u2pl_boxes(b, h, w, gen(1)), h, w)
    assert torch.allclose(mask.float().mean((1, 2)), torch.full((b,), 0.5), atol=0.5 / h)
    for k in range(b):
        nxt = (k + 1) % b
        assert bool((labels_cm[k][mask[k]] == nxt).all()) and bool((labels_cm[k][~mask[k]] == k).all())
        assert bool((images_cm[k][:, mask[k]] == nxt).all()) and bool((images_cm[k][:, ~mask[k]] == k).all())
        assert torch.equal(confs_cm[k], torch.where(mask[k], confs[nxt], confs[k]))


# ---------------------------------------------------------------------------------------------------------------
# CPS: three toggled boxes


def test_cps_boxes_area_and_bounds() -> None:
    h, w = 512, 512
    boxes = sample_cps_boxes(400, h, w, gen())
    assert boxes.shape == (400, 3, 4) and boxes.dtype == torch.int64
    assert_inside(boxes, h, w)
    fraction = box_area(boxes).double() / (h * w)
    tol = 0.5 * (h + w) / (h * w) + 0.25 / (h * w)  # sides rounded to the nearest pixel
    assert float(fraction.min()) >= 0.25 / 3 - tol and float(fraction.max()) <= 0.5 / 3 + tol
    assert float(fraction.min()) < 0.09 and float(fraction.max()) > 0.16  # the range is used


def test_single_box_with_fixed_proportion_covers_p() -> None:
    boxes = sample_cps_boxes(50, 200, 300, gen(), n_boxes=1, prop_range=(0.25, 0.25))
    fraction = box_area(boxes).double() / (200 * 300)
    assert torch.allclose(fraction, torch.full_like(fraction, 0.25), atol=0.005)  # CPS.md §7 oracle 5


def test_toggled_mask_is_xor_of_boxes() -> None:
    h, w = 40, 50
    boxes = sample_cps_boxes(16, h, w, gen(3))
    mask = toggled_box_mask(boxes, h, w)
    m0, m1, m2 = (box_mask(boxes[:, j], h, w) for j in range(3))
    assert mask.dtype == torch.bool and mask.shape == (16, h, w)
    assert torch.equal(mask, m0 ^ m1 ^ m2)
    two = torch.tensor([[[0, 10, 0, 10], [5, 15, 5, 15]]])  # overlap [5, 10)² toggles back to 0
    toggled = toggled_box_mask(two, 20, 20)[0]
    assert not bool(toggled[5:10, 5:10].any()) and bool(toggled[0:5, 0:10].all())
    assert int(toggled.sum()) == 2 * 100 - 2 * 25


def test_cps_mixed_fraction_statistics() -> None:
    fraction = toggled_box_mask(sample_cps_boxes(400, 128, 128, gen()), 128, 128).float().mean((1, 2))
    assert 0.23 < float(fraction.mean()) < 0.27  # CPS.md §2.B: mean 0.25, max < 0.5
    assert float(fraction.max()) < 0.5


def test_cps_mix_logits_then_argmax_equals_mixed_argmax() -> None:
    g = gen(2)
    mask = toggled_box_mask(sample_cps_boxes(2, 16, 16, g), 16, 16)
    a, b = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    assert torch.equal(mask_mix(mask, b, a).argmax(1), mask_mix(mask, b.argmax(1), a.argmax(1)))  # CPS.md §7 4
    assert torch.equal(mask_mix(torch.zeros_like(mask), b, a), a)


# ---------------------------------------------------------------------------------------------------------------
# Dual Teacher: Beta(4, 4) box


def test_beta_box_statistics_and_bounds() -> None:
    g = gen()
    boxes = torch.cat([sample_beta_boxes(1, 512, 512, g) for _ in range(3000)])
    assert_inside(boxes, 512, 512)
    fraction = (box_area(boxes).double() / 512**2).numpy()
    assert 0.34 < fraction.mean() < 0.38  # DualTeacher.md §7 oracle 5: mean 0.36, p10 0.19, p90 0.54
    p10, p90 = np.percentile(fraction, [10, 90])
    assert 0.17 < p10 < 0.22 and 0.51 < p90 < 0.57
    assert int(boxes[:, 0].max()) < 512 and int(boxes[:, 1].min()) > 512 // 8  # centres in [H/8, H)


def test_beta_box_one_size_per_batch() -> None:
    boxes = sample_beta_boxes(64, 512, 512, gen(4))
    interior = (boxes[:, 0] > 0) & (boxes[:, 1] < 512) & (boxes[:, 2] > 0) & (boxes[:, 3] < 512)
    sides = boxes[interior][:, [1, 3]] - boxes[interior][:, [0, 2]]
    assert len(sides) > 1 and len(set(sides.flatten().tolist())) == 1  # one λ, square crop: equal even sides
    assert int(sides[0, 0]) % 2 == 0
    with pytest.raises(ValueError, match="positive integers"):
        sample_beta_boxes(1, 8, 8, gen(), alpha=0)


# ---------------------------------------------------------------------------------------------------------------
# ClassMix


def test_class_mix_mask_picks_half_of_the_present_classes() -> None:
    g = gen(6)
    labels = torch.randint(0, 21, (8, 24, 24), generator=g)
    labels[:, :4] = 255
    labels[1] = 3  # n = 1: nothing chosen
    labels[2, :, 12:] = 7  # image 2: classes 5 and 7 and an ignore block
    labels[2, 4:, :12] = 5
    mask = class_mix_mask(labels, g)
    for k in range(8):
        present = set(labels[k].unique().tolist()) - {255}
        chosen = set(labels[k][mask[k]].unique().tolist())
        assert len(chosen) == len(present) // 2 and chosen <= present
        assert torch.equal(mask[k], torch.isin(labels[k], torch.tensor(sorted(chosen), dtype=labels.dtype)))
        assert not bool(mask[k][labels[k] == 255].any())
    assert not bool(mask[1].any())
    assert int(mask[2].sum()) in (24 * 12, 20 * 12)


def test_class_mix_mask_counts_five_classes_as_two() -> None:
    labels = torch.arange(5).repeat_interleave(4).view(1, 4, 5)
    assert len(labels[0][class_mix_mask(labels, gen())[0]].unique()) == 2  # DualTeacher.md §7 oracle 3


def test_class_mix_keeps_own_pixels_inside_and_mixes_probabilities() -> None:
    g = gen(8)
    probs = torch.randn(2, 5, 10, 10, generator=g).softmax(1)
    conf, labels = probs.max(1)
    images = torch.randn(2, 3, 10, 10, generator=g)
    mask = class_mix_mask(labels, g)
    partners = permutation_partners(2, g, swap_pair=True)
    images_m, probs_m, conf_m, labels_m = class_mix(mask, partners, images, probs, conf, labels)
    assert torch.equal(images_m[0], torch.where(mask[0], images[0], images[1]))
    q_conf, q_labels = probs_m.max(1)  # argmax of the mixed probabilities = the mixed argmax (M is binary)
    assert torch.equal(q_conf, conf_m) and torch.equal(q_labels, labels_m)
    all_true = torch.ones_like(mask)
    assert torch.equal(class_mix(all_true, partners, labels)[0], labels)  # DualTeacher.md §7 oracle 4


def test_paste_from_partners_leaves_unmixed_tensors_alone() -> None:
    labels = torch.arange(3).view(3, 1, 1).expand(3, 4, 4)
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    (out,) = paste_from_partners(mask, torch.tensor([2, 0, 1]), labels)
    assert out[0, :2].eq(2).all() and out[0, 2:].eq(0).all()
    with pytest.raises(ValueError, match="does not match"):
        mask_mix(mask[:, :3], labels, labels)


# ---------------------------------------------------------------------------------------------------------------
# Entropy


def test_entropy_uniform_and_one_hot() -> None:
    c = 19
    uniform = torch.full((2, c, 3, 4), 1.0 / c)
    assert torch.allclose(entropy(uniform), torch.full((2, 3, 4), math.log(c)))
    one_hot = torch.nn.functional.one_hot(torch.randint(0, c, (2, 3, 4), generator=gen()), c).permute(0, 3, 1, 2)
    assert bool((entropy(one_hot.float()) == 0).all())  # exactly 0 in float32 (U2PL.md §7 oracle 1)
    probs = torch.randn(2, 6, 5, generator=gen()).softmax(2)
    expected = -(probs * torch.log(probs + 1e-10)).sum(2)
    torch.testing.assert_close(entropy(probs, dim=2), expected)
    with pytest.raises(ValueError, match="floating"):
        entropy(torch.ones(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# Percentile = np.percentile (linear), bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_percentile_equals_numpy(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 10, 999, 4097):
        x = torch.from_numpy(rng.standard_normal(size)).to(dtype)
        if size > 10:
            x[: size // 3] = torch.round(x[: size // 3] * 2)  # ties
        qs = [0, 100, 50, 0.1, 99.9, 33.3, 80, *rng.uniform(0, 100, 20).tolist()]
        for q in qs:
            ours, ref = percentile(x, q), np.percentile(x.numpy(), q)
            assert ours.shape == () and ours.numpy().dtype == ref.dtype
            assert ours.item() == ref, (size, q)
        ours_list, ref_list = percentile(x, qs), np.percentile(x.numpy(), qs)
        assert ours_list.numpy().dtype == ref_list.dtype == np.float64
        np.testing.assert_array_equal(ours_list.numpy(), ref_list)


def test_percentile_with_valid_mask_and_any_shape() -> None:
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((2, 17, 19)).astype(np.float32))
    valid = torch.from_numpy(rng.random((2, 17, 19)) < 0.3)
    for q in (0, 20, 80, 100, 63.7):
        assert percentile(x, q, valid).item() == np.percentile(x.numpy()[valid.numpy()], q)
    np.testing.assert_array_equal(
        percentile(x, [0, 100], valid).numpy(), np.percentile(x.numpy()[valid.numpy()], [0, 100])
    )
    np.testing.assert_array_equal(percentile(x, torch.tensor([5.0, 95.0])).numpy(), np.percentile(x.numpy(), [5, 95]))
    assert math.isnan(percentile(x, 50, torch.zeros_like(valid)).item())


def test_percentile_drops_exactly_the_top_alpha() -> None:
    ent = torch.randperm(1000, generator=gen()).float() / 1000  # 1000 distinct entropies (U2PL.md §7 oracle 3)
    theta = percentile(ent, 100 - 20.0)
    assert int((ent >= theta).sum()) == 200
    same = torch.full((50,), 0.3)
    assert percentile(same, 80.0).item() == np.float32(0.3) and bool((same >= percentile(same, 80.0)).all())


def test_percentile_nan_inf_and_errors() -> None:
    for values in ([1.0, math.nan, 2.0], [0.0, math.inf], [-math.inf, 0.0]):
        x = torch.tensor(values, dtype=torch.float64)
        with np.errstate(invalid="ignore"):
            ref = np.percentile(x.numpy(), [0, 10, 50, 100])
        np.testing.assert_array_equal(percentile(x, [0, 10, 50, 100]).numpy(), ref)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile(torch.ones(3), 101)
    with pytest.raises(ValueError, match="float32 or float64"):
        percentile(torch.ones(3, dtype=torch.int64), 50)
    with pytest.raises(ValueError, match="shaped like x"):
        percentile(torch.ones(3), 50, torch.ones(2, dtype=torch.bool))
