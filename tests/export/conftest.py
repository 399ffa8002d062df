"""Export fixtures: the tiny teacher exported at a 65x97 window (odd sizes catch align_corners slips).

The tiny teacher is deterministic (seed 0), so its bytes and sha256 are the same in every test. `export_tiny`
therefore exports each distinct option set once per session and hands later tests a fresh copy of the files
(keyed by the teacher's sha256, so a non-deterministic teacher would simply never hit the cache).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imas_core.artifacts import sidecar_path
from imas_core.atomic import sha256_file
from tests.export.export_helpers import WINDOW


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {"dir": tmp_path_factory.mktemp("export_cache"), "results": {}}


def _copy(result: Any, target: Path) -> Any:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.path, target)
    shutil.copyfile(result.sidecar, sidecar_path(target))
    return dataclasses.replace(result, path=target, sidecar=sidecar_path(target))


@pytest.fixture
def export_tiny(tiny_teacher: Path, tmp_path: Path, export_cache: dict[str, Any]) -> Callable[..., Any]:
    """`export_tiny(name, **options)` exports the tiny teacher to tmp_path/out/<name> with 2 parity images."""
    from imas_export import OnnxExportOptions, ParityOptions, export_onnx

    def run(name: str = "model.onnx", parity: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        options = OnnxExportOptions(
            teacher=tiny_teacher,
            output=tmp_path / "out" / name,
            window=kwargs.pop("window", WINDOW),
            parity=dataclasses.replace(ParityOptions(num_images=2), **(parity or {})),
            **kwargs,
        )
        if options.calib_dir is not None:  # calibration folders live in tmp_path: never cached
            return export_onnx(options)
        key = (sha256_file(tiny_teacher), name, repr(dataclasses.replace(options, teacher=Path(), output=Path())))
        results = export_cache["results"]
        if key not in results:
            result = export_onnx(options)
            results[key] = _copy(result, export_cache["dir"] / str(len(results)) / name)
            return result
        return _copy(results[key], options.output)

    return run
