"""`imas_core.images`: the shared decoder (EXIF orientation, 16 bits) and the label rule for turned images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from imas_core.images import UnknownRange, apply_orientation, decode_rgb, orient_label
from tests.infer.png16 import gradient16, save_grey16, save_rgb16


def save_tagged(path: Path, rgb: np.ndarray, orientation: int, fmt: str = "PNG") -> Path:
    """An image file whose EXIF Orientation tag is `orientation` (lossless PNG unless `fmt` says otherwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, format=fmt, exif=exif)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_what_pillow_and_viewers_show(tmp_path: Path, orientation: int) -> None:
    stored = np.random.default_rng(orientation).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = save_tagged(tmp_path / "tagged.png", stored, orientation)
    with Image.open(path) as img:
        shown = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    decoded = decode_rgb(path)
    np.testing.assert_array_equal(decoded.rgb, shown)
    assert decoded.rgb.flags.c_contiguous and decoded.rgb.flags.writeable
    assert decoded.stored_hw == (5, 7) and decoded.orientation == orientation and decoded.bits == 8
    np.testing.assert_array_equal(apply_orientation(stored, orientation), shown)
    off = decode_rgb(path, exif_orientation=False)  # the switch: stored pixels, no turn recorded
    np.testing.assert_array_equal(off.rgb, stored)
    assert off.orientation == 1


def test_a_label_turns_with_its_image_only_when_drawn_on_the_stored_pixels(tmp_path: Path) -> None:
    stored = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    decoded = decode_rgb(save_tagged(tmp_path / "cam.png", stored, 6))  # rotate 90 clockwise: 6x4 shown
    assert decoded.rgb.shape == (6, 4, 3)
    drawn_on_stored = np.arange(24, dtype=np.uint8).reshape(4, 6)
    turned = orient_label(drawn_on_stored, decoded.orientation, decoded.stored_hw)
    np.testing.assert_array_equal(turned, np.rot90(drawn_on_stored, -1))
    drawn_on_shown = np.arange(24, dtype=np.uint8).reshape(6, 4)
    assert orient_label(drawn_on_shown, decoded.orientation, decoded.stored_hw) is drawn_on_shown
    untagged = decode_rgb(save_tagged(tmp_path / "plain.png", stored, 1))
    assert orient_label(drawn_on_stored, untagged.orientation, untagged.stored_hw) is drawn_on_stored


def test_16bit_images_keep_the_high_byte_and_unknown_ranges_are_refused(tmp_path: Path) -> None:
    grey, rgb = gradient16(3, 4), gradient16(3, 4, channels=3)
    decoded = decode_rgb(save_grey16(tmp_path / "g.png", grey))
    np.testing.assert_array_equal(decoded.rgb, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2))
    assert decoded.bits == 16
    np.testing.assert_array_equal(decode_rgb(save_rgb16(tmp_path / "c.png", rgb)).rgb, (rgb >> 8).astype(np.uint8))
    Image.fromarray(np.zeros((2, 3), np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(UnknownRange, match="floating-point"):
        decode_rgb(tmp_path / "float.tif")
