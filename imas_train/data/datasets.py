"""Torch datasets over a Source: labeled (weak view + label), unlabeled (weak + strong views), val (full image).

The training datasets are indexed by `(index, sample_seed)` pairs from `data.sampler`: every random draw of a
sample comes from `numpy.random.default_rng(sample_seed)`, so a batch does not depend on the worker count.
The unlabeled dataset never loads a label, even when one exists on disk.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from imas_train.augment import WeakAugment, strong_augment, to_chw_uint8
from imas_train.data.sources import Source

Item = tuple[int, int]  # (dataset index, sample seed)


def _label_tensor(label: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(label.astype(np.int64))


class LabeledDataset(Dataset[dict[str, torch.Tensor]]):
    """Items `{"image": uint8 (3, H, W) RGB, "label": int64 (H, W), "index": int}` at crop size."""

    def __init__(self, source: Source, weak: WeakAugment) -> None:
        self.source = source
        self.weak = weak

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: Item) -> dict[str, torch.Tensor]:
        index, seed = item
        rng = np.random.default_rng(seed)
        image, label = self.source.load(index, with_label=True)
        view = self.weak(image, label, rng)
        assert view.label is not None
        return {"image": to_chw_uint8(view.image), "label": _label_tensor(view.label), "index": torch.tensor(index)}


class UnlabeledDataset(Dataset[dict[str, torch.Tensor]]):
    """Items `{"image_w", "image_s": uint8 (3, H, W) RGB, pixel-aligned; "valid": bool (H, W), False on
    padding; "index": int}`. image_s is A_s^I applied to image_w's crop (docs/algorithm.md §5.4)."""

    def __init__(self, source: Source, weak: WeakAugment, num_strong_ops: int = 2) -> None:
        self.source = source
        self.weak = weak
        self.num_strong_ops = num_strong_ops

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: Item) -> dict[str, torch.Tensor]:
        index, seed = item
        rng = np.random.default_rng(seed)
        image, _ = self.source.load(index, with_label=False)
        view = self.weak(image, None, rng)
        strong = strong_augment(view.image, rng, self.num_strong_ops)
        return {
            "image_w": to_chw_uint8(view.image),
            "image_s": to_chw_uint8(strong),
            "valid": torch.from_numpy(view.valid),
            "index": torch.tensor(index),
        }


class ValDataset(Dataset[dict[str, object]]):
    """Items `{"image": uint8 (3, H, W) RGB full image, "label": int64 (H, W), "index": int, "name": str}`,
    indexed by plain ints; no augmentation."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, object]:
        image, label = self.source.load(index, with_label=True)
        assert label is not None
        return {
            "image": to_chw_uint8(image),
            "label": _label_tensor(label),
            "index": torch.tensor(index),
            "name": self.source.name(index),
        }
