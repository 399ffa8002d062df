"""Named running means of the logged training scalars, reduced over processes with one collective per flush."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["Meters"]


class Meters:
    """A sum and a count per name; `flush` returns each name's mean over the iterations (and processes) that
    reported it since the last flush, and skips names nobody reported.

    The set of names is fixed up front (the method's ``log_keys``), so every process reduces tensors of the same
    layout even when a value (e.g. ``loss_cm``, only when CutMix fired) is missing on some of them.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._index = {name: i for i, name in enumerate(self.names)}
        self.sums = torch.zeros(2, len(self.names), dtype=torch.float64)  # row 0 sums, row 1 counts

    def add(self, values: Mapping[str, Tensor]) -> None:
        """Add one iteration's 0-d values (one device-to-host transfer).

        Raises:
            KeyError: a name that was not declared.
        """
        unknown = sorted(set(values) - set(self._index))
        if unknown:
            raise KeyError(f"undeclared log value(s) {unknown}; add them to the method's log_keys")
        if not values:
            return
        stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]).double().cpu()
        columns = torch.tensor([self._index[name] for name in values])
        self.sums[0, columns] += stacked
        self.sums[1, columns] += 1.0

    def flush(self, reduce_sum: Callable[[Tensor], Tensor] = lambda t: t) -> dict[str, float]:
        """Means since the last flush; `reduce_sum` sums over processes (``accelerator.reduce(t, "sum")``)."""
        sums, counts = reduce_sum(self.sums).cpu().tolist()
        self.sums.zero_()
        return {name: s / c for name, s, c in zip(self.names, sums, counts, strict=True) if c > 0}
