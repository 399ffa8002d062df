"""A stand-in for SIGKILL at a chosen iteration, and the kill-then-resume sequence the resume tests share."""

from __future__ import annotations

import pytest

import imas_train.train
from imas_train.config import TrainConfig
from imas_train.train import TrainResult


class Killed(Exception):
    """Stands in for SIGKILL at a chosen point."""


def kill_at_iteration(monkeypatch: pytest.MonkeyPatch, target: int) -> None:
    """Make the loop die just before iteration `target` draws its randomness (after the checkpoint of `target`)."""
    real = imas_train.train.step_generator

    def generator(seed: int, rank: int, step: int):  # type: ignore[no-untyped-def]
        if step == target:
            raise Killed(f"killed before iteration {step}")
        return real(seed, rank, step)

    monkeypatch.setattr(imas_train.train, "step_generator", generator)


def killed_then_resumed(cfg: TrainConfig, monkeypatch: pytest.MonkeyPatch, at: int) -> TrainResult:
    """Train `cfg` until it is killed before iteration `at`, then resume it with ``resume="auto"`` in a fresh call."""
    with monkeypatch.context() as patch:
        kill_at_iteration(patch, at)
        with pytest.raises(Killed):
            imas_train.train.train(cfg)
    return imas_train.train.train(cfg, resume="auto")
