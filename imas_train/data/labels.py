"""Decoding label maps. Labels are read as RAW indices and mapped through a 256-entry table.

A label PNG must be single-channel: mode L (grey) or P (palette), or 1 (binary). `np.array` on a palette image
returns its indices; `convert("L")` would turn palette colours into luminance and corrupt every label
(docs/algorithm.md §5.1), so nothing here converts a label's mode.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imas_core.classes import cityscapes_label_to_train_table
from imas_core.constants import IGNORE_INDEX
from imas_core.errors import ConfigError, DataError

INVALID = -1  # table entry of a raw value that is neither a class nor ignore
LABEL_MODES = ("L", "P", "1")


@dataclass(frozen=True, eq=False)
class LabelRule:
    """How raw label values become class indices: `table[raw]` is the class, 255 (ignore) or INVALID."""

    name: str
    table: np.ndarray  # int16, shape (256,)
    hint: str  # how to fix a file with invalid values

    def invalid_values(self, raw: np.ndarray) -> list[int]:
        """The raw values of `raw` that the table does not accept (empty when all are fine)."""
        if not (self.table[raw] == INVALID).any():
            return []
        present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
        return [int(v) for v in present if self.table[v] == INVALID]

    def apply(self, raw: np.ndarray, path: Path | str) -> np.ndarray:
        """Map a raw uint8 (H, W) label to class indices + 255; DataError naming the file on invalid values."""
        bad = self.invalid_values(raw)
        if bad:
            raise DataError(f"{path}: label value(s) {bad[:10]} are not valid for rule {self.name!r}; {self.hint}")
        return self.table[raw].astype(np.uint8)


def index_rule(num_classes: int) -> LabelRule:
    """Raw values are class indices 0..C-1 or 255 (Cityscapes trainIds, VOC)."""
    table = np.full(256, INVALID, dtype=np.int16)
    table[:num_classes] = np.arange(num_classes)
    table[IGNORE_INDEX] = IGNORE_INDEX
    hint = f"expected class indices 0..{num_classes - 1} or {IGNORE_INDEX} (ignore)"
    return LabelRule("index", table, hint)


def cityscapes_label_ids_rule() -> LabelRule:
    """Cityscapes labelIds -> trainIds; every unlisted id becomes 255 (docs/algorithm.md §5.1)."""
    return LabelRule("cityscapes_label_ids", np.array(cityscapes_label_to_train_table(IGNORE_INDEX), np.int16), "")


def folder_rule(
    num_classes: int,
    ignore_values: Sequence[int] = (),
    value_remap: Mapping[int, int] | None = None,
) -> LabelRule:
    """Custom datasets: `value_remap` raw -> class (else identity on 0..C-1), `ignore_values` -> 255.

    255 is ignore unless remapped. Any other raw value is invalid, so a mask that mixes conventions fails loudly.
    """
    table = np.full(256, INVALID, dtype=np.int16)
    table[IGNORE_INDEX] = IGNORE_INDEX
    if value_remap:
        for raw, cls in value_remap.items():
            if not 0 <= raw <= 255 or not (0 <= cls < num_classes or cls == IGNORE_INDEX):
                raise ConfigError(
                    f"data.value_remap: {raw} -> {cls} must map a value 0..255 to a class 0..{num_classes - 1} or 255"
                )
            table[raw] = cls
    else:
        table[:num_classes] = np.arange(num_classes)
    for raw in ignore_values:
        if not 0 <= raw <= 255:
            raise ConfigError(f"data.ignore_values: {raw} is not a uint8 value")
        table[raw] = IGNORE_INDEX
    accepted = [v for v in range(256) if table[v] != INVALID]
    hint = f"accepted raw values are {accepted}; extend data.value_remap or data.ignore_values"
    return LabelRule("folder", table, hint)


def label_mode_message(mode: str) -> str:
    """Why a label image of `mode` is refused, and how to fix it."""
    if mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        return (
            f"label is a colour image (mode {mode}); labels must be single-channel index PNGs (mode L or P)"
            " holding class indices: convert colour masks to indices first (one value per class)"
        )
    return f"label mode {mode} is not supported; save it as an 8-bit single-channel PNG (mode L or P)"


def label_png(label: np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """A palette PNG whose pixel values are the class ids of `label` (H, W) and whose colours are `palette` (one RGB
    triple per class): what `read_label_raw` reads back as class ids and an image viewer shows in colour."""
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    flat = [c for rgb in palette for c in rgb]
    img.putpalette(flat + [0] * (768 - len(flat)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def read_label_raw(path: Path | str) -> np.ndarray:
    """Raw uint8 (H, W) values of a mode L/P/1 label image, without any colour conversion."""
    try:
        with Image.open(path) as img:
            if img.mode not in LABEL_MODES:
                raise DataError(f"{path}: {label_mode_message(img.mode)}")
            return np.array(img, dtype=np.uint8)  # P: palette indices; 1: 0/1
    except FileNotFoundError as err:
        raise DataError(f"{path}: label not found") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot decode label ({err})") from err


def read_label(path: Path | str, rule: LabelRule) -> np.ndarray:
    """Read a label image and map it through `rule`: uint8 (H, W) with class indices and 255."""
    return rule.apply(read_label_raw(path), path)
