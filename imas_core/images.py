"""The one image decoder of training, export and inference: 8-bit RGB, 16-bit inputs and EXIF orientation.

Pillow is imported inside `decode_rgb`, so ``imas_core`` stays importable without it.

**16 bits.** Values v become v >> 8 (the high byte): Pillow does this itself for 16-bit RGB(A) PNGs, and 16-bit
greyscale (which Pillow's ``convert("RGB")`` would clip at 255) gets the same rule. 32-bit integer images with values
beyond 0..65535 and floating-point images (mode F) have no known 8-bit range and are refused.

**EXIF orientation.** Phones and dash cams store pixels as the sensor read them and an EXIF ``Orientation`` tag (1-8)
saying how a viewer must turn them. With ``exif_orientation=True`` (the default of every command) the tag is applied,
so images are segmented, and outputs written, the way a viewer shows them; `apply_orientation` is the transpose,
on any (H, W, ...) array. Label masks (PNGs) normally carry no EXIF. The rule for a label paired with an image
(`orient_label`): the image's transpose is applied to the label only if the image had an orientation tag other than
1 AND the label has the image's size as stored in the file (before the transpose), i.e. the mask was drawn on the
stored pixels; a label that already has the turned size, or any label of an untagged image, is used as it is.
Orientations 2-4 keep the size, so a same-size label of such an image is always transposed with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DecodedImage", "UnknownRange", "apply_orientation", "decode_rgb", "orient_label"]

WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's 16-bit greyscale modes, and 32-bit integer
EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image and what the file said about it."""

    rgb: np.ndarray  # (H, W, 3) uint8 RGB, writable and C-contiguous; display orientation when `orientation` != 1
    bits: int  # bits per channel on file: 8 or 16
    orientation: int  # the EXIF orientation applied: 1 = none (no tag, tag 1, or application switched off)
    stored_hw: tuple[int, int]  # (H, W) of the pixels as stored in the file, before the orientation


class UnknownRange(ValueError):
    """The image decodes, but its values have no known 8-bit range (32-bit integers beyond 65535, floats)."""


def _packed_16bit(img: Any) -> bool:
    """True for a file Pillow unpacks from 16 bits per channel into an 8-bit mode (16-bit RGB(A) PNGs)."""
    return any(isinstance(tile[3], str) and ";16" in tile[3] for tile in img.tile)


def _orientation(img: Any) -> int:
    """The EXIF orientation tag of an open image, 1 when absent or invalid."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block must not make the pixels unreadable  # noqa: BLE001
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an (H, W, ...) array as a viewer shows a file with EXIF `orientation` (Pillow's ``exif_transpose``).

    Returns a C-contiguous array ((W, H, ...) for orientations 5-8); orientation 1 returns `array` itself.
    """
    turn = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1],  # mirrored top-bottom
        5: lambda a: a.swapaxes(0, 1),  # transposed (main diagonal)
        6: lambda a: np.rot90(a, -1),  # rotated 90 clockwise
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],  # transversed (anti-diagonal)
        8: lambda a: np.rot90(a, 1),  # rotated 90 counter-clockwise
    }[orientation]
    return array if orientation == 1 else np.ascontiguousarray(turn(array))


def orient_label(label: np.ndarray, orientation: int, stored_hw: tuple[int, int]) -> np.ndarray:
    """`label` (H, W) turned like its image when the module docstring's rule says so, else `label` itself.

    Args:
        label: the mask as stored in its file.
        orientation, stored_hw: the image's `DecodedImage.orientation` and `DecodedImage.stored_hw`.
    """
    if orientation != 1 and tuple(label.shape[:2]) == tuple(stored_hw):
        return apply_orientation(label, orientation)
    return label


def decode_rgb(path: Path | str, *, exif_orientation: bool = True) -> DecodedImage:
    """Decode an image fully as RGB uint8; 16-bit values keep their high byte; EXIF orientation applied if asked.

    Raises:
        OSError, ValueError, SyntaxError (from Pillow): missing, unreadable, truncated or not an image.
        UnknownRange (a ValueError): a 32-bit integer image with values beyond 0..65535, a floating-point image.
    """
    from PIL import Image  # here, not at module level: imas_core imports without Pillow

    with Image.open(path) as img:
        bits = 16 if img.mode in WIDE_GREY_MODES or _packed_16bit(img) else 8
        orientation = _orientation(img) if exif_orientation else 1
        img.load()  # decode fully here, so a truncated file fails in the caller (a reader thread, a worker)
        if img.mode in WIDE_GREY_MODES:
            values = np.asarray(img)
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise UnknownRange(f"{img.mode} image with values outside 0..65535; save it with 8 or 16 bits")
            grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
            rgb = np.repeat(grey[..., None], 3, axis=2)
        elif img.mode == "F":
            raise UnknownRange("floating-point image (mode F) has no known value range; save it with 8 or 16 bits")
        else:
            rgb = np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)  # a writable copy
    stored_hw = (int(rgb.shape[0]), int(rgb.shape[1]))
    return DecodedImage(apply_orientation(rgb, orientation), bits, orientation, stored_hw)
