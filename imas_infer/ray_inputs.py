"""Inputs of `imas-infer --ray`: listing local paths or pyarrow URIs, and decoding in Ray tasks.

`list_inputs` resolves --input on the driver: the local forms of `image_io.discover_inputs` (a file, a folder
searched recursively, a glob, a `.txt` list), or a URI of any file system pyarrow knows (`s3://`, `gs://`, `hdfs://`,
`file://`...), listed recursively and sorted. `decode_batch` runs in Ray tasks: it reads each input (a local path is
opened by Pillow itself, a URI through pyarrow) and decodes it with `imas_core.images.decode_rgb`, the decoder of
every other path, into raw RGB bytes and their shape (Arrow blocks carry bytes of any length; a failure is a row
with the single-machine pipeline's reason). Module level: stdlib, numpy, imas_core/imas_infer; pyarrow inside
functions (it comes with ray[data]).
"""

from __future__ import annotations

import io
import os
import posixpath
import socket
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from imas_core import images
from imas_core.errors import InferError
from imas_infer.image_io import IMAGE_EXTENSIONS, discover_inputs, refuse_colliding_outputs


@dataclass(frozen=True)
class ListedInput:
    """An input found by `list_inputs`: a local path or a URI, its path relative to the input root, its bytes."""

    path: str
    rel: PurePosixPath
    size: int


def is_uri(text: str) -> bool:
    return "://" in text


def list_inputs(spec: str) -> list[ListedInput]:
    """Resolve --input: local forms as `image_io.discover_inputs`; a URI (file://, s3://, gs://, ...) through
    pyarrow's file systems (a folder is listed recursively, sorted); a local `.txt` list whose lines are URIs.

    Raises:
        InferError: nothing found, a listed URI missing, two inputs writing the same outputs, or the URI's file
            system is unknown or unreachable.
    """
    if not is_uri(spec):
        entries = _uri_lines(Path(spec)) if spec.lower().endswith(".txt") and Path(spec).is_file() else None
        if entries is None:
            _, items = discover_inputs(spec)
            return [ListedInput(str(i.path), PurePosixPath(i.rel.as_posix()), i.path.stat().st_size) for i in items]
        return refuse_colliding_outputs(_list_uri_lines(spec, entries))
    from pyarrow import fs as pafs

    try:
        filesystem, root = pafs.FileSystem.from_uri(spec)
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.Directory:
            found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        else:
            found = [info]
    except (OSError, ValueError) as err:
        raise InferError(f"--input {spec}: {err}") from err
    files = sorted(
        (f for f in found if f.type == pafs.FileType.File and PurePosixPath(f.path).suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda f: f.path,
    )
    if not files:
        raise InferError(f"--input {spec}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    base = PurePosixPath(root) if info.type == pafs.FileType.Directory else PurePosixPath(root).parent
    prefix = _uri_prefix(spec, root)
    listed = [ListedInput(prefix + f.path, PurePosixPath(f.path).relative_to(base), int(f.size)) for f in files]
    return refuse_colliding_outputs(listed)


def _uri_prefix(uri: str, path: str) -> str:
    """What goes before pyarrow's path to rebuild a URI: "s3://" (the bucket is in the path), "file://",
    "hdfs://host:port" (pyarrow keeps the authority in the file system)."""
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}" if path.startswith("/") else f"{scheme}://"


def _uri_lines(list_file: Path) -> list[tuple[int, str]] | None:
    """The (line number, URI) entries of a list file whose entries are URIs; None when they are local paths."""
    lines = [
        (number, line.strip())
        for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1)
        if line.strip() and not line.strip().startswith("#")
    ]
    uris = [entry for entry in lines if is_uri(entry[1])]
    if not uris:
        return None
    if len(uris) != len(lines):
        number, local = next(entry for entry in lines if not is_uri(entry[1]))
        raise InferError(f"{list_file}:{number}: {local} is a local path among URIs; give every line as a URI")
    return uris


def _list_uri_lines(spec: str, entries: list[tuple[int, str]]) -> list[ListedInput]:
    """Sizes of the listed URIs (one batched metadata call per file system); outputs mirror their common folder."""
    from pyarrow import fs as pafs

    by_owner: dict[str, list[tuple[int, str, str]]] = {}
    systems: dict[str, Any] = {}
    for number, uri in entries:
        scheme, rest = uri.split("://", 1)
        owner = f"{scheme}://{rest.split('/', 1)[0]}"
        try:
            if owner not in systems:
                systems[owner] = pafs.FileSystem.from_uri(uri)[0]
            by_owner.setdefault(owner, []).append((number, uri, pafs.FileSystem.from_uri(uri)[1]))
        except (OSError, ValueError) as err:
            raise InferError(f"{spec}:{number}: {uri}: {err}") from err
    sized: list[tuple[str, str, int]] = []
    for owner, rows in by_owner.items():
        infos = systems[owner].get_file_info([path for _, _, path in rows])
        for (number, uri, path), info in zip(rows, infos, strict=True):
            if info.type != pafs.FileType.File:
                raise InferError(f"{spec}:{number}: {uri} does not exist (or is not a file)")
            sized.append((uri, path, int(info.size)))
    root = PurePosixPath(posixpath.commonpath([posixpath.dirname(path) for _, path, _ in sized]))
    return [ListedInput(uri, PurePosixPath(path).relative_to(root), size) for uri, path, size in sized]


_FILESYSTEMS: dict[str, Any] = {}


def read_input(path: str) -> Any:
    """What `decode_rgb` opens: the local path itself, or the bytes of a URI read through pyarrow (cached per
    scheme and bucket, per process)."""
    if not is_uri(path):
        return path
    from pyarrow import fs as pafs

    scheme, rest = path.split("://", 1)
    owner = f"{scheme}://{rest.split('/', 1)[0]}"
    if owner not in _FILESYSTEMS:
        _FILESYSTEMS[owner] = pafs.FileSystem.from_uri(path)[0]
    located = pafs.FileSystem.from_uri(path)[1]
    with _FILESYSTEMS[owner].open_input_file(located) as fh:
        return io.BytesIO(fh.read())


def decode_batch(batch: dict[str, np.ndarray], exif_orientation: bool = True) -> dict[str, np.ndarray]:
    """Ray task: decode every row's image into raw RGB bytes plus its shape; a failure is a row with its reason."""
    columns: dict[str, list[Any]] = {k: [] for k in ("pixels", "height", "width", "bits", "orientation")}
    columns.update(stored_h=[], stored_w=[], error=[], decode_s=[])
    for path in batch["path"]:
        t0 = time.perf_counter()
        try:
            decoded = images.decode_rgb(read_input(str(path)), exif_orientation=exif_orientation)
            rgb, error = decoded.rgb, ""
            meta = (decoded.bits, decoded.orientation, *decoded.stored_hw)
        except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError...; pyarrow OSError
            rgb, meta = np.zeros((0, 0, 3), np.uint8), (0, 0, 0, 0)
            error = f"unreadable image ({type(err).__name__}: {err})"  # the single-machine pipeline's wording
        columns["pixels"].append(rgb.tobytes())
        columns["height"].append(rgb.shape[0])
        columns["width"].append(rgb.shape[1])
        for name, value in zip(("bits", "orientation", "stored_h", "stored_w"), meta, strict=True):
            columns[name].append(value)
        columns["error"].append(error)
        columns["decode_s"].append(time.perf_counter() - t0)
    out = {k: np.asarray(v) for k, v in batch.items()}
    out["pixels"] = np.array(columns.pop("pixels"), dtype=object)
    out.update({k: np.asarray(v, dtype=object if k == "error" else None) for k, v in columns.items()})
    out["decoder"] = np.asarray([f"{socket.gethostname()}:{os.getpid()}"] * len(out["error"]), dtype=object)
    return out
