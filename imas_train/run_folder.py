"""One run per folder: the run folder's writability check and its exclusive lock (held by the main process).

A second training into a folder in use is refused, naming the holder's PID and host; the kernel releases the lock
when its holder exits however it exits, so a crashed run never leaves the folder locked.

Once the lock is held, no other process can be writing into the folder, so the temporaries of atomic writes that a
killed run left behind (``.teacher.safetensors.<random>.tmp``, ``.best.json.<random>.tmp`` and the like, in the run
folder and in ``easiness/``; `imas_core.atomic.stale_temporaries`) are removed.

A new run (no ``--resume``) into a folder that already holds a run (`previous_run`: ``state/``, a teacher, a best
model, ``config.yaml`` or ``run.json``) is refused, because the two runs' files would mix (new best model and plots
beside the old teacher, easiness CSVs of both, two TensorBoard logs, checkpoints of both in ``state/``). With
``overwrite`` the previous run's files are deleted first, still under the lock (`clear_previous_run`): only the
names a run writes (`RUN_FILES`, and in `RUN_FOLDERS` the entries that match their patterns). Anything else, such as
an exported ``model.onnx``, predictions or the user's notes, stays where it is and is named in the log.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from imas_core.atomic import FolderIsAFile, probe_writable, stale_temporaries
from imas_core.errors import TrainingError

__all__ = [
    "RUN_FILES",
    "RUN_FOLDERS",
    "RunLock",
    "any_process",
    "check_writable",
    "claim_run_folder",
    "clear_previous_run",
    "previous_run",
    "remove_stale_temporaries",
]

_LOCK_FILE = ".lock"
_TEMPORARY_FOLDERS = (".", "easiness")  # where the run's atomic writes go (state/ cleans its own .tmp-* saves)
_ATOMIC_TEMPORARY = ".*.tmp"  # `imas_core.atomic` temporaries (`.<name>.<8 characters>.tmp`)
# What a run writes at the top of its folder (train.train's docstring lists them; the lock file stays)
RUN_FILES = ("teacher.safetensors", "teacher.json", "best.safetensors", "best.json", "config.yaml", "run.json",
             "easiness.png", "miou.png")  # fmt: skip
# The run's folders and the entries a run writes in each (checkpoint.py: state/; train.py: easiness/; Accelerate's
# TensorBoard tracker: tensorboard/); other entries in them are not the run's
RUN_FOLDERS = {
    "state": ("step-*", "damaged-step-*", ".tmp-*", "latest", _ATOMIC_TEMPORARY),
    "easiness": ("epoch_*.csv", _ATOMIC_TEMPORARY),
    "tensorboard": ("events.out.tfevents.*",),
}
_MARKERS = ("state", "teacher.safetensors", "best.safetensors", "config.yaml", "run.json")  # a folder holds a run
log = logging.getLogger(__name__)


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove it writable by creating and removing a file in it (permission bits say
    nothing for root, read-only mounts or full quotas).

    Raises:
        TrainingError: `folder` is a file, cannot be created, or refuses a new file; the OS reason is named.
    """
    try:
        probe_writable(folder)
    except FolderIsAFile as err:
        raise TrainingError(
            f"run folder {folder} is an existing file, not a folder; choose another run.output_dir"
        ) from err
    except OSError as err:
        raise TrainingError(f"run folder {folder} is not writable: {err.strerror or err}") from err


class RunLock:
    """An exclusive OS lock (``fcntl.flock``) on ``<run>/.lock``: one run per folder.

    The main process takes it before anything is written and holds it until `train` returns; the file records the
    holder's PID, host and start time, which a refused run names. The kernel releases the lock when the holder
    exits however it exits (crash, SIGKILL), so no stale lock survives a dead run; the file itself stays. On NFS,
    flock needs working lock support (NFSv4 or lockd); where the OS refuses, the run stops with that error.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / _LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting.

        Raises:
            TrainingError: another process holds it (its PID and host are named), or the OS cannot lock the file.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise TrainingError(f"cannot create the run lock {self.path}: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise TrainingError(f"cannot lock {self.path}: {err.strerror or err}") from err
            raise TrainingError(
                f"run folder {self.path.parent} is in use by another training ({self._holder()}); wait for it to "
                "end or choose another run.output_dir"
            ) from err
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays, naming the last holder)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"its details are not in {self.path} yet"


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the atomic-write temporaries a killed run left in `run_dir` and its ``easiness/`` folder (call it only
    while holding the run lock); returns what was removed."""
    removed = []
    for folder in _TEMPORARY_FOLDERS:
        for path in stale_temporaries(run_dir / folder):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    if removed:
        log.info(f"removed {len(removed)} temporary file(s) left by an interrupted write: "
                 f"{', '.join(p.name for p in removed)}")  # fmt: skip
    return removed


def previous_run(run_dir: Path) -> list[str]:
    """What shows that `run_dir` holds a run (``state/``, a teacher, a best model, ``config.yaml``, ``run.json``);
    empty for a new or empty folder, or one holding other files only."""
    return [f"{name}/" if name == "state" else name for name in _MARKERS if (run_dir / name).exists()]


def _not_the_runs(run_dir: Path) -> list[str]:
    """Entries of `run_dir` (and of its run folders) that a run does not write, relative to `run_dir`, sorted."""
    others = []
    for entry in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if entry.name in RUN_FILES or entry.name == _LOCK_FILE:
            continue
        if entry.name in RUN_FOLDERS and entry.is_dir():
            patterns = RUN_FOLDERS[entry.name]
            others += [f"{entry.name}/{e.name}" for e in sorted(entry.iterdir())
                       if not any(fnmatch.fnmatchcase(e.name, p) for p in patterns)]  # fmt: skip
            continue
        others.append(entry.name + ("/" if entry.is_dir() else ""))
    return others


def clear_previous_run(run_dir: Path) -> tuple[list[str], list[str]]:
    """Delete the files a run writes in `run_dir` (`RUN_FILES`, and the matching entries of `RUN_FOLDERS`, which are
    removed when left empty); call it only while holding the run lock. Nothing else is touched: the lock file,
    exported models, predictions and any file of the user's stay.

    Returns:
        (what was deleted, what stays because a run does not write it), relative to `run_dir`.

    Raises:
        TrainingError: a file of the run cannot be deleted (the OS reason is named).
    """
    removed = []
    kept = _not_the_runs(run_dir)
    try:
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(name)
        for folder, patterns in RUN_FOLDERS.items():
            base = run_dir / folder
            if not base.is_dir() or base.is_symlink():
                continue
            for entry in sorted(base.iterdir()):
                if not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                if f"{folder}/" not in removed:
                    removed.append(f"{folder}/")
            if not any(base.iterdir()):
                base.rmdir()
    except OSError as err:
        raise TrainingError(f"--overwrite: cannot delete {err.filename or run_dir}: {err.strerror or err}") from err
    return removed, kept


def _refusal(run_dir: Path, found: list[str]) -> str:
    kept = _not_the_runs(run_dir)
    listed = ", ".join(kept[:8]) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
    stays = f"; files a run does not write stay: {listed}" if kept else ""
    return (
        f"run folder {run_dir} already holds a run ({', '.join(found)}); a new run there would mix its files with "
        "that run's. Choose one: continue it with --resume auto; train into another folder with --output-dir DIR "
        "(or --set run.output_dir=DIR); or start over with --overwrite, which first deletes what a run writes "
        f"(state/, easiness/, tensorboard/, teacher.*, best.*, config.yaml, run.json, easiness.png, miou.png){stays}"
    )


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on any one: a collective, so every process must call it."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def claim_run_folder(
    accelerator: Accelerator, run_dir: Path, *, new_run: bool = False, overwrite: bool = False
) -> RunLock:
    """Check that the run folder is writable and lock it (main process); every process stops if either fails.
    Then the stale temporaries of the folder are removed (`remove_stale_temporaries`). For a `new_run` (no resume)
    into a folder that holds a run (`previous_run`), that run's files are deleted when `overwrite`
    (`clear_previous_run`, under the lock), else the run is refused.

    Raises:
        TrainingError: the folder is not writable, another run holds it (named by PID and host), or a new run
            without `overwrite` would mix with the run it holds (the message names the three ways on).
    """
    lock = RunLock(run_dir)
    error: TrainingError | None = None
    if accelerator.is_main_process:
        try:
            check_writable(run_dir)
            lock.acquire()
            try:
                remove_stale_temporaries(run_dir)  # no live writer can own them now
            except OSError as err:  # a temporary that cannot be removed (permissions): the run still may proceed
                log.warning(f"cannot remove stale temporaries in {run_dir}: {err}")
            found = previous_run(run_dir) if new_run else []
            if found and not overwrite:
                raise TrainingError(_refusal(run_dir, found))
            if found:
                removed, kept = clear_previous_run(run_dir)
                stays = f"; not a run's, kept: {', '.join(kept)}" if kept else ""
                log.info(f"--overwrite: deleted the previous run's {', '.join(removed)} in {run_dir}{stays}")
        except TrainingError as err:
            error = err
        except OSError as err:  # the folder cannot be listed: stop every process rather than guess
            error = TrainingError(f"cannot inspect run folder {run_dir}: {err.strerror or err}")
    if any_process(accelerator, error is not None):
        lock.release()
        raise error or TrainingError(f"the main process could not take the run folder {run_dir} (see its error)")
    return lock
