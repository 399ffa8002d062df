"""A new run into a folder that holds a run is refused (exit 2, the three ways on in one message), or with
``--overwrite`` deletes that run's files first (under the run lock; files a run does not write stay). The torch
thread count of a CPU run is ``run.cpu_threads`` or the default policy, named in the ``devices:`` line."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import imas_train.train
from imas_core.errors import ConfigError, TrainingError
from imas_train.cli import main
from imas_train.config import dump_config
from imas_train.run_folder import RunLock, clear_previous_run, previous_run
from tests.train.test_train import demo_cfg

# L = 2 iterations per epoch; 2 epochs: checkpoints step-2 and step-4, easiness epoch_000 and epoch_001
FIRST = ("optim.epochs=2", "run.keep_checkpoints=3")


def _tree(folder: Path) -> dict[str, int]:
    """Every file under `folder` but the lock (which records each holder) with its modification time in ns."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock")
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in files}


def _finished_run(tmp_path: Path) -> tuple[Path, Path]:
    """A finished 4-iteration run with files of the user's beside it; returns (run folder, a copy of its config)."""
    run = tmp_path / "run"
    imas_train.train.train(demo_cfg(run, *FIRST))
    (run / "model.onnx").write_bytes(b"an export")
    (run / "notes.txt").write_text("mine")
    (run / "easiness" / "mine.csv").write_text("mine")
    config = tmp_path / "run_config.yaml"
    shutil.copy(run / "config.yaml", config)
    return run, config


def test_a_new_run_into_a_used_folder_is_refused_then_overwrite_replaces_the_run_files_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = _finished_run(tmp_path)
    assert sorted(p.name for p in (run / "easiness").iterdir()) == ["epoch_000.csv", "epoch_001.csv", "mine.csv"]
    assert sorted(p.name for p in (run / "state").iterdir()) == ["latest", "step-00000002", "step-00000004"]
    before = _tree(run)
    second = ["--config", str(config), "--set", "optim.max_iters=2"]
    capsys.readouterr()

    assert main(second) == 2  # refused: nothing written, nothing deleted
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"imas-train: error: run folder {run} already holds a run (")
    for said in ("state/, teacher.safetensors, best.safetensors, config.yaml, run.json)", "--resume auto",
                 "--output-dir DIR", "--set run.output_dir=DIR", "--overwrite",
                 "stay: easiness/mine.csv, model.onnx, notes.txt"):  # fmt: skip
        assert said in err, said
    assert _tree(run) == before

    assert main([*second, "--overwrite", "--resume", "auto"]) == 2
    assert "cannot go with --resume" in capsys.readouterr().err and _tree(run) == before

    assert main([*second, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "--overwrite: deleted the previous run's" in err and "kept: easiness/mine.csv, model.onnx, notes.txt" in err
    # only the new run's files: one checkpoint, one epoch of CSVs, one TensorBoard log, the new records
    assert sorted(p.name for p in (run / "state").iterdir()) == ["latest", "step-00000002"]
    assert sorted(p.name for p in (run / "easiness").iterdir()) == ["epoch_000.csv", "mine.csv"]
    assert len(list((run / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    teacher = json.loads((run / "teacher.json").read_text())
    assert teacher["step"] == 2 and teacher["training_summary"]["miou_history"][0][0] == 0
    assert json.loads((run / "run.json").read_text())["resumed_from"] is None
    assert (run / "model.onnx").read_bytes() == b"an export" and (run / "notes.txt").read_text() == "mine"
    assert (run / ".lock").is_file()

    assert main(["--config", str(config), "--resume", "auto"]) == 0  # continuing it stays possible: 2 -> 4
    assert json.loads((run / "teacher.json").read_text())["step"] == 4


def test_overwrite_deletes_nothing_while_another_process_holds_the_folder(tmp_path: Path) -> None:
    run, _ = _finished_run(tmp_path)
    before = _tree(run)
    holder = RunLock(run)
    holder.acquire()  # a second lock is refused even within one process
    try:
        with pytest.raises(TrainingError, match="in use by another training"):
            imas_train.train.train(demo_cfg(run, "optim.max_iters=2"), overwrite=True)
    finally:
        holder.release()
    assert _tree(run) == before


def test_empty_new_or_foreign_folders_start_fresh_and_resume_auto_starts_fresh_without_a_checkpoint(
    tmp_path: Path,
) -> None:
    fresh = demo_cfg(tmp_path / "new", "optim.max_iters=2", "run.tensorboard=false")
    assert imas_train.train.train(fresh, resume="auto").iterations == 2  # a folder that does not exist yet
    empty = tmp_path / "empty"
    empty.mkdir()
    assert imas_train.train.train(demo_cfg(empty, "optim.max_iters=2", "run.tensorboard=false"), resume="auto")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")  # files a run does not write do not make a folder used
    imas_train.train.train(demo_cfg(foreign, "optim.max_iters=2", "run.tensorboard=false"))
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "teacher.safetensors").is_file()


@pytest.mark.parametrize("marker", ["state", "teacher.safetensors", "best.safetensors", "config.yaml", "run.json"])
def test_what_makes_a_folder_used(tmp_path: Path, marker: str) -> None:
    assert previous_run(tmp_path) == [] and previous_run(tmp_path / "missing") == []
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "miou.png").write_bytes(b"x")  # plots alone are no run to protect
    assert previous_run(tmp_path) == []
    (tmp_path / marker).mkdir() if marker == "state" else (tmp_path / marker).write_text("x")
    assert previous_run(tmp_path) == [marker + ("/" if marker == "state" else "")]


def test_clear_previous_run_deletes_only_what_a_run_writes(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("x")
    run = tmp_path / "run"
    for name in ("teacher.safetensors", "teacher.json", "best.safetensors", "best.json", "config.yaml", "run.json",
                 "easiness.png", "miou.png", ".lock", "model.onnx", "photo.png",
                 "state/latest", "state/step-00000004/model.safetensors", "state/damaged-step-00000002/x",
                 "state/.tmp-6-123/x", "state/README", "easiness/epoch_000.csv", "easiness/notes.csv",
                 "tensorboard/events.out.tfevents.1.host", "pred/labels/a.png"):  # fmt: skip
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    (run / "state" / "step-00000008").symlink_to(outside, target_is_directory=True)  # unlinked, never followed
    removed, kept = clear_previous_run(run)
    assert kept == ["easiness/notes.csv", "model.onnx", "photo.png", "pred/", "state/README"]
    assert set(removed) >= {"teacher.safetensors", "config.yaml", "miou.png", "state/", "easiness/", "tensorboard/"}
    left = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert left == [".lock", "easiness/notes.csv", "model.onnx", "photo.png", "pred/labels/a.png", "state/README"]
    assert not (run / "tensorboard").exists() and (outside / "precious.txt").is_file()
    assert previous_run(run) == ["state/"]  # a folder of the user's inside state/ keeps it "used"


def test_cpu_threads_are_the_config_s_or_the_default_policy_and_restored_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imas_train.train")
    torch.set_num_threads(2)
    try:
        imas_train.train.train(demo_cfg(tmp_path / "a", "optim.max_iters=1", "run.tensorboard=false",
                                        "run.cpu_threads=3"))  # fmt: skip
        assert torch.get_num_threads() == 2  # the caller's count is given back
        imas_train.train.train(demo_cfg(tmp_path / "b", "optim.max_iters=1", "run.tensorboard=false"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    devices = [r.getMessage() for r in caplog.records if "devices:" in r.getMessage()]
    assert len(devices) == 2
    assert "on cpu (3 torch thread(s) per process, run.cpu_threads)" in devices[0]
    assert "on cpu (1 torch thread(s) per process, default policy)" in devices[1]
    assert "cpu_threads: 3" in (tmp_path / "a" / "config.yaml").read_text()
    assert "cpu_threads: null" in dump_config(demo_cfg(tmp_path / "c"))
    with pytest.raises(ConfigError, match="run.cpu_threads must be >= 1"):
        imas_train.train.train(demo_cfg(tmp_path / "d", "run.cpu_threads=0"))
