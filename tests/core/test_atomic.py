"""`imas_core.atomic`: a reader sees the old file or the complete new one, never a part; checksums."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO

import pytest

import imas_core.atomic
from imas_core.atomic import atomic_write, atomic_write_bytes, atomic_write_json, sha256_file, stale_temporaries


class WriterFailed(Exception):
    pass


def _fail_halfway(fh: IO[bytes]) -> None:
    fh.write(b"half of the new")
    raise WriterFailed


@pytest.mark.parametrize("fsync", [True, False])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path, fsync: bool) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content")
    with pytest.raises(WriterFailed):
        atomic_write(target, _fail_halfway, fsync=fsync)
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_an_interrupt_inside_the_writer_also_cleans_up(tmp_path: Path) -> None:
    def interrupted(fh: IO[bytes]) -> None:
        fh.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.bin", interrupted)
    assert list(tmp_path.iterdir()) == []  # no destination was created, and no temporary is left


@pytest.mark.parametrize("fsync", [True, False])
def test_the_destination_changes_only_at_the_rename(tmp_path: Path, fsync: bool) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content")
    seen_while_writing = []

    def write(fh: IO[bytes]) -> None:
        fh.write(b"new content")
        seen_while_writing.append(target.read_bytes())

    atomic_write(target, write, fsync=fsync)
    assert seen_while_writing == [b"old content"]
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_fsync_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    atomic_write_bytes(tmp_path / "fast.bin", b"x", fsync=False)
    assert calls == []
    atomic_write_bytes(tmp_path / "durable.bin", b"x")  # the default: the file, then its directory
    assert len(calls) >= 2


def test_parents_are_created_and_json_is_indented_with_a_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "meta.json"
    atomic_write_json(path, {"window": [769, 769], "name": "é"}, fsync=False)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and '\n  "window"' in text
    assert json.loads(text) == {"window": [769, 769], "name": "é"}


def test_sha256_matches_hashlib_across_chunk_boundaries(tmp_path: Path) -> None:
    data = bytes(range(256)) * 41  # 10496 bytes: not a multiple of the chunk below
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest() == sha256_file(path)
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("proc", [True, False], ids=["proc-status", "os-umask-fallback"])
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc: bool, mask: int, mode: int
) -> None:
    """mkstemp creates 0600 whatever the umask; the destination gets 0o666 & ~umask, as open() would give."""
    if not proc:  # a system without /proc/self/status: os.umask read once per process and cached
        monkeypatch.setattr(imas_core.atomic, "_proc_umask", lambda: None)
        monkeypatch.setattr(imas_core.atomic, "_cached_umask", None)
    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "artifact.bin", b"x")
        atomic_write_json(tmp_path / "sidecar.json", {}, fsync=False)
        assert imas_core.atomic.umask() == mask
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "artifact.bin").st_mode & 0o777 == mode
    assert os.stat(tmp_path / "sidecar.json").st_mode & 0o777 == mode


def test_stale_temporaries_are_only_atomic_write_names(tmp_path: Path) -> None:
    (tmp_path / ".teacher.safetensors.ab_3x9qz.tmp").write_bytes(b"partial")
    (tmp_path / ".best.json.k2l9m0pq.tmp").write_bytes(b"partial")
    for other in (".notes.tmp", "teacher.tmp", ".x.toolong123.tmp", ".lock"):
        (tmp_path / other).write_bytes(b"keep")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".epoch_000.csv.abcdefgh.tmp").write_bytes(b"not this folder")
    found = [p.name for p in stale_temporaries(tmp_path)]
    assert found == [".best.json.k2l9m0pq.tmp", ".teacher.safetensors.ab_3x9qz.tmp"]
    assert stale_temporaries(tmp_path / "missing") == []
