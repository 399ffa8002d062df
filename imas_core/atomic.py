"""Atomic file writes and checksums: a reader sees the old file or the complete new one, never a part.

Every write goes to a temporary file in the destination folder (a name unique to the process and the call), which is
renamed over the destination. With ``fsync=True`` (the default) the data and the directory entry are flushed to disk
first, so the file also survives a power cut; outputs that can be recomputed (inference results) skip that cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_tree",
    "sha256_file",
]


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


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
