"""Meters: a name nobody reported since the last flush is left out (the progress bar then shows no `e=nan`)."""

from __future__ import annotations

import torch

from imas_train.meters import Meters


def test_flush_leaves_out_names_not_reported_since_the_last_flush() -> None:
    meters = Meters(["loss", "easiness_mean"])
    meters.add({"loss": torch.tensor(2.0)})  # a warm-up iteration: supervised loss only
    meters.add({"loss": torch.tensor(4.0)})
    assert meters.flush() == {"loss": 3.0}
    meters.add({"loss": torch.tensor(1.0), "easiness_mean": torch.tensor(0.5)})
    assert meters.flush() == {"loss": 1.0, "easiness_mean": 0.5}
    assert meters.flush() == {}
