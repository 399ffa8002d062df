"""Finding input images, decoding them, and writing every output file atomically.

Inputs (`discover_inputs`) are a file, a directory (searched recursively), a glob, or a `.txt` list with one path
per line; the order is deterministic (sorted paths; a list keeps its own order). Each input keeps its path relative
to the input root, and outputs mirror it: `<output>/<kind>/<relative dir>/<name>`.

Output files (`output_path`), one folder per kind:
* `labels/<stem>.png`: train ids, 8-bit greyscale.
* `cityscapes-ids/<city>_<seq>_<frame>_pred_labelIds.png`: official label ids. cityscapesscripts'
  evalPixelLevelSemanticLabeling.py pairs a ground truth `<city>_<seq>_<frame>_gtFine_labelIds.png` with the one
  file under CITYSCAPES_RESULTS matching `<city>_<seq>_<frame>*.png`, so point CITYSCAPES_RESULTS at this folder
  (the `labels/` files match the same pattern and would count twice). Non-Cityscapes stems get `_pred_labelIds`
  appended.
* `color/<stem>.png`: the palette colours; `overlay/<stem>.jpg`: colours blended over the image.
* `probs/<stem>.npy`: (C, H, W) float16 average class probabilities.
Every file is written to a temporary name in its folder and renamed into place, so readers never see a partial
file (no fsync: the outputs are reproducible, durability after a power cut is not worth the time). The output
folder is checked before the model is loaded (`check_output_folder`), so an unwritable one fails at once.

Images are decoded by `imas_core.images.decode_rgb`, the decoder training and export use too: 16-bit inputs are
scaled to 8 bits by keeping the high byte (value >> 8), and the EXIF orientation is applied (``--no-exif-orientation``
turns that off), so a phone or dash-cam JPEG is segmented the way a viewer shows it and every output is written in
that orientation.
"""

from __future__ import annotations

import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Protocol, TypeVar

import numpy as np
from PIL import Image

from imas_core import images
from imas_core.atomic import FolderIsAFile, atomic_write, probe_writable
from imas_core.errors import InferError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit"
_PNG_COMPRESS_LEVEL = 1  # label maps compress well even at level 1, and encoding stays off the critical path
_EXTENSION = {"labels": ".png", "cityscapes-ids": ".png", "color": ".png", "overlay": ".jpg", "probs": ".npy"}


@dataclass(frozen=True)
class InputItem:
    """One input image: where it is and where its outputs go (relative to the output root of each kind)."""

    path: Path
    rel: Path  # relative path used to mirror the input tree, e.g. frankfurt/frankfurt_000000_000294_leftImg8bit.png


def discover_inputs(spec: str) -> tuple[Path, list[InputItem]]:
    """Resolve an --input value into (root, items).

    Raises:
        InferError: nothing exists at `spec`, no image matched, or two inputs would write the same output.
    """
    path = Path(spec)
    if path.is_dir():
        root = path
        files = sorted(
            (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
            key=lambda p: p.relative_to(root).as_posix(),
        )
    elif path.is_file() and path.suffix.lower() == ".txt":
        files = [Path(os.path.abspath(f)) for f in _read_list(path)]
        root = _common_root(files)
    elif path.is_file():
        root, files = path.parent, [path]
    elif glob.has_magic(spec):
        files = sorted(Path(os.path.abspath(p)) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        files = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        root = _common_root(files)
    else:
        raise InferError(f"--input {spec}: no such file, directory or glob match")
    if not files:
        raise InferError(f"--input {spec}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return root, refuse_colliding_outputs([InputItem(f, f.relative_to(root)) for f in files])


class _Listed(Protocol):
    @property
    def rel(self) -> PurePath: ...
    @property
    def path(self) -> object: ...


_Item = TypeVar("_Item", bound=_Listed)


def refuse_colliding_outputs(items: list[_Item]) -> list[_Item]:
    """`items` unchanged, or an error naming two inputs that would write the same outputs (same relative path but
    for the extension: ``a/x.png`` and ``a/x.jpg``). Items have ``.rel`` (relative path) and ``.path``."""
    seen: dict[PurePath, object] = {}
    for item in items:
        key = item.rel.with_suffix("")
        if key in seen:
            raise InferError(f"inputs {seen[key]} and {item.path} would write the same outputs; rename one")
        seen[key] = item.path
    return items


def _read_list(list_file: Path) -> list[Path]:
    files = []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = Path(line) if Path(line).is_absolute() else list_file.parent / line
        if not entry.is_file():
            raise InferError(f"{list_file}:{number}: {entry} does not exist")
        files.append(entry)
    return files


def _common_root(files: list[Path]) -> Path:
    """Deepest folder containing all files (their own folder for a single file)."""
    if not files:
        return Path(".")
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def check_output_folder(folder: Path, what: str = "--output") -> None:
    """Create `folder` if needed and prove it writable by creating and removing a file in it (permission bits say
    nothing for root, read-only mounts or full quotas).

    Raises:
        InferError: `folder` is an existing file, cannot be created, or refuses a new file (the OS reason named).
    """
    try:
        probe_writable(folder)
    except FolderIsAFile as err:
        raise InferError(f"{what} {folder} is an existing file, not a folder") from err
    except OSError as err:
        raise InferError(f"{what} {folder} is not writable: {err.strerror or err}") from err


def decode_rgb(path: Path, *, exif_orientation: bool = True) -> tuple[np.ndarray, int]:
    """Decode an image as (H, W, 3) uint8 RGB, and its bits per channel on file (8 or 16).

    Greyscale, palette and alpha images are converted; 16-bit values v become v >> 8; with `exif_orientation` the
    EXIF orientation is applied (`imas_core.images`).

    Raises:
        OSError / ValueError (from Pillow): unreadable, truncated or not an image. ValueError also for a 32-bit
            integer image with values beyond 0..65535 and a floating-point image (mode F): no known range.
    """
    decoded = images.decode_rgb(path, exif_orientation=exif_orientation)
    return decoded.rgb, decoded.bits


def read_rgb(path: Path, *, exif_orientation: bool = True) -> np.ndarray:
    """`decode_rgb`'s image alone."""
    return decode_rgb(path, exif_orientation=exif_orientation)[0]


def output_path(root: Path, kind: str, rel: Path) -> Path:
    """Where output `kind` of the input at relative path `rel` goes (see the module docstring)."""
    stem = rel.stem
    if kind == "cityscapes-ids":
        base = stem[: -len(CITYSCAPES_IMAGE_SUFFIX)] if stem.endswith(CITYSCAPES_IMAGE_SUFFIX) else stem
        name = f"{base}_pred_labelIds.png"
    else:
        name = stem + _EXTENSION[kind]
    return root / kind / rel.parent / name


def write_png(path: Path, array: np.ndarray) -> None:
    """(H, W) uint8 -> 8-bit greyscale PNG; (H, W, 3) uint8 -> RGB PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    atomic_write(path, lambda fh: fh.write(buf.getbuffer()), fsync=False)


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="JPEG", quality=quality)
    atomic_write(path, lambda fh: fh.write(buf.getbuffer()), fsync=False)


def write_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False), fsync=False)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; `palette` is (256, 3) uint8 (ids without a colour are black)."""
    return palette[labels]


def blend(image: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """alpha * colour + (1 - alpha) * image, rounded, uint8."""
    mixed = alpha * color.astype(np.float32) + (1.0 - alpha) * image.astype(np.float32)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def palette_table(palette: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """(256, 3) uint8 lookup table from a per-class palette."""
    table = np.zeros((256, 3), dtype=np.uint8)
    if palette:
        table[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    return table
