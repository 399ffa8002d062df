"""Real-looking images for parity checks and int8 calibration: a folder of photos, or the procedural demo set.

Images come back as raw RGB uint8 (N, 3, H, W) at exactly the window size (for stitched models: the image size):
an image at least as large as the window is centre-cropped at native resolution (what a sliding window sees); a
smaller one is first resized up (bilinear; labels nearest) so it covers the window. Labels are uint8 (N, H, W),
255 = ignore.

Files are decoded by `imas_core.images.decode_rgb`, as in training and `imas-infer`: 16-bit images keep their high
byte (value >> 8) instead of being clipped, and the EXIF orientation is applied (a label is turned with its image
by the rule of `imas_core.images.orient_label`), so parity and calibration see the pixels inference will see.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imas_core.classes import DEMO_CLASSES
from imas_core.errors import DataError, ExportError
from imas_core.images import decode_rgb, orient_label
from imas_export.options import MIN_CALIBRATION_IMAGES, OnnxExportOptions

_log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEMO_CALIBRATION_IMAGES = 16  # demo calibration is a smoke test of the pipeline, not a calibration


@dataclass(frozen=True)
class Samples:
    """A batch of window-sized images (and labels when known), with where they came from."""

    images: np.ndarray  # (N, 3, H, W) uint8 raw RGB
    labels: np.ndarray | None  # (N, H, W) uint8, 255 = ignore
    names: list[str]
    source: str  # "demo:val" or the folder path

    def __len__(self) -> int:
        return int(self.images.shape[0])


def list_images(directory: Path) -> list[Path]:
    """Image files directly inside `directory`, sorted by name; raises DataError when there are none."""
    if not directory.is_dir():
        raise DataError(f"image folder not found: {directory}")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def fit_to_window(image: Image.Image, window: tuple[int, int], resample: int) -> Image.Image:
    """Resize up only when needed so the image covers `window` (H, W), then centre-crop to it."""
    wh, ww = window
    w, h = image.size
    scale = max(wh / h, ww / w)
    if scale > 1.0:
        w, h = max(ww, round(w * scale)), max(wh, round(h * scale))
        image = image.resize((w, h), resample=resample)
    top, left = (h - wh) // 2, (w - ww) // 2
    return image.crop((left, top, left + ww, top + wh))


def load_files(
    files: Sequence[Path],
    window: tuple[int, int],
    labels_dir: Path | None = None,
    source: str = "",
) -> Samples:
    """Read `files` fitted to `window` and, with `labels_dir`, the label PNG of the same stem for each."""
    images, labels = [], []
    for path in files:
        try:
            decoded = decode_rgb(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: cannot decode image ({err})") from err
        rgb = fit_to_window(Image.fromarray(decoded.rgb), window, Image.Resampling.BILINEAR)
        images.append(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
        if labels_dir is not None:
            label_path = labels_dir / f"{path.stem}.png"
            if not label_path.is_file():
                raise DataError(f"{label_path}: no label for image {path.name} (labels are <image stem>.png)")
            with Image.open(label_path) as lab:
                if lab.mode not in ("L", "P"):
                    raise DataError(f"{label_path}: labels must be single-channel class-index PNGs, got {lab.mode}")
                raw = orient_label(np.array(lab, dtype=np.uint8), decoded.orientation, decoded.stored_hw)
            lab_fit = fit_to_window(Image.fromarray(raw), window, Image.Resampling.NEAREST)
            labels.append(np.asarray(lab_fit, dtype=np.uint8))
    return Samples(
        images=np.stack(images),
        labels=np.stack(labels) if labels_dir is not None else None,
        names=[p.name for p in files],
        source=source or (str(files[0].parent) if files else ""),
    )


def load_folder(
    directory: Path,
    window: tuple[int, int],
    limit: int | None = None,
    labels_dir: Path | None = None,
) -> Samples:
    """The first `limit` images of `directory` (sorted by name), with labels from `labels_dir` when given."""
    return load_files(list_images(directory)[:limit], window, labels_dir, str(directory))


def demo_samples(
    window: tuple[int, int],
    count: int,
    split: str = "val",
    class_names: Sequence[str] = DEMO_CLASSES,
) -> Samples:
    """`count` images of the procedural demo dataset (split 'labeled', 'unlabeled' or 'val') at the window size.

    Labels are returned only when `class_names` are the demo classes: for any other model they mean nothing.
    """
    try:
        from imas_train.data.demo import render  # tier 2, imported only when demo images are needed
    except ImportError as err:
        raise DataError(f"the demo dataset is unavailable ({err}); pass an image folder instead") from err
    images, labels = [], []
    for index in range(count):
        image, label = render(split, index, 0, window[0], window[1])
        images.append(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
        labels.append(np.asarray(label, dtype=np.uint8))
    names = [f"demo-{split}-{i:04d}" for i in range(count)]
    known = tuple(class_names) == tuple(DEMO_CLASSES)
    return Samples(np.stack(images), np.stack(labels) if known else None, names, f"demo:{split}")


def parity_samples(options: OnnxExportOptions, window: tuple[int, int], class_names: list[str]) -> Samples:
    """The parity images at `window` (H, W): --images when given, else the demo validation set."""
    p = options.parity
    if p.images_dir is not None:
        return load_folder(p.images_dir, window, p.num_images, p.labels_dir)
    return demo_samples(window, p.num_images, "val", class_names)


def calibration_samples(
    options: OnnxExportOptions, window: tuple[int, int], class_names: list[str]
) -> tuple[Samples, Samples]:
    """(calibration images, held-out evaluation images) for int8, at `window` (H, W: whole images if stitched)."""
    p = options.parity
    if options.calib_dir is None:
        _log.warning(
            "int8 without --calib-dir: calibrating on %d DEMO images, whose activation ranges do not match real "
            "data; the accuracy figures below say nothing about your dataset. Pass --calib-dir with %d+ images",
            DEMO_CALIBRATION_IMAGES,
            MIN_CALIBRATION_IMAGES,
        )
        calibration = demo_samples(window, DEMO_CALIBRATION_IMAGES, "unlabeled", class_names)
        return calibration, parity_samples(options, window, class_names)
    eval_dir = options.eval_dir or p.images_dir
    if eval_dir is not None:
        calibration = load_folder(options.calib_dir, window, options.calib_images)
        held = load_folder(eval_dir, window, p.num_images, p.labels_dir)
    else:  # hold out the last 20% of the (sorted) calibration folder
        files = list_images(options.calib_dir)[: options.calib_images]
        if len(files) < 2:
            raise ExportError(f"{options.calib_dir}: int8 needs at least 2 images (calibration + hold-out)")
        cut = len(files) - max(1, len(files) // 5)
        calibration = load_files(files[:cut], window, None, str(options.calib_dir))
        held_files = files[cut:][: p.num_images]  # -n bounds the (CPU) torch reference work
        held = load_files(held_files, window, p.labels_dir, f"hold-out (last 20%) of {options.calib_dir}")
    if len(calibration) < MIN_CALIBRATION_IMAGES:
        _log.warning(
            "int8 calibration on only %d images (< %d): activation ranges may be noisy; use more images",
            len(calibration),
            MIN_CALIBRATION_IMAGES,
        )
    return calibration, held
