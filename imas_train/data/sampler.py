"""Deterministic distributed training streams (docs/algorithm.md §5.5 and §10 "Artefacts we must NOT reproduce").

Per epoch, a stream's GLOBAL order is a seeded function of (run seed, stream, epoch): fresh permutations of the
dataset concatenated and truncated to `length` (for the unlabeled stream, length = N_u is one permutation; for the
labeled stream, length = N_u tiles the labeled set, rebuilt every epoch, so each image appears ⌊N_u/N_l⌋ or
⌈N_u/N_l⌉ times). The stream is padded by wrapping to a multiple of the world size G (like DistributedSampler),
rank r takes positions r, r+G, r+2G, ..., and keeps L·B of them, L = ⌊⌈length/G⌉/B⌋. Every item travels with a
sample seed hashed from (run seed, stream, epoch, global position), so augmentation does not depend on the
number of workers, and resuming mid-epoch only skips indices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from imas_core.errors import DataError

# Part of every seed; never renumber (it would change all streams). "unlabeled_mix" is a second, independent pass
# over the unlabeled set (the CutMix partners of CPS).
STREAM_IDS = {"labeled": 1, "unlabeled": 2, "unlabeled_mix": 3}


def iters_per_epoch(num_unlabeled: int, world_size: int, batch_size: int) -> int:
    """L = ⌊⌈N/G⌉/B⌋ iterations per epoch (N = N_u for iMAS, N_l for method 'supervised')."""
    return -(-num_unlabeled // world_size) // batch_size


def global_stream(num_items: int, length: int, *, seed: int, stream: str, epoch: int) -> np.ndarray:
    """Dataset indices of one epoch's global stream: seeded permutations of range(num_items), concatenated and
    truncated to `length` (int64, shape (length,))."""
    if num_items < 1 or length < 1:
        raise DataError(f"{stream} stream: needs at least one item and length >= 1, got {num_items} and {length}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, STREAM_IDS[stream], epoch]))
    reps = -(-length // num_items)
    return np.concatenate([rng.permutation(num_items) for _ in range(reps)])[:length].astype(np.int64)


def sample_seed(seed: int, stream: str, epoch: int, position: int) -> int:
    """The augmentation seed of the item at `position` of a global stream (a 64-bit SeedSequence hash)."""
    ss = np.random.SeedSequence([seed, STREAM_IDS[stream], epoch, position])
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def rank_stream(
    num_items: int,
    length: int,
    *,
    seed: int,
    stream: str,
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's (indices, padded global positions), each of length L·B.

    Positions index the global stream padded by wrapping to G·⌈length/G⌉; item j is `global[j % length]`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    order = global_stream(num_items, length, seed=seed, stream=stream, epoch=epoch)
    per_rank = -(-length // world_size)
    keep = (per_rank // batch_size) * batch_size
    positions = np.arange(rank, per_rank * world_size, world_size, dtype=np.int64)[:keep]
    return order[positions % length], positions


class StreamSampler(Sampler[tuple[int, int]]):
    """Yields `(index, sample_seed)` for one rank and epoch, starting at batch `start_batch`."""

    def __init__(
        self,
        num_items: int,
        length: int,
        *,
        seed: int,
        stream: str,
        epoch: int,
        rank: int,
        world_size: int,
        batch_size: int,
        start_batch: int = 0,
    ) -> None:
        indices, positions = rank_stream(
            num_items,
            length,
            seed=seed,
            stream=stream,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
        )
        num_batches = len(indices) // batch_size
        if not 0 <= start_batch <= num_batches:
            raise ValueError(f"start_batch {start_batch} not in [0, {num_batches}]")
        start = start_batch * batch_size  # skipped items are never loaded
        self.indices = [int(i) for i in indices[start:]]
        self.seeds = [sample_seed(seed, stream, epoch, int(p)) for p in positions[start:]]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self.indices, self.seeds, strict=True))

    def __len__(self) -> int:
        return len(self.indices)


def make_train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    stream: str,
    epoch: int,
    rank: int,
    world_size: int,
    length: int,
    start_batch: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A one-epoch loader of this rank's slice of a stream (build a new one every epoch).

    Args:
        dataset: a LabeledDataset or UnlabeledDataset (indexed by (index, sample_seed)).
        stream: "labeled" or "unlabeled".
        length: global stream length: N_u for both iMAS streams, N_l for method 'supervised'.
        start_batch: first batch to yield when resuming mid-epoch.

    Do not pass the loader to `accelerator.prepare`: it is already sharded by `rank`/`world_size`.
    """
    if not isinstance(dataset, Sized):
        raise TypeError("dataset must have a length")
    if iters_per_epoch(length, world_size, batch_size) < 1:
        raise DataError(
            f"{stream} stream of length {length} is shorter than world_size x batch_size = {world_size * batch_size}; "
            "use more images or a smaller data.batch_size"
        )
    sampler = StreamSampler(
        len(dataset),
        length,
        seed=seed,
        stream=stream,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        start_batch=start_batch,
    )
    # Seeds travel with the indices; the generator only makes each worker's own torch seed deterministic.
    worker_seed = np.random.SeedSequence([seed, STREAM_IDS[stream], epoch, rank]).generate_state(1)[0]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(int(worker_seed)),
    )


def make_val_loader(
    dataset: Dataset, *, batch_size: int = 1, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """Sequential val loader over every image once, no drop_last. Under Accelerate, `prepare` it and reduce with
    `gather_for_metrics`, which drops the padding duplicates (docs/algorithm.md §10)."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers, pin_memory=pin_memory
    )
