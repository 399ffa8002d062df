"""SIGTERM / SIGUSR1 stop training after a checkpoint, with a documented exit code, and the run resumes exactly.

The in-process test sends real signals to this process from inside the loop. The `slow` tests run the two
launch forms as real processes: ``python -m imas_train`` receiving SIGTERM (and a second run into the same folder,
refused while the first holds it), and ``accelerate launch`` whose launcher is killed, so that only the kernel's
parent-death signal can tell the orphaned worker to stop; a third runs two torchrun ranks of which only one gets
the signal, and both must stop after the same iteration.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import imas_train.train
from imas_core.errors import EXIT_STOPPED, TrainingStopped, exit_code
from imas_train.cli import main
from tests.train.test_train import REPO, demo_cfg

SETTINGS = ("run.checkpoint_every=100", "run.keep_checkpoints=2", "run.tensorboard=false")
# the demo shrunk as in tests/train/test_train.py (L = 2), made long: processes are stopped by a signal mid-run
LONG = [
    "data.demo.num_labeled=4", "data.demo.num_unlabeled=4", "data.demo.num_val=3", "data.demo.height=40",
    "data.demo.width=48", "data.crop_size=33", "data.batch_size=2", "data.num_workers=0", "eval.window=48",
    "imas.sup_only_epochs=0", "optim.epochs=100000", "eval.every_epochs=100000", "run.log_every=1000",
    "run.tensorboard=false", "run.easiness_csv=false", "run.keep_checkpoints=2",
]  # fmt: skip
ACCELERATE = [
    sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
]  # fmt: skip
STOPPED = re.compile(r"stopped by (SIGTERM|SIGUSR1) after iteration (\d+); checkpoint (\S+);")


def _signal_before_iteration(monkeypatch: pytest.MonkeyPatch, target: int, sig: signal.Signals) -> None:
    real = imas_train.train.step_generator

    def generator(seed: int, rank: int, step: int):  # type: ignore[no-untyped-def]
        if step == target:
            os.kill(os.getpid(), sig)  # delivered now; the loop finishes this iteration before it stops
        return real(seed, rank, step)

    monkeypatch.setattr(imas_train.train, "step_generator", generator)


@pytest.mark.parametrize(
    ("sig", "iteration", "pending"),
    [(signal.SIGTERM, 2, False), (signal.SIGUSR1, 1, True)],  # mid-epoch; the last iteration of epoch 0 (L = 2)
    ids=["SIGTERM-mid-epoch", "SIGUSR1-at-epoch-end"],
)
def test_signal_stops_after_the_iteration_with_a_checkpoint_and_resume_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals, iteration: int, pending: bool
) -> None:
    full = imas_train.train.train(demo_cfg(tmp_path / "full", *SETTINGS))
    cfg = demo_cfg(tmp_path / "split", *SETTINGS)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with monkeypatch.context() as patch:
        _signal_before_iteration(patch, iteration, sig)
        with pytest.raises(TrainingStopped, match=f"stopped by {sig.name} after iteration {iteration + 1}") as info:
            imas_train.train.train(cfg)
    assert exit_code(info.value) == EXIT_STOPPED[sig.name] == {"SIGTERM": 143, "SIGUSR1": 138}[sig.name]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before  # handlers restored
    state = tmp_path / "split" / "state"
    saved = state / f"step-{iteration + 1:08d}"
    progress = json.loads((saved / "progress.json").read_text())
    assert (state / "latest").read_text().strip() == saved.name and progress["step"] == iteration + 1
    assert progress["epoch_end_pending"] is pending  # the epoch's end (CSV, evaluation) is left to the resume
    assert (tmp_path / "split" / "easiness" / "epoch_000.csv").exists() is not pending
    resumed = imas_train.train.train(cfg, resume="auto")
    assert resumed.iterations == full.iterations == 4 and resumed.miou_final == full.miou_final
    assert (tmp_path / "split" / "teacher.safetensors").read_bytes() == full.teacher_path.read_bytes()
    for csv in ("epoch_000.csv", "epoch_001.csv"):
        assert (tmp_path / "split" / "easiness" / csv).read_text() == (tmp_path / "full" / "easiness" / csv).read_text()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _wait_for(condition, what: str, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _check_stop_and_resume(run: Path, log: str) -> None:
    """The stopped run's message names a checkpoint at its last iteration; `--resume auto` continues from it."""
    found = STOPPED.search(log)
    assert found is not None and found.group(1) == "SIGTERM", log[-3000:]
    step, checkpoint = int(found.group(2)), Path(found.group(3))
    assert checkpoint == run / "state" / f"step-{step:08d}"
    assert (run / "state" / "latest").read_text().strip() == checkpoint.name
    assert json.loads((checkpoint / "progress.json").read_text())["step"] == step
    overrides = [*LONG, f"run.output_dir={run}", f"optim.max_iters={step + 1}"]
    assert main(["--config", str(REPO / "configs" / "demo.yaml"), "--resume", "auto", "--set", *overrides]) == 0
    assert json.loads((run / "run.json").read_text())["resumed_from"] == str(checkpoint)
    assert json.loads((run / "teacher.json").read_text())["step"] == step + 1


@pytest.mark.slow
def test_python_m_sigterm_checkpoints_and_a_second_run_into_the_folder_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "imas_train", "--config", str(REPO / "configs" / "demo.yaml"), "--set", *LONG,
           f"run.output_dir={run}"]  # fmt: skip
    with open(tmp_path / "first.log", "w") as first_log:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=first_log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: (run / "state" / "latest").is_file(), "the first run's first checkpoint")
        written = {name: (run / name).stat().st_mtime_ns for name in ("config.yaml", "run.json")}
        second = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended early"
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert second.stderr.count("imas-train: error:") == 1 and "Traceback" not in second.stderr
        assert {name: (run / name).stat().st_mtime_ns for name in written} == written  # refused before writing
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 143
    finally:
        if first.poll() is None:
            first.kill()
    _check_stop_and_resume(run, (tmp_path / "first.log").read_text())


# Runs `accelerate launch` as a child of a subreaper, kills the launcher with SIGTERM, and reaps the orphaned worker
# (named by the run lock) to report its exit code: {"launcher": rc, "worker": rc}.
HARNESS = textwrap.dedent(
    """
    import ctypes, json, os, signal, subprocess, sys, time
    run, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us
    with open(log, "w") as fh:
        launcher = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    deadline, worker = time.monotonic() + 90, None
    while worker is None and time.monotonic() < deadline:
        try:
            pid = json.load(open(os.path.join(run, ".lock")))["pid"]
            if os.path.isfile(os.path.join(run, "state", "latest")):
                worker = pid
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    if worker is None:
        launcher.kill()
        sys.exit("no training worker appeared")
    launcher.send_signal(signal.SIGTERM)  # a plain kill: the launcher dies without telling its worker
    launcher.wait()
    deadline = time.monotonic() + 60
    while True:
        pid, status = os.waitpid(worker, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.kill(worker, signal.SIGKILL)
            os.waitpid(worker, 0)
            sys.exit("the worker still ran 60 s after its launcher died")
        time.sleep(0.05)
    print(json.dumps({"launcher": launcher.returncode, "worker": os.waitstatus_to_exitcode(status)}))
    """
)


@pytest.mark.slow
def test_accelerate_launch_worker_checkpoints_when_its_launcher_is_killed(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "worker.log"
    launch = [*ACCELERATE, str(REPO / "imas_train"), "--config", str(REPO / "configs" / "demo.yaml"), "--set", *LONG,
              f"run.output_dir={run}"]  # fmt: skip
    env = _env()
    env.pop("PYTHONPATH")  # the directory form repairs sys.path itself
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(run), str(log), *launch], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + log.read_text()[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == {"launcher": -signal.SIGTERM, "worker": 143}, log.read_text()[-3000:]
    _check_stop_and_resume(run, log.read_text())


# Two torchrun ranks; only rank 1 receives SIGUSR1 (before iteration 2). Each records how its train() ended.
RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import imas_train.train as loop
    from imas_core.errors import TrainingStopped
    from imas_train.config import load_config

    real = loop.step_generator

    def generator(seed, rank, step):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(seed, rank, step)

    loop.step_generator = generator
    try:
        loop.train(load_config(sys.argv[1], sys.argv[3:]))
        outcome = "finished"
    except TrainingStopped as err:
        outcome = str(err)
    with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.txt"), "w") as fh:
        fh.write(outcome)
    """
)


@pytest.mark.slow
def test_two_processes_stop_after_the_same_iteration_when_one_gets_the_signal(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = tmp_path / "rank_stop.py"
    script.write_text(RANK_SCRIPT)
    overrides = [*LONG, "data.demo.num_unlabeled=8", "optim.epochs=2", f"run.output_dir={run}"]  # L = 2
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", str(script), str(REPO / "configs" / "demo.yaml"),
           str(tmp_path), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = run / "state" / "step-00000003"
    for rank in (0, 1):
        outcome = (tmp_path / f"rank{rank}.txt").read_text()
        assert outcome.startswith(f"stopped by SIGUSR1 after iteration 3; checkpoint {saved};"), (rank, outcome)
    assert {p.name for p in saved.glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
