"""Datasets, split lists, deterministic training streams and the data check (docs/algorithm.md §5).

Per epoch the trainer builds one loader per stream; both have exactly L batches, so they zip::

    ds = build_datasets(cfg.data, cfg.model.num_classes)
    n = len(ds.unlabeled)                      # method 'supervised': len(ds.labeled), labeled stream only
    L = iters_per_epoch(n, world_size, cfg.data.batch_size)
    common = dict(batch_size=cfg.data.batch_size, seed=cfg.run.seed, epoch=epoch, rank=rank,
                  world_size=world_size, length=n, start_batch=step_in_epoch, num_workers=cfg.data.num_workers)
    loader_l = make_train_loader(ds.labeled, stream="labeled", **common)
    loader_u = make_train_loader(ds.unlabeled, stream="unlabeled", **common)

The loaders are already sharded by rank: never pass them to `accelerator.prepare`; move batches to the device.
"""

from imas_train.data.build import Datasets, build_datasets, class_info, weak_augment
from imas_train.data.check import DataReport, Problem, check_data
from imas_train.data.datasets import LabeledDataset, UnlabeledDataset, ValDataset
from imas_train.data.lists import list_sha256, make_splits, read_list, write_splits
from imas_train.data.sampler import iters_per_epoch, make_train_loader, make_val_loader

__all__ = [
    "DataReport",
    "Datasets",
    "LabeledDataset",
    "Problem",
    "UnlabeledDataset",
    "ValDataset",
    "build_datasets",
    "check_data",
    "class_info",
    "iters_per_epoch",
    "list_sha256",
    "make_splits",
    "make_train_loader",
    "make_val_loader",
    "read_list",
    "weak_augment",
    "write_splits",
]
