"""A damaged checkpoint is named and, with ``--resume auto``, skipped; a full disk during a save leaves the previous
checkpoint as it was and no partial directory."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
from accelerate import Accelerator

import imas_train.train
from imas_core.errors import TrainingError
from imas_train.checkpoint import find_checkpoint, verify_checkpoint
from tests.train.test_train import demo_cfg

# L = 2 iterations, 1 epoch, a checkpoint after every iteration: step-00000001 and step-00000002
SETTINGS = ("optim.epochs=1", "run.checkpoint_every=1", "run.keep_checkpoints=2", "run.tensorboard=false")


def test_a_truncated_file_is_named_and_auto_resume_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = demo_cfg(tmp_path / "run", *SETTINGS)
    imas_train.train.train(cfg)
    state = tmp_path / "run" / "state"
    newest, older = state / "step-00000002", state / "step-00000001"
    assert find_checkpoint(state.parent, "auto") == newest
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TrainingError, match=rf"{weights}: \d+ bytes, but \d+ were saved \(truncated"):
        imas_train.train.train(cfg, resume=str(newest))  # an explicit checkpoint is never skipped
    caplog.set_level(logging.WARNING, logger="imas_train.checkpoint")
    result = imas_train.train.train(cfg, resume="auto")
    assert result.iterations == 2
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resumed_from"] == str(older)
    warnings = [r.getMessage() for r in caplog.records if r.name == "imas_train.checkpoint"]
    assert len(warnings) == 1 and f"skipped {newest}: {weights}" in warnings[0] and "truncated" in warnings[0]
    assert (state / "damaged-step-00000002" / "model.safetensors").is_file()  # set aside, never pruned in its place
    assert (state / "latest").read_text().strip() == "step-00000002" and verify_checkpoint(newest) is None


def test_a_modified_file_fails_the_check_and_no_loadable_checkpoint_is_an_error(tmp_path: Path) -> None:
    cfg = demo_cfg(tmp_path / "run", *SETTINGS)
    imas_train.train.train(cfg)
    state = tmp_path / "run" / "state"
    for step in (1, 2):
        progress = state / f"step-{step:08d}" / "progress.json"
        text = progress.read_text()
        assert f'"step": {step},' in text
        progress.write_text(text.replace(f'"step": {step},', f'"step": {step + 5},'))  # edited, same size
    with pytest.raises(TrainingError, match=r"progress.json: contents differ from what was saved \(sha256 mismatch"):
        verify_checkpoint(state / "step-00000001")
    with pytest.raises(TrainingError, match=r"no checkpoint loads; step-00000002: .*step-00000001: .*sha256"):
        imas_train.train.train(cfg, resume="auto")


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "model.safetensors"), "no space left on model.safetensors"),
        (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "file write failed"),
    ],
    ids=["ENOSPC", "torch-write-error"],
)
def test_a_failed_save_keeps_the_previous_checkpoint_and_no_partial_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception, said: str
) -> None:
    real = Accelerator.save_state
    saves = []

    def save_state(self, output_dir, **kwargs):  # type: ignore[no-untyped-def]
        saves.append(output_dir)
        real(self, output_dir, **kwargs)  # partial files in the temporary folder, then the disk is full
        if len(saves) == 2:
            raise failure

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    cfg = demo_cfg(tmp_path / "run", *SETTINGS)
    state = tmp_path / "run" / "state"
    with pytest.raises(TrainingError) as info:
        imas_train.train.train(cfg)
    message = str(info.value)
    assert f"cannot save checkpoint {state / 'step-00000002'}: " in message and said in message
    assert f"MiB free on {state}" in message
    assert f"the previous checkpoint {state / 'step-00000001'} is intact" in message
    assert sorted(p.name for p in state.iterdir()) == ["latest", "step-00000001"]  # no .tmp-* left
    assert (state / "latest").read_text().strip() == "step-00000001"
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert imas_train.train.train(cfg, resume="auto").iterations == 2
