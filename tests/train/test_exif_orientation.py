"""Training reads images as viewers show them (EXIF orientation, `data.exif_orientation: true`), with the label
turned too when it was drawn on the stored pixels (it has their size), and used as it is otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imas_core.errors import DataError
from imas_train.data.lists import ListEntry
from imas_train.data.sources import FileSource, Resolver
from tests.train.data_fixtures import data_config, rgb, save


def _phone_png(path: Path, stored: np.ndarray, orientation: int = 6) -> None:
    """A lossless image tagged with an EXIF orientation (6: shown rotated 90 degrees clockwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif)


def _load(root: Path, name: str, **cfg: object) -> tuple[np.ndarray, np.ndarray | None]:
    resolver = Resolver(data_config("folder", root, class_names=("a", "b", "c"), **cfg), 3)  # type: ignore[arg-type]
    sample = resolver(ListEntry((name,), Path("list.txt"), 1), with_label=True)
    return FileSource([sample]).load(0, with_label=True)


def test_images_and_stored_size_labels_are_turned_and_the_switch_turns_it_off(tmp_path: Path) -> None:
    stored, mask = rgb(4, 6, 0), (np.arange(24).reshape(4, 6) % 3).astype(np.uint8)
    _phone_png(tmp_path / "images" / "cam.png", stored)
    save(tmp_path / "masks" / "cam.png", mask)  # drawn on the stored 4x6 pixels, as most tools do
    image, label = _load(tmp_path, "cam")
    np.testing.assert_array_equal(image, np.rot90(stored, -1))
    np.testing.assert_array_equal(label, np.rot90(mask, -1))  # pixel-aligned with the turned image
    image, label = _load(tmp_path, "cam", exif_orientation=False)
    np.testing.assert_array_equal(image, stored)
    np.testing.assert_array_equal(label, mask)


def test_a_label_already_in_the_shown_orientation_is_used_as_it_is(tmp_path: Path) -> None:
    stored, shown_mask = rgb(4, 6, 1), (np.arange(24).reshape(6, 4) % 3).astype(np.uint8)
    _phone_png(tmp_path / "images" / "cam.png", stored)
    save(tmp_path / "masks" / "cam.png", shown_mask)  # 6x4: drawn on what a viewer shows
    image, label = _load(tmp_path, "cam")
    assert image.shape == (6, 4, 3)
    np.testing.assert_array_equal(label, shown_mask)
    with pytest.raises(DataError, match="differs from image size"):  # stored pixels, turned label: refused
        _load(tmp_path, "cam", exif_orientation=False)
