"""Resolve split-list entries to files, and load them: Cityscapes, Pascal VOC and custom folder datasets.

A `Sample` names the image, the label (or None) and the `LabelRule` that decodes it. `FileSource` is the
file-backed implementation of the source interface the datasets read from (`demo.DemoSource` is the other).

Images are decoded by `decode_rgb`, through the decoder inference and export use too (`imas_core.images`): 16-bit
images are scaled to 8 bits by keeping the high byte (value >> 8), the rule Pillow itself applies to 16-bit RGB PNGs,
so 16-bit greyscale and 16-bit colour files map alike; the first 16-bit image a process reads is logged once.
Nothing is clipped: 32-bit integer images beyond 16 bits and floating-point images are refused with the file named.

EXIF orientation (``data.exif_orientation``, default true): an image is turned as a viewer shows it, and its label
is turned with it only if the image had an orientation tag and the label has the image's stored (unturned) size,
i.e. the mask was drawn on the stored pixels; otherwise the label is used as it is and must match the turned image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np
from PIL import Image

from imas_core import images
from imas_core.errors import DataError
from imas_core.images import DecodedImage, orient_label
from imas_train.config import DataConfig
from imas_train.data.labels import (
    LabelRule,
    cityscapes_label_ids_rule,
    folder_rule,
    index_rule,
    read_label,
)
from imas_train.data.lists import ListEntry

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_CITY_IMAGE_SUFFIX = "_leftImg8bit.png"
_noted_16bit = False  # the first 16-bit image of this process has been logged


def decode_rgb(path: Path | str, *, exif_orientation: bool = True) -> DecodedImage:
    """Decode an image fully as RGB uint8 (H, W, 3) with `imas_core.images.decode_rgb` (16-bit values v become
    v >> 8; the EXIF orientation applied when `exif_orientation`), with its bits, orientation and stored size.

    Raises:
        DataError: the file is missing or undecodable, a 32-bit integer image has values beyond 0..65535, or the
            image holds floating-point values (mode F: no known range).
    """
    try:
        return images.decode_rgb(path, exif_orientation=exif_orientation)
    except FileNotFoundError as err:
        raise DataError(f"{path}: image not found") from err
    except images.UnknownRange as err:
        raise DataError(f"{path}: {err}") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot decode image ({err})") from err


def read_image(path: Path | str, *, exif_orientation: bool = True) -> DecodedImage:
    """`decode_rgb`; the first 16-bit image of this process is logged (once per process)."""
    global _noted_16bit
    decoded = decode_rgb(path, exif_orientation=exif_orientation)
    if decoded.bits == 16 and not _noted_16bit:
        _noted_16bit = True
        log.warning(f"16-bit images are scaled to 8 bits (value >> 8); first one: {path}")
    return decoded


class Source(Protocol):
    """What the datasets read: decoded images and labels by index."""

    def __len__(self) -> int: ...

    def load(self, index: int, *, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 (H, W, 3) and, when asked, the label uint8 (H, W) with class indices and 255."""
        ...

    def name(self, index: int) -> str:
        """A short unique name for outputs (no extension)."""
        ...


@dataclass(frozen=True)
class Sample:
    """One resolved entry. `where` is `list:line` for messages."""

    image: Path
    label: Path | None
    rule: LabelRule | None
    name: str
    where: str
    exif_orientation: bool = True  # apply the image's EXIF orientation (data.exif_orientation)


class FileSource:
    """Samples read from disk with Pillow."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, *, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
        sample = self.samples[index]
        decoded = read_image(sample.image, exif_orientation=sample.exif_orientation)
        image = decoded.rgb
        if not with_label:
            return image, None
        if sample.label is None or sample.rule is None:
            raise DataError(f"{sample.where}: no label for {sample.image}")
        label = orient_label(read_label(sample.label, sample.rule), decoded.orientation, decoded.stored_hw)
        if label.shape != image.shape[:2]:
            raise DataError(
                f"{sample.label}: label size {label.shape[1]}x{label.shape[0]} differs from image size "
                f"{image.shape[1]}x{image.shape[0]} ({sample.image})"
            )
        return image, label

    def name(self, index: int) -> str:
        return self.samples[index].name


def _is_path(token: str) -> bool:
    return "/" in token or "\\" in token or PurePosixPath(token).suffix.lower() in IMAGE_SUFFIXES


def _first_existing(*paths: Path) -> Path:
    """The first existing path, else the first one (reported as missing when it is read or checked)."""
    return next((p for p in paths if p.is_file()), paths[0])


class Resolver:
    """Turns list entries into Samples for one configured dataset (the label path rules of each format)."""

    def __init__(self, cfg: DataConfig, num_classes: int) -> None:
        if cfg.dataset not in ("cityscapes", "voc", "folder"):
            raise DataError(f"dataset {cfg.dataset!r} has no files to resolve")
        if cfg.root is None:
            raise DataError(f"data.root is required for dataset {cfg.dataset!r}")
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.index_rule = index_rule(num_classes)
        self.label_ids_rule = cityscapes_label_ids_rule()
        self.folder_rule = folder_rule(num_classes, cfg.ignore_values, cfg.value_remap)

    def __call__(self, entry: ListEntry, *, with_label: bool) -> Sample:
        """Resolve one entry; raises DataError naming `list:line` when no label path can be derived."""
        resolve = {"cityscapes": self._cityscapes, "voc": self._voc, "folder": self._folder}[self.cfg.dataset]
        image, label, rule = resolve(entry, with_label)
        name = PurePosixPath(entry.tokens[0]).stem if _is_path(entry.tokens[0]) else entry.tokens[0]
        return Sample(image, label if with_label else None, rule if with_label else None, name, entry.where,
                      self.cfg.exif_orientation)  # fmt: skip

    def _explicit(self, entry: ListEntry, rule: LabelRule) -> tuple[Path, Path | None, LabelRule | None]:
        return self.root / entry.tokens[0], self.root / entry.tokens[1], rule

    def _cityscapes(self, entry: ListEntry, with_label: bool) -> tuple[Path, Path | None, LabelRule | None]:
        image = entry.tokens[0]
        if len(entry.tokens) == 2:  # explicit label: labelIds vs labelTrainIds decided by the file name
            ids = entry.tokens[1].endswith("_labelIds.png")
            return self._explicit(entry, self.label_ids_rule if ids else self.index_rule)
        if not with_label:
            return self.root / image, None, None
        parts = PurePosixPath(image.replace("\\", "/")).parts
        if "leftImg8bit" not in parts or not image.endswith(_CITY_IMAGE_SUFFIX):
            raise DataError(
                f"{entry.where}: cannot derive the Cityscapes label of {image!r}; expected "
                f"leftImg8bit/<split>/<city>/<name>{_CITY_IMAGE_SUFFIX}, or give the label path as a second token"
            )
        k = parts.index("leftImg8bit")
        stem = parts[-1][: -len(_CITY_IMAGE_SUFFIX)]
        folder = self.root.joinpath(*parts[:k], "gtFine", *parts[k + 1 : -1])
        train_ids = folder / f"{stem}_gtFine_labelTrainIds.png"
        label_ids = folder / f"{stem}_gtFine_labelIds.png"
        if not train_ids.is_file() and label_ids.is_file():  # converted on the fly through the official table
            return self.root / image, label_ids, self.label_ids_rule
        return self.root / image, train_ids, self.index_rule

    def _voc(self, entry: ListEntry, with_label: bool) -> tuple[Path, Path | None, LabelRule | None]:
        if len(entry.tokens) == 2:
            return self._explicit(entry, self.index_rule)
        token = entry.tokens[0]
        if _is_path(token):
            image, stem = self.root / token, PurePosixPath(token).stem
        else:
            image, stem = self.root / "JPEGImages" / f"{token}.jpg", token
        if not with_label:
            return image, None, None
        label = _first_existing(
            self.root / "SegmentationClassAug" / f"{stem}.png", self.root / "SegmentationClass" / f"{stem}.png"
        )
        return image, label, self.index_rule

    def _folder(self, entry: ListEntry, with_label: bool) -> tuple[Path, Path | None, LabelRule | None]:
        if len(entry.tokens) == 2:
            return self._explicit(entry, self.folder_rule)
        token = entry.tokens[0]
        image_dir = self.root / self.cfg.image_dir
        if _is_path(token):
            image, stem = self.root / token, PurePosixPath(token).stem
        else:  # a bare stem: any image suffix in image_dir
            image, stem = _first_existing(*(image_dir / f"{token}{s}" for s in IMAGE_SUFFIXES)), token
        sub = PurePosixPath()  # mirror sub-folders of image_dir under mask_dir
        rel = PurePosixPath(token.replace("\\", "/"))
        if _is_path(token) and rel.parent.is_relative_to(PurePosixPath(self.cfg.image_dir)):
            sub = rel.parent.relative_to(PurePosixPath(self.cfg.image_dir))
        label = self.root / self.cfg.mask_dir / sub / f"{stem}{self.cfg.mask_suffix}"
        return (image, label, self.folder_rule) if with_label else (image, None, None)


def pair_folder(root: Path, image_dir: str = "images", mask_dir: str = "masks", mask_suffix: str = ".png") -> list[str]:
    """List lines `image mask` (relative to root) for every image in `root/image_dir` with a mask of the same
    stem in `root/mask_dir`, sorted; feed them to `lists.make_splits` to create split lists."""
    images = sorted(p for p in (root / image_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    lines = []
    for img in images:
        rel = img.relative_to(root / image_dir)
        mask = root / mask_dir / rel.parent / f"{img.stem}{mask_suffix}"
        if mask.is_file():
            lines.append(f"{img.relative_to(root).as_posix()} {mask.relative_to(root).as_posix()}")
    return lines
