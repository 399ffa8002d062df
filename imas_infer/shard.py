"""`imas-infer --shard I/N`: a deterministic 1/N of the inputs, with no cluster software.

Slurm array jobs (``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) and Kubernetes indexed jobs
(``--shard $JOB_COMPLETION_INDEX/N``) start N copies of the same command; each keeps the inputs of its own shard.

An input belongs to shard ``int(sha256(relative path)[:16], 16) % N``: a pure function of its path relative to the
input root (the same path its outputs mirror). So the N shards cover every input exactly once, and the assignment
does not depend on the order of the listing or on the other files present: a shard that lists a folder a minute
later, while new frames still arrive, keeps every image it would have kept earlier, and a newly arrived image goes to
one shard only. The shards are balanced statistically (binomial: for a million images over 100 shards, the largest
holds about 1 % more than the mean), not exactly. Tier 0: stdlib only.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import PurePath
from typing import TypeVar

from imas_core.errors import InferError

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """ "I/N" -> (I, N) with 0 <= I < N.

    Raises:
        InferError: naming the value and the expected form.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise InferError(f"--shard {text!r}: expected I/N, e.g. 0/8 (shard I of N, 0 <= I < N)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise InferError(f"--shard {text}: need N >= 1 and 0 <= I < N (shards are numbered from 0)")
    return index, count


def shard_of(rel: PurePath | str, count: int) -> int:
    """The shard (0..count-1) of the input whose path relative to the input root is `rel`."""
    key = rel.as_posix() if isinstance(rel, PurePath) else str(rel)
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) % count


def select_shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """The items of shard `index` of `count`, in their original order (items have a `rel` path)."""
    if count == 1:
        return list(items)
    return [item for item in items if shard_of(item.rel, count) == index]  # type: ignore[attr-defined]
