"""Tiny on-disk datasets for the data tests (Cityscapes, VOC and folder layouts), written into tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imas_core.classes import VOC_PALETTE
from imas_train.config import DataConfig

CITY_NAMES = ("aachen_000000_000019", "aachen_000001_000019", "bremen_000000_000019")
VOC_IDS = ("2007_000032", "2007_000039", "2007_000063")


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def city_image_rel(name: str, split: str = "train") -> str:
    return f"leftImg8bit/{split}/{name.split('_')[0]}/{name}_leftImg8bit.png"


def make_cityscapes(root: Path, *, label_ids: bool = False, h: int = 32, w: int = 64) -> list[np.ndarray]:
    """Images and labels for CITY_NAMES; labelTrainIds files, or labelIds-only ones. Returns the raw labels."""
    raws = []
    for k, name in enumerate(CITY_NAMES):
        city = name.split("_")[0]
        save(root / city_image_rel(name), rgb(h, w, k))
        rng = np.random.default_rng(100 + k)
        if label_ids:
            raw = rng.choice(np.array([0, 1, 7, 8, 26, 33, 255], np.uint8), size=(h, w))
            save(root / "gtFine" / "train" / city / f"{name}_gtFine_labelIds.png", raw)
        else:
            raw = rng.choice(np.array([0, 1, 13, 18, 255], np.uint8), size=(h, w))
            save(root / "gtFine" / "train" / city / f"{name}_gtFine_labelTrainIds.png", raw)
        raws.append(raw)
    return raws


def palette_png(path: Path, indices: np.ndarray) -> Path:
    """A palette ('P') PNG holding `indices`, with the VOC colour map."""
    img = Image.fromarray(indices, "P")
    flat = [c for colour in VOC_PALETTE for c in colour]
    img.putpalette(flat + [224, 224, 192] * (256 - len(VOC_PALETTE)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_voc(root: Path, *, h: int = 30, w: int = 40, aug: bool = True) -> list[np.ndarray]:
    raws = []
    for k, vid in enumerate(VOC_IDS):
        save(root / "JPEGImages" / f"{vid}.jpg", rgb(h, w, k))
        raw = np.random.default_rng(200 + k).choice(np.array([0, 1, 15, 20, 255], np.uint8), size=(h, w))
        palette_png(root / ("SegmentationClassAug" if aug else "SegmentationClass") / f"{vid}.png", raw)
        raws.append(raw)
    return raws


def write_list(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def data_config(dataset: str, root: Path | None, **kwargs: Any) -> DataConfig:
    base: dict[str, Any] = {"crop_size": 24, "batch_size": 2, "scale_mode": "relative", "root": root}
    base.update(kwargs)
    return DataConfig(dataset=dataset, **base)  # type: ignore[arg-type]
