"""What a run writes for each image (`OutputSpec`) and the writing itself, one file per requested kind.

Kinds and file names are documented in `image_io`; every file is written atomically. Runs in the writer threads.
Tier 0 + numpy + Pillow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imas_core.classes import CITYSCAPES_TRAIN_TO_LABEL_ID
from imas_infer import image_io

_CITYSCAPES_IDS = np.zeros(256, dtype=np.uint8)  # train id -> label id; 255 (and anything unmapped) -> 0
_CITYSCAPES_IDS[: len(CITYSCAPES_TRAIN_TO_LABEL_ID)] = CITYSCAPES_TRAIN_TO_LABEL_ID


@dataclass(frozen=True)
class OutputSpec:
    """What to write and where; `root` None writes nothing (benchmarks)."""

    root: Path | None
    kinds: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    overlay_alpha: float = 0.5


def write_outputs(
    spec: OutputSpec,
    palette: np.ndarray,
    rel: Path,
    image: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray | None,
) -> None:
    """Write every kind of `spec` for one image.

    Args:
        spec: kinds, output root (must not be None) and overlay weight.
        palette: `image_io.palette_table(spec.palette)`, built once per run.
        rel: the input's path relative to the input root (outputs mirror it).
        image: (H, W, 3) uint8, the decoded input (for overlays).
        labels: (H, W) uint8 train ids.
        probs: (C, H, W) float32 average probabilities, when `probs` is asked for.
    """
    root, kinds = spec.root, spec.kinds
    assert root is not None
    color = image_io.colorize(labels, palette) if {"color", "overlay"} & set(kinds) else None
    for kind in kinds:
        path = image_io.output_path(root, kind, rel)
        if kind == "labels":
            image_io.write_png(path, labels)
        elif kind == "cityscapes-ids":
            image_io.write_png(path, _CITYSCAPES_IDS[labels])
        elif kind == "color" and color is not None:
            image_io.write_png(path, color)
        elif kind == "overlay" and color is not None:
            image_io.write_jpeg(path, image_io.blend(image, color, spec.overlay_alpha))
        elif kind == "probs" and probs is not None:
            image_io.write_npy(path, probs.astype(np.float16))
