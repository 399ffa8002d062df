"""Resume is exact, saves are atomic, and a non-finite loss stops training without touching the last checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import imas_train.checkpoint
import imas_train.methods.imas
import imas_train.train
from imas_core.errors import TrainingError
from imas_train.checkpoint import Progress, find_checkpoint
from tests.train.resume_helpers import Killed, kill_at_iteration
from tests.train.test_train import demo_cfg

# L = 2 iterations per epoch, 2 epochs: the EMA decay is 0 in epoch 0 and > 0 in epoch 1, so the resumed
# segment exercises the real EMA; checkpoints every iteration.
SETTINGS = ("run.checkpoint_every=1", "run.keep_checkpoints=2", "run.tensorboard=false", "run.easiness_csv=false")


def test_resume_mid_epoch_is_bitwise_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = imas_train.train.train(demo_cfg(tmp_path / "full", *SETTINGS))
    cfg = demo_cfg(tmp_path / "split", *SETTINGS)
    with monkeypatch.context() as patch:
        kill_at_iteration(patch, 3)  # epoch 1, batch 1: the last checkpoint is step-00000003, mid-epoch
        with pytest.raises(Killed):
            imas_train.train.train(cfg)
    assert find_checkpoint(cfg.run.output_dir, "auto").name == "step-00000003"
    resumed = imas_train.train.train(cfg, resume="auto")  # a fresh train() call, as after a restart
    assert resumed.iterations == full.iterations == 4
    assert (tmp_path / "split" / "teacher.safetensors").read_bytes() == full.teacher_path.read_bytes()
    assert resumed.miou_final == full.miou_final
    kept = sorted(p.name for p in (tmp_path / "split" / "state").iterdir())
    assert kept == ["latest", "step-00000003", "step-00000004"]  # keep_checkpoints = 2, no .tmp left


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = demo_cfg(tmp_path / "run", *SETTINGS, "optim.epochs=1")
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == "step-00000002":
            raise Killed("killed during the rename")
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(imas_train.checkpoint.os, "replace", replace)
        with pytest.raises(Killed):
            imas_train.train.train(cfg)
    state = tmp_path / "run" / "state"
    assert [p.name for p in state.glob(".tmp-2-*")] == [f".tmp-2-{os.getpid()}"]  # the save's PID in its name
    assert (state / "latest").read_text().strip() == "step-00000001"
    (state / "step-00000009").mkdir()  # a directory without progress.json is never picked
    assert find_checkpoint(state.parent, "auto") == state / "step-00000001"
    (state / "latest").unlink()  # without `latest`, the newest COMPLETE checkpoint by its recorded step
    assert find_checkpoint(state.parent, "auto") == state / "step-00000001"
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    result = imas_train.train.train(cfg, resume="auto")
    assert result.iterations == 2 and not list(state.glob(".tmp-*"))
    assert loads and all(w is True for w in loads)  # optimizer and RNG files: never unrestricted pickle


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = demo_cfg(tmp_path / "run", *SETTINGS)
    real = imas_train.methods.imas.imas_step
    calls = []

    def poisoned(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out["loss_u"] = out["loss_u"] * float("nan")
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(imas_train.methods.imas, "imas_step", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss at iteration 2: .*loss_u=nan.*step-00000002"):
        imas_train.train.train(cfg)
    state = tmp_path / "run" / "state"
    assert sorted(p.name for p in state.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    progress = Progress()
    progress.load_state_dict(__import__("json").loads((state / "step-00000002" / "progress.json").read_text()))
    assert progress.step == 2
    monkeypatch.setattr(imas_train.methods.imas, "imas_step", real)
    assert imas_train.train.train(cfg, resume="auto").iterations == 4
