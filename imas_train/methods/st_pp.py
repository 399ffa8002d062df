"""``method: st_pp``: the stage trainings of the ST / ST++ pipeline (shared/methods/STPlusPlus.md §2.A, §2.D).

The pipeline itself (`imas_train.st_pp`) runs these trainings through the generic loop, one stage folder each, with
``st_pp.stage`` set in the stage's config:

* ``supervised`` (stage 1): the labeled list, repeated twice when N_l < ``st_pp.double_labeled_below`` (§7 oracle
  4); for ST++ the weights at the end of epochs ⌊j·E/K⌋, j = 1..K, are written to ``<stage>/snapshots/`` (the K
  checkpoints whose agreement ranks the unlabeled images).
* ``retrain``: a fresh model on labeled × ⌈N_p/N_l⌉ + the N_p pseudo-labeled images of the folders in
  ``st_pp.pseudo_labels`` (§7 oracle 3), one list and one shuffled stream, so batches mix both at random.

Every item gets the weak augmentation; the pseudo-labeled ones (with ``strong_aug: all`` also the labeled ones) then
get the colour SDA and Cutout whose box becomes ignore (255) in the label (`imas_train.colour_pool`). The step is
the supervised one: cross-entropy over every non-ignored pixel of the batch; the artifact is the student.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from imas_core.atomic import atomic_write_bytes
from imas_core.constants import IGNORE_INDEX
from imas_core.errors import ConfigError, DataError
from imas_train.augment import WeakAugment, to_chw_uint8
from imas_train.colour_pool import colour_strong, cutout
from imas_train.config import StPpConfig, TrainConfig
from imas_train.data.sources import Source
from imas_train.methods.base import StepContext
from imas_train.methods.supervised import SupervisedMethod
from imas_train.pseudo_label import read_label_png

__all__ = [
    "MixedDataset",
    "StPpMethod",
    "retrain_items",
    "snapshot_epochs",
    "snapshot_path",
    "supervised_items",
]

LABELED, PSEUDO = 0, 1  # item kinds


def supervised_items(num_labeled: int, double_below: int) -> list[tuple[int, int]]:
    """Stage 1's list: every labeled index, twice when N_l < `double_below` (183 -> 366, 200 -> 200)."""
    reps = 2 if num_labeled < double_below else 1
    return [(LABELED, i) for i in range(num_labeled)] * reps


def retrain_items(num_labeled: int, pseudo_ids: Sequence[int]) -> list[tuple[int, int]]:
    """A re-training's list: labeled × ⌈N_p/N_l⌉ then the N_p pseudo-labeled unlabeled indices (3, 10 -> 22)."""
    reps = -(-len(pseudo_ids) // num_labeled)
    return [(LABELED, i) for i in range(num_labeled)] * reps + [(PSEUDO, int(i)) for i in pseudo_ids]


def snapshot_epochs(epochs: int, k: int) -> list[int]:
    """The epochs (counted from 1) after which the K checkpoints are taken: ⌊j·E/K⌋, j = 1..K (80 -> 26, 53, 80)."""
    points = [j * epochs // k for j in range(1, k + 1)]
    if points[0] < 1 or len(set(points)) != k:
        raise ConfigError(f"st_pp.checkpoints={k} needs at least {k} epochs in the supervised stage, got {epochs}")
    return points


def snapshot_path(stage_dir: Path, epoch: int) -> Path:
    """Where the supervised stage writes its checkpoint after epoch `epoch` (counted from 1)."""
    return Path(stage_dir) / "snapshots" / f"epoch_{epoch:03d}.safetensors"


class MixedDataset(Dataset[dict[str, torch.Tensor]]):
    """Labeled images with their ground truth and unlabeled images with their stored pseudo-mask, in one list.

    Indexed by ``(position, sample_seed)`` like `data.LabeledDataset` (`data.sampler`); items are
    ``{"image": uint8 (3, S, S), "label": int64 (S, S), "index": source index, "pseudo": bool}``. A labeled item
    without SDA is exactly `data.LabeledDataset`'s item for the same index and seed.
    """

    def __init__(
        self,
        items: Sequence[tuple[int, int]],
        labeled: Source,
        weak: WeakAugment,
        *,
        unlabeled: Source | None = None,
        masks: Mapping[int, Path] | None = None,
        strong_aug: str = "pseudo",
    ) -> None:
        self.items = list(items)
        self.labeled, self.unlabeled, self.weak = labeled, unlabeled, weak
        self.masks = dict(masks or {})
        self.strong_aug = strong_aug
        pseudo = [i for kind, i in self.items if kind == PSEUDO]
        missing = [i for i in pseudo if i not in self.masks]
        if missing or (pseudo and unlabeled is None):
            raise DataError(f"pseudo-labeled items need the unlabeled source and a mask each; no mask: {missing[:5]}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        position, seed = item
        kind, index = self.items[position]
        rng = np.random.default_rng(seed)
        if kind == LABELED:
            image, label = self.labeled.load(index, with_label=True)
        else:
            assert self.unlabeled is not None
            image, _ = self.unlabeled.load(index, with_label=False)
            label = read_label_png(self.masks[index])
            if label.shape != image.shape[:2]:
                size = f"{label.shape[1]}x{label.shape[0]} differs from its image {image.shape[1]}x{image.shape[0]}"
                raise DataError(f"{self.masks[index]}: pseudo-mask {size}; delete it and resume to relabel")
        view = self.weak(image, label, rng)
        assert view.label is not None
        out_image, out_label = view.image, view.label
        if self.strong_aug == "all" or (self.strong_aug == "pseudo" and kind == PSEUDO):
            out_image = colour_strong(out_image, rng)
            out_image, ignore = cutout(out_image, rng)
            out_label = out_label.copy()
            out_label[ignore] = IGNORE_INDEX
        return {
            "image": to_chw_uint8(out_image),
            "label": torch.from_numpy(out_label.astype(np.int64)),
            "index": torch.tensor(index),
            "pseudo": torch.tensor(kind == PSEUDO),
        }


def read_masks(folders: Sequence[Path]) -> tuple[list[int], dict[int, Path]]:
    """(pseudo-labeled indices in folder order, {index: PNG}) of finished pseudo-label folders."""
    ids: list[int] = []
    masks: dict[int, Path] = {}
    for folder in folders:
        sidecar = Path(folder) / "stage.json"
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{sidecar}: unreadable pseudo-label record ({err}); resume the pipeline") from err
        if meta.get("complete") is not True:
            raise DataError(f"{sidecar}: the pseudo-labelling is unfinished; resume the pipeline (--resume auto)")
        for index, name in meta["items"]:
            if index in masks:
                raise DataError(f"{sidecar}: unlabeled index {index} is pseudo-labeled twice")
            ids.append(int(index))
            masks[int(index)] = Path(folder) / name
    return ids, masks


class StPpMethod(SupervisedMethod):
    """One stage training of ST / ST++: supervised cross-entropy over the stage's list (module docstring)."""

    name: ClassVar[str] = "st_pp"
    uses_unlabeled: ClassVar[bool] = False
    log_keys: ClassVar[tuple[str, ...]] = ("loss", "loss_x")

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.st: StPpConfig = cfg.st_pp or StPpConfig()
        if self.st.stage == "pipeline":
            raise ConfigError("method 'st_pp' runs as a pipeline through imas_train.train.train (imas-train)")
        self._snapshots: set[int] = set()
        if self.st.stage == "supervised" and self.st.plus:
            self._snapshots = set(snapshot_epochs(cfg.optim.epochs, self.st.checkpoints))

    def training_data(self, data: Any) -> Any:
        labeled = data.labeled
        if self.st.stage == "supervised":
            items = supervised_items(len(labeled), self.st.double_labeled_below)
            mixed = MixedDataset(items, labeled.source, labeled.weak, strong_aug=self.st.strong_aug)
        else:
            if data.unlabeled is None:
                raise DataError("method 'st_pp' re-trains on pseudo-labeled images: data.unlabeled_list is required")
            ids, masks = read_masks(self.st.pseudo_labels)
            mixed = MixedDataset(retrain_items(len(labeled), ids), labeled.source, labeled.weak,
                                 unlabeled=data.unlabeled.source, masks=masks,
                                 strong_aug=self.st.strong_aug)  # fmt: skip
        return dataclasses.replace(data, labeled=mixed)

    def after_optimizer_step(self, networks: Mapping[str, nn.Module], ctx: StepContext) -> None:
        done = ctx.step + 1
        if ctx.rank != 0 or done % ctx.iters_per_epoch or done // ctx.iters_per_epoch not in self._snapshots:
            return
        from safetensors.torch import save

        model = next(iter(networks.values()))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        path = snapshot_path(Path(self.cfg.run.output_dir), done // ctx.iters_per_epoch)
        atomic_write_bytes(path, save(tensors))
