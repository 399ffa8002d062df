"""Training loaders scale 16-bit images to 8 bits (value >> 8), like `imas-infer`, and log it once per process."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imas_train.data.sources
from imas_core.errors import DataError
from imas_train.data.labels import index_rule
from imas_train.data.sources import FileSource, Sample
from tests.infer.png16 import gradient16, save_grey16, save_rgb16


def test_file_source_scales_16bit_images_and_logs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(imas_train.data.sources, "_noted_16bit", False)
    grey, rgb = gradient16(7, 9), gradient16(7, 9, channels=3)
    label = tmp_path / "label.png"
    Image.fromarray(np.ones((7, 9), np.uint8)).save(label)
    rule = index_rule(3)
    source = FileSource([
        Sample(save_grey16(tmp_path / "grey.png", grey), label, rule, "grey", "list:1"),
        Sample(save_rgb16(tmp_path / "rgb.png", rgb), label, rule, "rgb", "list:2"),
    ])  # fmt: skip
    caplog.set_level(logging.WARNING, logger="imas_train.data.sources")
    image, mask = source.load(0, with_label=True)
    np.testing.assert_array_equal(image, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2))
    assert mask is not None and (mask == 1).all()
    image, _ = source.load(1, with_label=False)
    np.testing.assert_array_equal(image, (rgb >> 8).astype(np.uint8))
    source.load(0, with_label=False)
    assert [r.getMessage() for r in caplog.records] == [
        f"16-bit images are scaled to 8 bits (value >> 8); first one: {tmp_path / 'grey.png'}"
    ]


def test_images_without_a_known_range_are_refused_by_name(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((2, 3), np.float32), "F").save(tmp_path / "float.tif")
    source = FileSource([Sample(tmp_path / "float.tif", None, None, "float", "list:1")])
    with pytest.raises(DataError, match=f"{tmp_path / 'float.tif'}: floating-point image"):
        source.load(0, with_label=False)
