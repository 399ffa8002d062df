from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from imas_core.constants import IMAGENET_MEAN, IMAGENET_STD, PAD_RGB
from imas_train import augment
from imas_train.augment import (
    STRONG_OPS,
    WeakAugment,
    apply_strong_ops,
    normalise_images,
    op_param,
    resize_shape,
    sample_strong_ops,
    to_chw_uint8,
)
from imas_train.data.datasets import LabeledDataset, UnlabeledDataset
from imas_train.data.demo import DemoSource

U_MAX = 1.0 - 1e-12
GEOMETRY = {"scale_range": (0.5, 2.0), "base_size": (1024, 2048), "long_side_range": (250, 1000)}


class FixedDraw(random.Random):
    """random() returns a fixed u; randint returns a fixed integer."""

    def __init__(self, u: float = 0.0, integer: int = 0) -> None:
        super().__init__(0)
        self.u, self.integer = u, integer

    def random(self) -> float:
        return self.u

    def randint(self, a: int, b: int) -> int:
        assert a <= self.integer <= b
        return self.integer


def test_resize_rules() -> None:
    # fixed_base: s = 0.5 + 1.5 u, (floor(1024 s), floor(2048 s)), whatever the input size
    assert resize_shape("fixed_base", 10, 20, FixedDraw(0.0), **GEOMETRY) == (512, 1024)
    assert resize_shape("fixed_base", 10, 20, FixedDraw(0.5), **GEOMETRY) == (1280, 2560)
    assert resize_shape("fixed_base", 10, 20, FixedDraw(0.1677), **GEOMETRY) == (
        math.floor(1024 * (0.5 + 1.5 * 0.1677)),
        math.floor(2048 * (0.5 + 1.5 * 0.1677)),
    )
    # long_side: long side drawn, short = floor(long * short0 / long0 + 0.5)
    assert resize_shape("long_side", 375, 500, FixedDraw(integer=250), **GEOMETRY) == (188, 250)  # 187.5 -> 188
    assert resize_shape("long_side", 500, 333, FixedDraw(integer=1000), **GEOMETRY) == (1000, 666)
    draws = [resize_shape("long_side", 375, 500, random.Random(s), **GEOMETRY)[1] for s in range(200)]
    assert min(draws) >= 250 and max(draws) <= 1000 and len(set(draws)) > 100
    # relative: s times the input size
    assert resize_shape("relative", 96, 128, FixedDraw(0.0), **GEOMETRY) == (48, 64)
    assert resize_shape("relative", 96, 128, FixedDraw(U_MAX), **GEOMETRY) == (192, 256)


def _coordinate_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy, xx, (yy * 7 + xx * 3) % 256], axis=-1).astype(np.uint8)


def test_weak_view_is_a_window_of_the_input_with_aligned_label() -> None:
    image = _coordinate_image(60, 80)
    label = ((np.mgrid[0:60, 0:80][0] + np.mgrid[0:60, 0:80][1]) % 200).astype(np.uint8)
    weak = WeakAugment(crop_size=32, scale_mode="relative", scale_range=(1.0, 1.0), base_size=(1, 1),
                       long_side_range=(1, 1))  # fmt: skip
    flips = set()
    for seed in range(12):
        view = weak(image, label, np.random.default_rng(seed))
        assert view.valid.all() and view.image.shape == (32, 32, 3) and view.label is not None
        rows, cols = view.image[..., 0].astype(int), view.image[..., 1].astype(int)
        assert (np.diff(rows, axis=0) == 1).all() and (np.diff(rows, axis=1) == 0).all()
        step = np.diff(cols, axis=1)
        assert (step == 1).all() or (step == -1).all()
        flips.add(int(step[0, 0]))
        np.testing.assert_array_equal(view.label, (rows + cols) % 200)  # label follows the image exactly
    assert flips == {1, -1}


def test_valid_mask_false_exactly_on_padding() -> None:
    image = np.full((20, 24, 3), PAD_RGB, np.uint8)  # content in the pad colour: valid must not be colour-based
    label = np.ones((20, 24), np.uint8)
    weak = WeakAugment(crop_size=32, scale_mode="relative", scale_range=(1.0, 1.0), base_size=(1, 1),
                       long_side_range=(1, 1))  # fmt: skip
    view = weak(image, label, np.random.default_rng(0))
    expected = np.zeros((32, 32), bool)
    expected[:20, :24] = True  # padding goes bottom/right
    np.testing.assert_array_equal(view.valid, expected)
    assert view.label is not None
    assert (view.label[~expected] == 255).all() and (view.label[expected] == 1).all()
    assert (view.image[~expected] == PAD_RGB).all()
    # with a random resize and crop, valid is still exactly where the label is not padding
    lab = np.zeros((48, 64), np.uint8)
    weak = WeakAugment(crop_size=40, scale_mode="relative", scale_range=(0.3, 1.2), base_size=(1, 1),
                       long_side_range=(1, 1))  # fmt: skip
    for seed in range(10):
        view = weak(np.zeros((48, 64, 3), np.uint8), lab, np.random.default_rng(seed))
        assert view.label is not None
        np.testing.assert_array_equal(view.valid, view.label != 255)
        rows, cols = view.valid.any(1), view.valid.any(0)  # valid is a top-left rectangle of the crop
        np.testing.assert_array_equal(view.valid, np.outer(rows, cols))
        assert (np.diff(rows.astype(int)) <= 0).all() and (np.diff(cols.astype(int)) <= 0).all()


def test_label_pad_value_marks_padding_with_a_class() -> None:
    """U2PL's reference pads labels with class 0: the padded region gets the value, the image's labels stay."""
    image, label = np.zeros((20, 24, 3), np.uint8), np.full((20, 24), 3, np.uint8)
    geometry = {"scale_range": (1.0, 1.0), "base_size": (1, 1), "long_side_range": (1, 1)}
    view = WeakAugment(crop_size=32, scale_mode="relative", label_pad=0, **geometry)(
        image, label, np.random.default_rng(0)
    )
    assert view.label is not None and (~view.valid).sum() == 32 * 32 - 20 * 24
    assert (view.label[~view.valid] == 0).all() and (view.label[view.valid] == 3).all()


def test_weak_seeded_determinism() -> None:
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    weak = WeakAugment(crop_size=32, scale_mode="relative", **GEOMETRY)
    a, b = weak(image, None, np.random.default_rng(7)), weak(image, None, np.random.default_rng(7))
    np.testing.assert_array_equal(a.image, b.image)
    assert a.label is None
    others = [weak(image, None, np.random.default_rng(s)).image for s in range(8, 12)]
    assert not any(np.array_equal(a.image, o) for o in others)


def test_strong_op_parameter_ranges() -> None:
    lo = {name: op_param(name, 0.0) for name in STRONG_OPS}
    hi = {name: op_param(name, U_MAX) for name in STRONG_OPS}
    for name in ("identity", "autocontrast", "equalize", "invert"):
        assert lo[name] is None and STRONG_OPS[name].magnitude_range is None
    assert lo["blur"] == pytest.approx(0.1) and 1.99 < hi["blur"] < 2.0
    for name in ("contrast", "brightness", "color", "sharpness"):
        assert lo[name] == pytest.approx(0.95) and 0.10 < hi[name] < 0.11
    assert lo["hue"] == 0.0 and hi["hue"] == pytest.approx(0.4995)
    assert op_param("hue", U_MAX, negative=True) == pytest.approx(-0.4995)
    assert lo["posterize"] == 7 and hi["posterize"] == 4
    assert lo["solarize"] == 256 and hi["solarize"] == 1
    grid = np.linspace(0.0, U_MAX, 1001)
    assert {op_param("posterize", u) for u in grid} == {4, 5, 6, 7}
    assert all(1 <= op_param("solarize", u) <= 256 for u in grid)
    assert op_param("solarize", 0.5) == 256 - math.ceil(255 * 0.5 * 0.999)


def test_strong_ops_pixel_maths() -> None:
    image = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    np.testing.assert_array_equal(apply_strong_ops(image, [("identity", None), ("identity", None)]), image)
    np.testing.assert_array_equal(apply_strong_ops(image, [("invert", None)]), 255 - image)
    np.testing.assert_array_equal(apply_strong_ops(image, [("solarize", 256)]), image)  # 256 is a no-op
    np.testing.assert_array_equal(apply_strong_ops(image, [("posterize", 4)]), image & 0xF0)
    grey = np.full((4, 4, 3), 100, np.uint8)
    np.testing.assert_array_equal(apply_strong_ops(grey, [("brightness", 0.5)]), np.full((4, 4, 3), 50))
    hsv = np.array(Image.fromarray(image).convert("HSV")).astype(int)
    shifted = np.array(Image.fromarray(apply_strong_ops(image, [("hue", -0.3)])).convert("HSV")).astype(int)
    delta = (shifted[..., 0] - hsv[..., 0]) % 256
    assert np.median(delta) == (int(-0.3 * 255)) % 256  # trunc toward zero: -76
    for name in STRONG_OPS:
        out = apply_strong_ops(image, [(name, op_param(name, 0.6))])
        assert out.shape == image.shape and out.dtype == np.uint8


def test_sample_strong_ops_with_replacement() -> None:
    ops = [sample_strong_ops(np.random.default_rng(s)) for s in range(300)]
    assert all(len(o) == 2 for o in ops)
    assert {o[0][0] for o in ops} == set(STRONG_OPS)
    assert any(o[0][0] == o[1][0] for o in ops)  # drawn with replacement
    assert sample_strong_ops(np.random.default_rng(5)) == sample_strong_ops(np.random.default_rng(5))


def test_workers_return_uint8_and_the_device_normalises() -> None:
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 1] = (255, 128, 0)
    chw = to_chw_uint8(image)
    assert chw.shape == (3, 2, 3) and chw.dtype == torch.uint8 and chw.is_contiguous()
    x = normalise_images(torch.stack([chw, chw]))
    assert x.shape == (2, 3, 2, 3) and x.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(x[1, :, 0, 1], torch.tensor(expected))
    # bit-identical to normalising one image at a time on the CPU, as the workers did before
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    one = (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 - mean) / std
    assert torch.equal(x[0], one)


def _denorm(x: torch.Tensor) -> np.ndarray:
    """A dataset's uint8 (3, H, W) image as (H, W, 3)."""
    assert x.dtype == torch.uint8
    return x.permute(1, 2, 0).numpy()


def _demo_weak() -> tuple[DemoSource, WeakAugment]:
    source = DemoSource("unlabeled", 4, seed=0, height=48, width=64)
    return source, WeakAugment(crop_size=56, scale_mode="relative", **GEOMETRY)


def test_unlabeled_strong_view_aligned_with_weak(monkeypatch: pytest.MonkeyPatch) -> None:
    source, weak = _demo_weak()
    ds = UnlabeledDataset(source, weak)
    monkeypatch.setattr(augment, "sample_strong_ops", lambda rng, n=2: [("identity", None)] * n)
    item = ds[(1, 99)]
    torch.testing.assert_close(item["image_s"], item["image_w"])
    monkeypatch.setattr(augment, "sample_strong_ops", lambda rng, n=2: [("invert", None), ("identity", None)])
    item = ds[(1, 99)]
    np.testing.assert_array_equal(_denorm(item["image_s"]), 255 - _denorm(item["image_w"]))
    assert item["valid"].dtype == torch.bool and item["valid"].shape == (56, 56)
    assert (_denorm(item["image_w"])[~item["valid"].numpy()] == PAD_RGB).all()


def test_datasets_seeded_determinism_and_shared_weak_geometry() -> None:
    source, weak = _demo_weak()
    ds_u = UnlabeledDataset(source, weak)
    a, b, c = ds_u[(2, 11)], ds_u[(2, 11)], ds_u[(2, 12)]
    for key in ("image_w", "image_s", "valid"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["image_w"], c["image_w"])
    ds_l = LabeledDataset(DemoSource("unlabeled", 4, seed=0, height=48, width=64), weak)
    item = ds_l[(2, 11)]  # same seed: the labeled pipeline draws the same weak geometry first
    assert torch.equal(item["image"], a["image_w"]) and int(item["index"]) == 2
    assert torch.equal(item["label"] == 255, ~a["valid"])
