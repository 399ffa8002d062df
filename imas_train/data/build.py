"""Build the labeled, unlabeled and val datasets of a configured experiment."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imas_core.classes import builtin_classes, generated_palette
from imas_core.constants import IGNORE_INDEX
from imas_core.errors import DataError
from imas_train.augment import WeakAugment
from imas_train.config import DataConfig
from imas_train.data.datasets import LabeledDataset, UnlabeledDataset, ValDataset
from imas_train.data.demo import DemoSource
from imas_train.data.lists import list_sha256, read_list
from imas_train.data.sources import FileSource, Resolver, Sample, Source

_MAX_LISTED = 5  # missing files named in a build error; `imas-train check-data` lists all of them


@dataclass
class Datasets:
    """The three datasets plus what the artifacts record about them."""

    labeled: LabeledDataset
    unlabeled: UnlabeledDataset | None  # None when the config has no unlabeled list (method 'supervised')
    val: ValDataset
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    split_sha256: dict[str, str] = field(default_factory=dict)  # {"labeled": ..., "unlabeled": ..., "val": ...}


def class_info(cfg: DataConfig, num_classes: int) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """(class names, palette) of the dataset; DataError when they disagree with num_classes."""
    if cfg.dataset == "folder":
        if not cfg.class_names:
            raise DataError("data.class_names is required for dataset 'folder'")
        names = tuple(cfg.class_names)
        palette = tuple(cfg.palette) if cfg.palette else generated_palette(len(names))
    else:
        names, palette = builtin_classes(cfg.dataset)
    if len(names) != num_classes:
        raise DataError(f"dataset {cfg.dataset!r} has {len(names)} classes but model.num_classes is {num_classes}")
    if len(palette) != len(names):
        raise DataError(f"data.palette has {len(palette)} colours for {len(names)} classes")
    return names, palette


def weak_augment(cfg: DataConfig, label_pad: int = IGNORE_INDEX) -> WeakAugment:
    """A_w with the geometry of `cfg`; padded label pixels get `label_pad`."""
    return WeakAugment(
        label_pad=label_pad,
        crop_size=cfg.crop_size,
        scale_mode=cfg.scale_mode,
        scale_range=cfg.scale_range,
        base_size=cfg.base_size,
        long_side_range=cfg.long_side_range,
    )


def _file_source(resolver: Resolver, path: Path, *, with_label: bool, key: str) -> FileSource:
    samples: list[Sample] = [resolver(entry, with_label=with_label) for entry in read_list(path)]
    if not samples:
        raise DataError(f"{path}: the {key} list has no entries")
    missing = [str(p) for s in samples for p in (s.image, s.label) if p is not None and not p.is_file()]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} file(s) of the {key} list are missing, e.g. {missing[:_MAX_LISTED]}; "
            "run the data check for the full report"
        )
    return FileSource(samples)


def build_datasets(cfg: DataConfig, num_classes: int, *, label_pad: int = IGNORE_INDEX) -> Datasets:
    """Datasets of the configured data; the demo dataset renders its images from `cfg.demo`. Padded label pixels of
    training crops get `label_pad` (255 = ignored; U2PL's reference pads with class 0)."""
    names, palette = class_info(cfg, num_classes)
    weak = weak_augment(cfg, label_pad)
    if cfg.dataset == "demo":
        d = cfg.demo
        src_l: Source = DemoSource("labeled", d.num_labeled, seed=d.seed, height=d.height, width=d.width)
        src_u: Source | None = DemoSource("unlabeled", d.num_unlabeled, seed=d.seed, height=d.height, width=d.width)
        src_v: Source = DemoSource("val", d.num_val, seed=d.seed, height=d.height, width=d.width)
        hashes: dict[str, str] = {}
    else:
        if cfg.labeled_list is None or cfg.val_list is None:
            raise DataError("data.labeled_list and data.val_list are required")
        resolver = Resolver(cfg, num_classes)
        src_l = _file_source(resolver, cfg.labeled_list, with_label=True, key="labeled")
        src_v = _file_source(resolver, cfg.val_list, with_label=True, key="val")
        src_u = None
        if cfg.unlabeled_list is not None:
            src_u = _file_source(resolver, cfg.unlabeled_list, with_label=False, key="unlabeled")
        hashes = list_sha256({"labeled": cfg.labeled_list, "unlabeled": cfg.unlabeled_list, "val": cfg.val_list})
    return Datasets(
        labeled=LabeledDataset(src_l, weak),
        unlabeled=UnlabeledDataset(src_u, weak) if src_u is not None else None,
        val=ValDataset(src_v),
        class_names=names,
        palette=palette,
        split_sha256=hashes,
    )
