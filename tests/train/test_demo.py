from __future__ import annotations

import time

import numpy as np
import pytest

from imas_train.classes import DEMO_CLASSES
from imas_train.data.demo import BOX, DISC, ROAD, TRIANGLE, DemoSource, render


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


def test_every_class_present_and_colour_does_not_identify_class() -> None:
    counts = np.zeros(len(DEMO_CLASSES), np.int64)
    mean_colours: dict[int, list[np.ndarray]] = {c: [] for c in range(len(DEMO_CLASSES))}
    for i in range(30):
        image, label = render("val", i, 0, 96, 128)
        counts += np.bincount(label.ravel(), minlength=len(DEMO_CLASSES))
        for c in np.unique(label):
            mean_colours[int(c)].append(image[label == c].mean(0))
    assert (counts > 0).all()
    assert counts[ROAD] > 0.05 * counts.sum() and min(counts[DISC], counts[BOX], counts[TRIANGLE]) > 0.01 * counts.sum()
    for c, colours in mean_colours.items():
        assert np.std(np.array(colours), axis=0).mean() > 25, DEMO_CLASSES[c]  # widely spread colours per class


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
