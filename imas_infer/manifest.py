"""The manifest of finished images: what makes a run restartable (`--resume`), on one machine and on Ray alike.

Every run that writes outputs journals each image once all of its outputs are in place (each output is written
atomically first, `image_io`), as one JSON line:

    <output>/.imas-manifest/<fingerprint>/settings.json                   what the fingerprint stands for
    <output>/.imas-manifest/<fingerprint>/<run id>/<writer id>.jsonl      one line per finished image
    {"input": "city/a.png", "input_size": 123456, "outputs": {"labels": {"path": "labels/city/a.png",
     "size": 2345, "sha256": "..."}, ...}}

* The fingerprint is the sha256 of the model file's bytes and of every setting that changes the bytes written
  (window protocol, window, stride, flip, output kinds, overlay weight, EXIF handling), not the batch size or the
  thread counts. Another model or other settings give another fingerprint, so nothing finished under the old one is
  skipped.
* Each writer (a process, or a Ray actor incarnation) appends to its own file and flushes each line, so writers
  never share a file and a killed writer loses at most its last, unterminated line, which readers ignore.
* `--resume` skips an input when the manifest holds a line for its relative path with the same input size, and each
  recorded output still exists with its recorded size (a `stat` per file; the sha256 is kept for audits, not
  re-read). Anything else is processed again and its outputs replaced atomically.
* `ManifestReader` reads the journals incrementally (from the last offset of each file), so a Ray actor that
  restarts after a crash learns in one cheap read which images of its batch an earlier attempt already finished.

The output folder must be a file system all writers share (local disk, NFS, Lustre, a FUSE mount of a bucket):
journal lines are appended. Tier 0 + stdlib.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from imas_core.atomic import atomic_write_json, sha256_file
from imas_infer.image_io import output_path
from imas_infer.shard import select_shard

if TYPE_CHECKING:
    from imas_infer.options import InferOptions, RunSettings

MANIFEST_DIR = ".imas-manifest"


def settings_key(
    model_sha256: str,
    *,
    mode: str,
    window: Sequence[int],
    stride: Sequence[int],
    flip: bool,
    save: Sequence[str],
    overlay_alpha: float,
    exif_orientation: bool,
) -> dict[str, Any]:
    """What the bytes of the outputs depend on (the input of `fingerprint`)."""
    key: dict[str, Any] = {
        "model_sha256": model_sha256,
        "mode": mode,
        "window": [int(v) for v in window],
        "stride": [int(v) for v in stride],
        "flip": bool(flip),
        "save": sorted(save),
        "exif_orientation": bool(exif_orientation),
    }
    if "overlay" in save:
        key["overlay_alpha"] = float(overlay_alpha)
    return key


def fingerprint(key: dict[str, Any]) -> str:
    """16 hex digits naming the manifest folder of one `settings_key`."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def new_run_id() -> str:
    """A unique, time-ordered run id, e.g. 20261130T130412Z-1a2b3c4d."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def writer_id() -> str:
    """A unique name for one writer process: host, pid and a random suffix (a restarted actor gets a new one)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def manifest_folder(output_root: Path, key: dict[str, Any]) -> Path:
    return Path(output_root) / MANIFEST_DIR / fingerprint(key)


class Journal:
    """The append-only journal of one writer in one run; `record` is thread-safe (writer threads call it)."""

    def __init__(self, output_root: Path, key: dict[str, Any], run_id: str, kinds: Sequence[str]) -> None:
        self.root = Path(output_root)
        self.folder = manifest_folder(self.root, key)
        self.path = self.folder / run_id / f"{writer_id()}.jsonl"
        self.kinds = tuple(kinds)
        self._key = key
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None

    def record(self, rel: Path, input_size: int) -> None:
        """Journal one finished image: its outputs (sizes and sha256 read back from disk) and its input size."""
        outputs = {}
        for kind in self.kinds:
            path = output_path(self.root, kind, rel)
            outputs[kind] = {
                "path": path.relative_to(self.root).as_posix(),
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        line = json.dumps({"input": Path(rel).as_posix(), "input_size": int(input_size), "outputs": outputs})
        with self._lock:
            if self._fh is None:
                if not (self.folder / "settings.json").is_file():
                    atomic_write_json(self.folder / "settings.json", self._key, fsync=False)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (kept open for the run)
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class ManifestReader:
    """The records of every journal under `folder` (a fingerprint folder, or one run inside it), read incrementally:
    `refresh` reads only what was appended since the last call. Later lines for the same input replace earlier ones.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.records: dict[str, dict[str, Any]] = {}
        self._offsets: dict[Path, int] = {}

    def refresh(self) -> dict[str, dict[str, Any]]:
        if not self.folder.is_dir():
            return self.records
        for path in sorted(self.folder.rglob("*.jsonl")):
            offset = self._offsets.get(path, 0)
            try:
                if path.stat().st_size <= offset:
                    continue
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # a line still being written (or cut by a crash) is read next time
            for raw in data[:end].splitlines():
                try:
                    record = json.loads(raw)
                    self.records[str(record["input"])] = record
                except (ValueError, KeyError, TypeError):
                    continue  # a damaged line: that image is simply not finished
            self._offsets[path] = offset + end
        return self.records


def outputs_verify(record: dict[str, Any], output_root: Path, input_size: int | None) -> bool:
    """True when `record`'s input size matches and every output it lists exists with its recorded size."""
    if input_size is not None and record.get("input_size") != input_size:
        return False
    try:
        for out in record["outputs"].values():
            if (Path(output_root) / out["path"]).stat().st_size != out["size"]:
                return False
    except (OSError, KeyError, TypeError, AttributeError):
        return False
    return True


def input_size(item: Any) -> int:
    """Bytes of an input: the `size` an item carries (remote listings), else a `stat` of its path."""
    size = getattr(item, "size", None)
    return int(size) if size is not None else item.path.stat().st_size


def split_finished(items: Sequence[Any], output_root: Path, key: dict[str, Any]) -> tuple[list[Any], int]:
    """(items still to do, number skipped as finished) under the manifest of `key` in `output_root`."""
    records = ManifestReader(manifest_folder(output_root, key)).refresh()
    if not records:
        return list(items), 0
    pending = []
    for item in items:
        record = records.get(Path(item.rel).as_posix())
        try:
            size = input_size(item)
        except OSError:
            size = None  # unreadable now: processed, and reported by the pipeline
        if record is None or size is None or not outputs_verify(record, output_root, size):
            pending.append(item)
    return pending, len(items) - len(pending)


def run_key(options: InferOptions, settings: RunSettings, model_sha256: str | None = None) -> dict[str, Any]:
    """The `settings_key` of a run (the model file is hashed unless its sha256 is given)."""
    return settings_key(
        model_sha256 or sha256_file(options.model),
        mode=settings.mode,
        window=settings.window,
        stride=settings.stride,
        flip=settings.flip,
        save=options.save,
        overlay_alpha=options.overlay_alpha,
        exif_orientation=options.exif_orientation,
    )


def select_inputs(
    items: Sequence[Any],
    options: InferOptions,
    key: dict[str, Any] | None,
    stage: Callable[[str], None],
    *,
    ray: bool = False,
) -> tuple[list[Any], dict[str, Any]]:
    """Keep the inputs of `options.shard`, then drop those the manifest records as finished (when resuming).

    Returns:
        The inputs to process, and the report fields describing the selection (`shard`, `skipped`, `manifest`).
    """
    info: dict[str, Any] = {}
    kept = list(items)
    if options.shard is not None:
        index, count = options.shard
        kept = select_shard(kept, index, count)
        stage(f"shard {index}/{count}: {len(kept)} of {len(items)} images")
        info["shard"] = {"index": index, "count": count, "listed": len(items), "selected": len(kept)}
    if key is None or options.output is None:
        return kept, info
    resume = options.resumes(ray)
    folder = manifest_folder(options.output, key)
    info["manifest"] = {"folder": str(folder), "fingerprint": fingerprint(key), "resume": resume}
    info["skipped"] = 0
    if resume:
        kept, info["skipped"] = split_finished(kept, options.output, key)
        stage(f"resume: {info['skipped']} image(s) already finished (manifest {folder}); {len(kept)} to do")
    return kept, info
