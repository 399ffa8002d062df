"""One run per folder: the run folder's writability check and its exclusive lock (held by the main process).

A second training into a folder in use is refused, naming the holder's PID and host; the kernel releases the lock
when its holder exits however it exits, so a crashed run never leaves the folder locked.

Once the lock is held, no other process can be writing into the folder, so the temporaries of atomic writes that a
killed run left behind (``.teacher.safetensors.<random>.tmp``, ``.best.json.<random>.tmp`` and the like, in the run
folder and in ``easiness/``; `imas_core.atomic.stale_temporaries`) are removed. Nothing else is touched.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from imas_core.atomic import stale_temporaries
from imas_core.errors import TrainingError

__all__ = ["RunLock", "any_process", "check_writable", "claim_run_folder", "remove_stale_temporaries"]

_LOCK_FILE = ".lock"
_TEMPORARY_FOLDERS = (".", "easiness")  # where the run's atomic writes go (state/ cleans its own .tmp-* saves)
log = logging.getLogger(__name__)


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove it writable by creating and removing a file in it (permission bits say
    nothing for root, read-only mounts or full quotas).

    Raises:
        TrainingError: `folder` is a file, cannot be created, or refuses a new file; the OS reason is named.
    """
    if folder.exists() and not folder.is_dir():
        raise TrainingError(f"run folder {folder} is an existing file, not a folder; choose another run.output_dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
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


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on any one: a collective, so every process must call it."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def claim_run_folder(accelerator: Accelerator, run_dir: Path) -> RunLock:
    """Check that the run folder is writable and lock it (main process); every process stops if either fails.
    Then the stale temporaries of the folder are removed (`remove_stale_temporaries`).

    Raises:
        TrainingError: the folder is not writable or another run holds it (named by PID and host).
    """
    lock = RunLock(run_dir)
    error: TrainingError | None = None
    if accelerator.is_main_process:
        try:
            check_writable(run_dir)
            lock.acquire()
            remove_stale_temporaries(run_dir)  # no live writer can own them now
        except TrainingError as err:
            error = err
        except OSError as err:  # a temporary that cannot be removed (permissions): the run still may proceed
            log.warning(f"cannot remove stale temporaries in {run_dir}: {err}")
    if any_process(accelerator, error is not None):
        lock.release()
        raise error or TrainingError(f"the main process could not take the run folder {run_dir} (see its error)")
    return lock
