"""Parity and calibration images are decoded like training and `imas-infer` decode them (`imas_core.images`):
16-bit files keep their high byte instead of being clipped, and the EXIF orientation is applied."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imas_export.samples import load_files
from tests.infer.png16 import gradient16, save_grey16, save_rgb16


def test_16bit_images_keep_the_high_byte(tmp_path: Path) -> None:
    grey, rgb = gradient16(6, 8), gradient16(6, 8, channels=3)
    samples = load_files([save_grey16(tmp_path / "g.png", grey), save_rgb16(tmp_path / "c.png", rgb)], (6, 8))
    np.testing.assert_array_equal(samples.images[0], np.repeat((grey >> 8).astype(np.uint8)[None], 3, axis=0))
    np.testing.assert_array_equal(samples.images[1], (rgb >> 8).astype(np.uint8).transpose(2, 0, 1))


def test_exif_orientation_is_applied_to_the_image_and_its_stored_size_label(tmp_path: Path) -> None:
    stored = np.random.default_rng(0).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8  # shown rotated 90 degrees counter-clockwise: 8x6
    Image.fromarray(stored).save(tmp_path / "cam.png", exif=exif)
    (tmp_path / "labels").mkdir()
    mask = (np.arange(48).reshape(6, 8) % 3).astype(np.uint8)
    Image.fromarray(mask).save(tmp_path / "labels" / "cam.png")
    samples = load_files([tmp_path / "cam.png"], (8, 6), tmp_path / "labels")
    np.testing.assert_array_equal(samples.images[0], np.rot90(stored, 1).transpose(2, 0, 1))
    assert samples.labels is not None
    np.testing.assert_array_equal(samples.labels[0], np.rot90(mask, 1))
