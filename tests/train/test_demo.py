from __future__ import annotations

import colorsys
import time

import numpy as np
import pytest

from imas_core.classes import DEMO_CLASSES
from imas_train.data.demo import (
    BACKGROUND,
    BOX,
    DISC,
    HUE_FAMILY,
    HUE_SPREAD,
    MIN_CONTRAST,
    NEUTRAL_SATURATION,
    PREFERRED_TEXTURE,
    ROAD,
    TRIANGLE,
    DemoSource,
    Paint,
    _object_colour,
    paint_scene,
    render,
)


def test_render_shapes_and_determinism() -> None:
    image, label = render("labeled", 3, 0, 96, 128)
    assert image.shape == (96, 128, 3) and image.dtype == np.uint8
    assert label.shape == (96, 128) and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(range(len(DEMO_CLASSES)))
    again = render("labeled", 3, 0, 96, 128)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(label, again[1])
    assert not np.array_equal(image, render("labeled", 4, 0, 96, 128)[0])
    assert not np.array_equal(image, render("labeled", 3, 1, 96, 128)[0])


def test_splits_are_different_streams() -> None:
    labeled = {render("labeled", i, 0, 24, 32)[0].tobytes() for i in range(20)}
    unlabeled = {render("unlabeled", i, 0, 24, 32)[0].tobytes() for i in range(20)}
    val = {render("val", i, 0, 24, 32)[0].tobytes() for i in range(20)}
    assert len(labeled) == len(unlabeled) == len(val) == 20
    assert not labeled & unlabeled and not labeled & val and not unlabeled & val
    with pytest.raises(ValueError, match="split"):
        render("train", 0, 0, 8, 8)


def test_every_class_present_in_sensible_proportions() -> None:
    counts = np.zeros(len(DEMO_CLASSES), np.int64)
    for i in range(30):
        counts += np.bincount(render("val", i, 0, 96, 128)[1].ravel(), minlength=len(DEMO_CLASSES))
    share = counts / counts.sum()
    assert share[BACKGROUND] > 0.3 and share[ROAD] > 0.1
    assert min(share[DISC], share[BOX], share[TRIANGLE]) > 0.03  # large objects, every class


def _paints(count: int, size: tuple[int, int] = (96, 128)) -> list[Paint]:
    return [p for i in range(count) for p in paint_scene("unlabeled", i, 0, *size)[2]]


def test_contrast_guarantee() -> None:
    paints = _paints(200) + _paints(50, (24, 40))
    assert {p.cls for p in paints} == {ROAD, DISC, BOX, TRIANGLE}
    assert min(p.contrast for p in paints) >= MIN_CONTRAST
    # the re-draw fallback too: paints over every kind of surface, including the class's own family colour
    rng = np.random.default_rng(0)
    unders = [np.full(3, v, np.float32) for v in np.linspace(0, 1, 11)] + [rng.random(3, dtype=np.float32)]
    unders += [np.array(colorsys.hsv_to_rgb(h, 0.8, 0.8), np.float32) for h in HUE_FAMILY.values()]
    for under in unders:
        for cls in (DISC, BOX, TRIANGLE):
            for _ in range(20):
                assert np.linalg.norm(_object_colour(rng, cls, under) - under) >= MIN_CONTRAST


def test_colour_and_texture_are_partial_cues() -> None:
    objects = [p for p in _paints(300) if p.cls != ROAD]
    hsv = np.array([colorsys.rgb_to_hsv(*p.colour) for p in objects])
    neutral = hsv[:, 1] <= NEUTRAL_SATURATION + 1e-6
    speckle = np.array([p.texture == "speckle" for p in objects])
    assert 0.2 < neutral.mean() < 0.4 and 0.2 < speckle.mean() < 0.4  # OFF_FAMILY = 0.3, independently
    assert (neutral & speckle).mean() > 0.03  # some objects are told apart by their shape alone
    for p, (h, _, _), off in zip(objects, hsv, neutral, strict=True):
        if not off:  # a saturated paint is in its own class's hue family (circular distance)
            assert min(abs(h - HUE_FAMILY[p.cls]), 1 - abs(h - HUE_FAMILY[p.cls])) <= HUE_SPREAD + 1e-3, p
        assert p.texture == "speckle" or p.texture in PREFERRED_TEXTURE[p.cls]


def test_capture_varies_the_background_widely() -> None:
    means = []
    for i in range(30):
        image, label = render("val", i, 0, 96, 128)
        means.append(image[label == BACKGROUND].mean(0))
    assert np.std(np.array(means), axis=0).mean() > 20  # illumination, white balance, haze, gamma differ per image


def test_render_is_fast() -> None:
    render("labeled", 0, 0, 96, 128)
    start = time.perf_counter()
    for i in range(40):
        render("labeled", i, 0, 96, 128)
    per_image = (time.perf_counter() - start) / 40
    assert per_image < 0.02  # ~2 ms on one core; generous bound for a shared machine


def test_demo_source() -> None:
    source = DemoSource("val", 5, seed=0, height=24, width=32)
    image, label = source.load(2, with_label=True)
    np.testing.assert_array_equal(label, render("val", 2, 0, 24, 32)[1])
    assert source.load(2, with_label=False)[1] is None
    assert len(source) == 5 and source.name(2) == "demo_val_00002"
    with pytest.raises(IndexError):
        source.load(5, with_label=True)
