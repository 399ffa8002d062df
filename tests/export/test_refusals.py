"""Artifacts that do not match their sidecars are refused: tampered ONNX, mismatched sidecar, tampered teacher."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from imas_core.artifacts import sidecar_path  # noqa: E402
from imas_core.errors import ArtifactError  # noqa: E402


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_onnx_is_refused_by_trt_and_verify(
    export_tiny: Callable[..., Any], tiny_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imas_export.cli import main
    from imas_export.graph import check_onnx_artifact

    path = export_tiny().path
    _flip_last_byte(path)
    with pytest.raises(ArtifactError, match="sha256"):
        check_onnx_artifact(path)
    assert main(["trt", "--onnx", str(path), "--output", str(path.with_suffix(".engine"))]) == 2
    assert "sha256" in capsys.readouterr().err
    assert main(["verify", "--teacher", str(tiny_teacher), "--onnx", str(path), "-n", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imas-export: error:") and "modified" in err


def test_sidecar_with_another_class_count_is_refused(export_tiny: Callable[..., Any]) -> None:
    from imas_export.graph import check_onnx_artifact

    path = export_tiny().path
    side = sidecar_path(path)
    raw = json.loads(side.read_text())
    side.write_text(json.dumps({**raw, "num_classes": 4}))
    with pytest.raises(ArtifactError, match="num_classes"):
        check_onnx_artifact(path)
    # consistent but wrong: 4 names and num_classes 4 for a 3-class ONNX (checksum still matches)
    side.write_text(json.dumps({**raw, "num_classes": 4, "class_names": ["a", "b", "c", "d"]}))
    with pytest.raises(ArtifactError, match="num_classes|class_names"):
        check_onnx_artifact(path)


def test_inference_refuses_a_consistent_sidecar_with_another_class_count(export_tiny: Callable[..., Any]) -> None:
    """An exported window model's class dimension is symbolic in the graph: the runner reads the classes the
    exporter recorded inside the ONNX, so the refusal comes when the model is opened, not from ONNX Runtime."""
    from imas_core.runners import open_backend

    path = export_tiny().path
    side = sidecar_path(path)
    raw = json.loads(side.read_text())
    side.write_text(json.dumps({**raw, "num_classes": 4, "class_names": list("abcd"), "palette": [[0, 0, 0]] * 4}))
    with pytest.raises(ArtifactError, match=r"model\.onnx\.json: the sidecar says 4 classes, but the metadata "
                                            r"inside model\.onnx records 3"):  # fmt: skip
        open_backend(path, backend="ort-cpu")


def test_tampered_teacher_is_refused_and_nothing_is_written(tiny_teacher: Path, tmp_path: Path) -> None:
    from imas_export import OnnxExportOptions, export_onnx

    _flip_last_byte(tiny_teacher)
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(ArtifactError, match="sha256"):
        export_onnx(OnnxExportOptions(teacher=tiny_teacher, output=out))
    assert not out.exists() and not sidecar_path(out).exists()


def test_verify_refuses_an_onnx_from_another_teacher(export_tiny: Callable[..., Any], tiny_teacher: Path) -> None:
    from imas_export import VerifyOptions, verify

    path = export_tiny().path
    side = sidecar_path(path)
    raw = json.loads(side.read_text())
    side.write_text(json.dumps({**raw, "source_sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match="not from this teacher"):
        verify(VerifyOptions(teacher=tiny_teacher, onnx=path))
