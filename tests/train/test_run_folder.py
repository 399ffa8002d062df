"""One run per folder (an OS lock that dies with its holder), and a run folder that cannot be written is refused
before anything else happens. Two real trainings into one folder: tests/train/test_stop_signals.py."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

import imas_train.train
from imas_core.errors import TrainingError
from imas_train.cli import main
from imas_train.run_folder import RunLock
from tests.train.test_train import REPO, demo_cfg


def test_the_run_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path: Path) -> None:
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # the holder: take the lock, say so, wait to be killed
        try:
            RunLock(tmp_path).acquire()
            os.write(ready_w, b"locked")
            signal.pause()
        finally:
            os._exit(1)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 16) == b"locked"
        lock = RunLock(tmp_path)
        with pytest.raises(TrainingError, match=f"in use by another training \\(pid {child} on host "):
            lock.acquire()
        with pytest.raises(TrainingError, match=socket.gethostname()):
            lock.acquire()
    finally:
        os.kill(child, signal.SIGKILL)  # a crash: no chance to unlock
        os.waitpid(child, 0)
        os.close(ready_r)
    lock.acquire()  # the kernel released the dead holder's lock
    assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()
    with pytest.raises(TrainingError, match=f"pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()  # a second lock in the same process is refused too
    lock.release()
    RunLock(tmp_path).acquire()


def _train_cli(run_dir: Path) -> int:
    return main(["--config", str(REPO / "configs" / "demo.yaml"), "--set", f"run.output_dir={run_dir}"])


def test_a_run_folder_under_a_file_or_being_a_file_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "file").write_text("x")
    assert _train_cli(tmp_path / "file" / "run") == 2
    err = capsys.readouterr().err
    assert f"run folder {tmp_path / 'file' / 'run'} is not writable: Not a directory" in err
    assert _train_cli(tmp_path / "file") == 2
    assert f"run folder {tmp_path / 'file'} is an existing file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0o500 folder: only the file cases apply")
def test_a_read_only_run_folder_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o500)
    try:
        with pytest.raises(TrainingError, match=f"run folder {run} is not writable: Permission denied"):
            imas_train.train.train(demo_cfg(run))
    finally:
        run.chmod(0o700)
    assert sorted(p.name for p in run.iterdir()) == []
