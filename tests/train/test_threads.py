"""The CPU thread policy (`imas_train.threads`) and the torch inference backend's use of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imas_core.errors import ConfigError
from imas_train.threads import apply_cpu_threads, available_cores, default_cpu_threads


@pytest.fixture(autouse=True)
def _keep_threads() -> object:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_policy_and_explicit_counts() -> None:
    assert 1 <= available_cores() <= 4096
    assert all(default_cpu_threads(n) >= 1 for n in (1, 2, 8))
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        default_cpu_threads(0)
    assert apply_cpu_threads(None, 1) == (default_cpu_threads(1), "default policy")
    assert torch.get_num_threads() == default_cpu_threads(1)
    assert apply_cpu_threads(2, 1) == (2, "run.cpu_threads") and torch.get_num_threads() == 2
    with pytest.raises(ConfigError, match="--threads must be >= 1"):
        apply_cpu_threads(0, 1, what="--threads")


def test_torch_backend_uses_the_default_policy_on_the_cpu_and_gives_the_count_back(tiny_teacher: Path) -> None:
    from imas_core.runners import open_backend

    torch.set_num_threads(2)
    with open_backend(tiny_teacher, backend="torch", device="cpu") as backend:
        assert torch.get_num_threads() == default_cpu_threads(1)
        assert backend.runtime.endswith(f"cpu, {default_cpu_threads(1)} thread(s)")
    assert torch.get_num_threads() == 2
    with open_backend(tiny_teacher, backend="torch", device="cpu", threads=3) as backend:
        assert torch.get_num_threads() == 3 and backend.runtime.endswith("cpu, 3 thread(s)")
    assert torch.get_num_threads() == 2


def test_default_policy_leaves_one_core_per_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import imas_train.threads as threads

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, processes, expected in ((2, 1, 1), (1, 1, 1), (8, 1, 7), (8, 2, 3), (16, 4, 3), (4, 8, 1)):
        monkeypatch.setattr(threads, "available_cores", lambda cores=cores: cores)
        assert threads.default_cpu_threads(processes) == expected, (cores, processes)
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 processes on this machine out of 8 in all
    assert threads.default_cpu_threads(8) == 7
