"""Atomic file writes and checksums: a reader sees the old file or the complete new one, never a part.

Every write goes to a temporary file in the destination folder (a name unique to the process and the call), which is
renamed over the destination. With ``fsync=True`` (the default) the data and the directory entry are flushed to disk
first, so the file also survives a power cut; outputs that can be recomputed (inference results) skip that cost.

Permissions: ``tempfile.mkstemp`` creates the temporary with mode 0600 whatever the umask, so before the rename it is
given ``0o666 & ~umask``, the mode ``open()`` would have given a new file: artifacts and predictions are readable by
the group or everyone exactly as the user's umask says. The umask is read without changing it, from the ``Umask:``
line of ``/proc/self/status`` (Linux >= 4.7), on every write, so a process that changes its umask is followed.
Where that line is missing (macOS, older kernels) it is read once per process with ``os.umask`` set-and-restore
under a lock and cached: the umask is process-wide, so a file another thread creates in that instant could get
the wrong mode, and doing it once bounds that window to one moment per process.

A write killed between the temporary's creation and the rename leaves ``.<name>.<8 random characters>.tmp`` behind;
`stale_temporaries` finds such files in a folder, for a caller that knows no live writer owns them (training removes
them from its run folder once it holds the run lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FolderIsAFile",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_tree",
    "probe_writable",
    "sha256_file",
    "stale_temporaries",
    "umask",
]

_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # `atomic_write`'s temporaries: mkstemp's 8 random characters
_cached_umask: int | None = None  # the umask read with os.umask where /proc is unavailable (once per process)
_umask_lock = threading.Lock()


def _proc_umask() -> int | None:
    """The umask from ``/proc/self/status`` (Linux >= 4.7), or None where the file or its line is missing."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        return None
    return None


def umask() -> int:
    """The process's file-creation mask, read without changing it where Linux allows (see the module docstring)."""
    global _cached_umask
    value = _proc_umask()
    if value is not None:
        return value
    with _umask_lock:
        if _cached_umask is None:
            _cached_umask = os.umask(0o022)
            os.umask(_cached_umask)
        return _cached_umask


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], object], *, fsync: bool = True) -> None:
    """Create `path` atomically from what `write` writes into a binary file handle; parent folders are created.

    Args:
        path: destination.
        write: called once with the open temporary file (e.g. ``lambda fh: np.save(fh, a, allow_pickle=False)``).
        fsync: flush the file and its directory to disk around the rename (durable across power loss).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~umask())  # mkstemp's 0600 -> what open() would give under this umask
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes, *, fsync: bool = True) -> None:
    """`atomic_write` of a complete bytes object."""
    atomic_write(path, lambda fh: fh.write(data), fsync=fsync)


def atomic_write_text(path: Path | str, text: str, *, fsync: bool = True) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: Path | str, obj: Any, *, fsync: bool = True) -> None:
    """`atomic_write_text` of indented JSON with a final newline."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", fsync=fsync)


class FolderIsAFile(OSError):
    """`probe_writable`: the folder to write into is an existing file."""


def probe_writable(folder: Path | str) -> None:
    """Create `folder` if needed and prove it writable by creating and removing a file in it (permission bits say
    nothing for root, read-only mounts or full quotas).

    Raises:
        FolderIsAFile: `folder` is an existing file.
        OSError: the folder cannot be created (e.g. under a file) or refuses a new file.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderIsAFile(f"{folder} is an existing file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    os.close(fd)
    os.unlink(probe)


def fsync_dir(directory: Path | str) -> None:
    """Flush a directory entry (after a rename); silently skipped where the OS does not allow it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path | str) -> None:
    """Flush every file under `root` (before a directory is committed by a rename)."""
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def stale_temporaries(folder: Path | str) -> list[Path]:
    """The temporaries `atomic_write` left in `folder` (not below it) when killed before its rename, sorted.

    Only files named like them (``.<name>.<8 random characters>.tmp``) are listed; removing them is safe only for a
    caller that knows no writer is alive in `folder`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(".*.tmp") if _TEMP_NAME.fullmatch(p.name) and p.is_file())


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
