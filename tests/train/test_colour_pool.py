"""Colour strong pool and Cutout of ST++ / UniMatch / Dual Teacher (STPlusPlus.md §2.D item 3, §7 oracle 6)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from imas_train.colour_pool import (
    adjust_hue,
    apply_colour_strong,
    colour_jitter,
    colour_strong,
    cutout,
    gaussian_blur,
    grayscale,
    sample_colour_strong,
    sample_cutout_box,
)


def image(seed: int = 0, shape: tuple[int, int] = (33, 47)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_colour_strong_keeps_shape_dtype_and_is_deterministic() -> None:
    img = image()
    for seed in range(8):
        out = colour_strong(img, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_array_equal(out, colour_strong(img, np.random.default_rng(seed)))
    assert not np.array_equal(
        colour_strong(img, np.random.default_rng(1)), colour_strong(img, np.random.default_rng(2))
    )
    np.testing.assert_array_equal(img, image())  # the input is not modified


def test_number_of_draws_does_not_depend_on_the_outcome() -> None:
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    colour_strong(image(0), rng_a, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    colour_strong(image(1), rng_b, jitter_p=1.0, grayscale_p=1.0, blur_p=1.0)
    assert rng_a.random() == rng_b.random()


def test_sampled_parameters_follow_the_reference_distribution() -> None:
    rng = np.random.default_rng(0)
    draws = [sample_colour_strong(rng) for _ in range(4000)]
    fired = [d.factors for d in draws if d.factors is not None]
    assert abs(len(fired) / 4000 - 0.8) < 0.03
    assert abs(np.mean([d.grayscale for d in draws]) - 0.2) < 0.03
    sigmas = [d.blur_sigma for d in draws if d.blur_sigma is not None]
    assert abs(len(sigmas) / 4000 - 0.5) < 0.03 and 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    factors = np.array(fired)
    assert (factors[:, :3] >= 0.5).all() and (factors[:, :3] <= 1.5).all()
    assert (np.abs(factors[:, 3]) <= 0.25).all() and factors[:, 3].min() < -0.2 and factors[:, 3].max() > 0.2
    assert all(sorted(d.order) == [0, 1, 2, 3] for d in draws)
    assert len({d.order for d in draws}) == 24  # every order occurs (torchvision shuffles the four ops)


def test_forced_grayscale_has_equal_channels() -> None:
    img = image(4)
    out = colour_strong(img, np.random.default_rng(0), grayscale_p=1.0, blur_p=0.0)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    gray = grayscale(img)
    np.testing.assert_array_equal(gray[..., 1], np.array(Image.fromarray(img).convert("L")))
    assert (gray[..., 0] == gray[..., 2]).all()


def test_jitter_applies_pil_ops_in_the_drawn_order() -> None:
    img = image(5)
    factors = (1.3, 0.6, 1.4, 0.0)
    skip = (False, False, False, True)
    pil = Image.fromarray(img)
    expected = ImageEnhance.Brightness(ImageEnhance.Color(ImageEnhance.Contrast(pil).enhance(0.6)).enhance(1.4))
    np.testing.assert_array_equal(colour_jitter(img, factors, (1, 2, 0, 3), skip), np.array(expected.enhance(1.3)))
    np.testing.assert_array_equal(colour_jitter(img, (1.0, 1.0, 1.0, 0.0), skip=(False, False, False, True)), img)
    assert not colour_jitter(img, (0.0, 1.0, 1.0, 0.0), skip=skip).any()  # brightness 0 is black


def test_hue_shift_wraps_pil_hsv() -> None:
    red = Image.fromarray(np.array([[[255, 0, 0]]], dtype=np.uint8))
    assert np.array(adjust_hue(red, 1 / 3)).tolist() == [[[0, 255, 0]]]  # +int(85) on PIL's 0..255 hue circle
    shifted = adjust_hue(red, -1 / 3)  # int(-85) wraps to 171, just past blue (170)
    assert np.array(shifted.convert("HSV")).tolist() == [[[171, 255, 255]]]
    gray = Image.fromarray(np.full((4, 4, 3), 77, dtype=np.uint8))
    np.testing.assert_array_equal(np.array(adjust_hue(gray, 0.25)), np.array(gray))
    with pytest.raises(ValueError, match="hue factor"):
        adjust_hue(red, 0.6)


def test_blur_is_pil_gaussian_blur() -> None:
    img = image(6)
    expected = np.array(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=1.3)))
    np.testing.assert_array_equal(gaussian_blur(img, 1.3), expected)
    draw = sample_colour_strong(np.random.default_rng(0), jitter_p=0.0, grayscale_p=0.0, blur_p=1.0)
    assert draw.blur_sigma is not None
    np.testing.assert_array_equal(apply_colour_strong(img, draw), gaussian_blur(img, draw.blur_sigma))


def test_bad_arguments_raise() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="hue"):
        colour_strong(image(), rng, hue=0.6)
    with pytest.raises(ValueError, match="brightness"):
        colour_strong(image(), rng, brightness=-0.1)
    with pytest.raises(ValueError, match="RGB uint8"):
        colour_strong(image().astype(np.float32), rng)


def test_cutout_ignore_mask_covers_exactly_the_cut_region() -> None:
    img = np.full((40, 60, 3), 255, dtype=np.uint8)  # fill values are 0..254, so every cut pixel changes
    for seed in range(20):
        out, ignore = cutout(img, np.random.default_rng(seed), p=1.0)
        assert out.dtype == np.uint8 and out.shape == img.shape and ignore.shape == (40, 60)
        np.testing.assert_array_equal((out != img).any(axis=2), ignore)
        rows, cols = np.nonzero(ignore.any(axis=1))[0], np.nonzero(ignore.any(axis=0))[0]
        assert ignore[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # one rectangle
        label = np.zeros((40, 60), dtype=np.uint8)
        label[ignore] = 255
        assert (label == 255).sum() == ignore.sum()
    again = cutout(img, np.random.default_rng(7), p=1.0)
    np.testing.assert_array_equal(again[0], cutout(img, np.random.default_rng(7), p=1.0)[0])


def test_cutout_probability_zero_changes_nothing() -> None:
    img = image(1)
    out, ignore = cutout(img, np.random.default_rng(0), p=0.0)
    np.testing.assert_array_equal(out, img)
    assert not ignore.any()
    fired = [cutout(img, np.random.default_rng(s))[1].any() for s in range(400)]
    assert abs(np.mean(fired) - 0.5) < 0.08


def test_cutout_box_area_and_aspect_ranges() -> None:
    rng = np.random.default_rng(0)
    h, w = 321, 321
    boxes = np.array([sample_cutout_box(h, w, rng) for _ in range(2000)])
    heights, widths = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    assert (
        (boxes[:, 0] >= 0).all() and (boxes[:, 1] <= h).all() and (boxes[:, 2] >= 0).all() and (boxes[:, 3] <= w).all()
    )
    area = heights * widths
    assert (area <= 0.4 * h * w).all() and (area >= 0.02 * h * w - heights - widths - 1).all()  # truncated sides
    ratio = heights / widths
    assert ratio.min() > 0.3 * 0.9 and ratio.max() < (1 / 0.3) * 1.1
    with pytest.raises(ValueError, match="fits"):
        sample_cutout_box(2, 2000, rng, max_attempts=50)
