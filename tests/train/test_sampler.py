from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from imas_core.errors import DataError
from imas_train.augment import WeakAugment
from imas_train.data.datasets import UnlabeledDataset
from imas_train.data.demo import DemoSource
from imas_train.data.sampler import (
    StreamSampler,
    global_stream,
    iters_per_epoch,
    make_train_loader,
    rank_stream,
)


@pytest.mark.parametrize(
    ("n_u", "world", "batch", "expected"),
    [
        (2789, 4, 4, 174), (2603, 4, 4, 162), (2231, 4, 4, 139), (1487, 4, 4, 93),  # Cityscapes os16
        (2789, 8, 2, 174), (2603, 8, 2, 163), (2231, 8, 2, 139), (1487, 8, 2, 93),  # Cityscapes os8
        (10582 - 1323, 4, 4, 578),  # VOC 1323
    ],
)  # fmt: skip
def test_iters_per_epoch_matches_reference(n_u: int, world: int, batch: int, expected: int) -> None:
    assert iters_per_epoch(n_u, world, batch) == expected


def test_iterations_over_240_epochs_at_186() -> None:
    assert 240 * iters_per_epoch(2975 - 186, 4, 4) == 41_760


def test_rank_streams_disjoint_and_covering() -> None:
    n, world, batch = 23, 4, 2
    kw = {"seed": 2, "stream": "unlabeled", "epoch": 3, "world_size": world, "batch_size": batch}
    parts = [rank_stream(n, n, rank=r, **kw) for r in range(world)]
    positions = np.concatenate([p for _, p in parts])
    assert len(set(positions.tolist())) == len(positions)  # no position twice
    assert all(len(idx) == iters_per_epoch(n, world, batch) * batch for idx, _ in parts)
    full = [rank_stream(n, n, rank=r, **{**kw, "batch_size": 1}) for r in range(world)]  # no cut to L*B
    covered = np.concatenate([idx for idx, _ in full])
    assert set(covered.tolist()) == set(range(n))  # 23 padded to 24 by wrapping: one repeat
    assert len(covered) == 24
    order = global_stream(n, n, seed=2, stream="unlabeled", epoch=3)
    for r, (idx, pos) in enumerate(parts):
        np.testing.assert_array_equal(pos, np.arange(r, 24, world)[: len(idx)])
        np.testing.assert_array_equal(idx, order[pos % n])


def test_labeled_tiling_counts_and_rebuilt_each_epoch() -> None:
    n_l, n_u = 7, 60
    epochs = [global_stream(n_l, n_u, seed=2, stream="labeled", epoch=e) for e in range(3)]
    for stream in epochs:
        counts = Counter(stream.tolist())
        assert set(counts) == set(range(n_l))
        assert set(counts.values()) <= {n_u // n_l, -(-n_u // n_l)}
        assert len(stream) == n_u
    assert not np.array_equal(epochs[0], epochs[1])
    unlabeled = global_stream(n_u, n_u, seed=2, stream="unlabeled", epoch=0)
    assert sorted(unlabeled.tolist()) == list(range(n_u))  # one permutation


def test_streams_deterministic_and_distinct() -> None:
    kw = {"seed": 2, "epoch": 0, "rank": 1, "world_size": 2, "batch_size": 3}
    a = StreamSampler(10, 40, stream="labeled", **kw)
    assert list(a) == list(StreamSampler(10, 40, stream="labeled", **kw))
    assert list(a) != list(StreamSampler(10, 40, stream="labeled", **{**kw, "seed": 3}))
    assert list(a) != list(StreamSampler(10, 40, stream="labeled", **{**kw, "epoch": 1}))
    assert list(a) != list(StreamSampler(40, 40, stream="unlabeled", **kw))
    other = StreamSampler(10, 40, stream="labeled", **{**kw, "rank": 0})
    assert len(set(a.seeds) | set(other.seeds)) == len(a.seeds) + len(other.seeds)  # seeds differ per position


def test_start_batch_resume_is_the_tail() -> None:
    kw = {"seed": 2, "stream": "unlabeled", "epoch": 5, "rank": 0, "world_size": 2, "batch_size": 4}
    full = list(StreamSampler(50, 50, **kw))
    tail = list(StreamSampler(50, 50, start_batch=3, **kw))
    assert tail == full[12:] and len(full) == 24
    with pytest.raises(ValueError, match="start_batch"):
        StreamSampler(50, 50, start_batch=7, **kw)


class _Echo(Dataset):
    def __len__(self) -> int:
        return 9

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = item
        return {"index": torch.tensor(index), "seed": torch.tensor(seed % 2**62)}


def test_loader_batches_and_resume() -> None:
    kw = {"batch_size": 2, "seed": 2, "stream": "labeled", "epoch": 0, "rank": 1, "world_size": 2, "length": 30}
    batches = list(make_train_loader(_Echo(), **kw))
    assert len(batches) == iters_per_epoch(30, 2, 2) == 7
    assert all(b["index"].shape == (2,) and b["index"].dtype == torch.int64 for b in batches)
    resumed = list(make_train_loader(_Echo(), start_batch=4, **kw))
    assert [b["seed"].tolist() for b in resumed] == [b["seed"].tolist() for b in batches[4:]]
    with pytest.raises(DataError, match="shorter than"):
        make_train_loader(_Echo(), **{**kw, "length": 2})


def test_loader_identical_with_0_and_2_workers() -> None:
    source = DemoSource("unlabeled", 6, seed=0, height=32, width=40)
    weak = WeakAugment(crop_size=28, scale_mode="relative", scale_range=(0.5, 2.0), base_size=(1, 1),
                       long_side_range=(1, 1))  # fmt: skip
    ds = UnlabeledDataset(source, weak)
    kw = {"batch_size": 2, "seed": 2, "stream": "unlabeled", "epoch": 1, "rank": 0, "world_size": 1, "length": 6}
    serial = list(make_train_loader(ds, num_workers=0, **kw))
    parallel = list(make_train_loader(ds, num_workers=2, **kw))
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys() == {"image_w", "image_s", "valid", "index"}
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert serial[0]["image_w"].shape == (2, 3, 28, 28) and serial[0]["valid"].dtype == torch.bool
