"""Per-class queues of feature vectors on the host: U2PL's negative memory bank (shared/methods/U2PL.md §2.B 8d).

Each class c holds at most ``sizes[c]`` rows of ``dim`` float32 features, newest last. `push` appends rows that the
caller has already gathered from every process (so banks are identical on every rank) and keeps the newest; `sample`
draws rows with replacement from an explicit generator. The bank travels with the resume checkpoint as safetensors
(`state_tensors` / `load_state_tensors`), so a resumed run samples the same negatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["MemoryBank"]


class MemoryBank:
    """Per-class FIFO queues of (n, dim) float32 CPU tensors.

    Args:
        sizes: capacity Q_c of each class (U2PL: 50 000 for class 0, 30 000 otherwise).
        dim: feature width (256).
    """

    def __init__(self, sizes: Sequence[int], dim: int) -> None:
        if any(q < 1 for q in sizes) or dim < 1:
            raise ValueError(f"bank sizes and dim must be >= 1, got {list(sizes)} and {dim}")
        self.sizes = tuple(int(q) for q in sizes)
        self.dim = dim
        self.queues = [torch.zeros(0, dim) for _ in self.sizes]

    @property
    def num_classes(self) -> int:
        return len(self.sizes)

    def __len__(self) -> int:
        return sum(q.shape[0] for q in self.queues)

    def count(self, c: int) -> int:
        """Rows held for class c."""
        return int(self.queues[c].shape[0])

    def push(self, c: int, keys: Tensor) -> None:
        """Append (n, dim) rows to class c (moved to the CPU as float32) and keep the newest ``sizes[c]``."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (n, {self.dim}), got {tuple(keys.shape)}")
        if keys.shape[0] == 0:
            return
        queue = torch.cat([self.queues[c], keys.detach().to("cpu", torch.float32)])
        self.queues[c] = queue[-self.sizes[c] :].contiguous()

    def sample(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        """(n, dim) rows of class c drawn uniformly with replacement (CPU).

        Raises:
            ValueError: class c is empty.
        """
        size = self.count(c)
        if size == 0:
            raise ValueError(f"memory bank of class {c} is empty")
        return self.queues[c][torch.randint(size, (n,), generator=generator)]

    def state_tensors(self, prefix: str = "bank.") -> dict[str, Tensor]:
        """Every queue as ``<prefix><c>`` (empty queues as (0, dim))."""
        return {f"{prefix}{c}": q for c, q in enumerate(self.queues)}

    def load_state_tensors(self, tensors: Mapping[str, Tensor], prefix: str = "bank.") -> None:
        """Restore what `state_tensors` saved.

        Raises:
            ValueError: a class is missing or a queue has the wrong width or exceeds its capacity.
        """
        queues = []
        for c, size in enumerate(self.sizes):
            key = f"{prefix}{c}"
            if key not in tensors:
                raise ValueError(f"memory bank state lacks {key}")
            q = tensors[key]
            if q.dim() != 2 or q.shape[1] != self.dim or q.shape[0] > size:
                raise ValueError(
                    f"memory bank state {key} has shape {tuple(q.shape)}; expected (<= {size}, {self.dim})"
                )
            queues.append(q.to("cpu", torch.float32).contiguous())
        self.queues = queues
