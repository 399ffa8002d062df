"""`imas_core.typed` through the sidecar readers: every field is type-checked, and a refusal names the field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from imas_core.artifacts import (
    ExportedModelMeta,
    TeacherMeta,
    read_exported_meta,
    read_teacher_meta,
    sidecar_path,
    teacher_sidecar_path,
    write_exported_meta,
    write_teacher_meta,
)
from imas_core.atomic import sha256_file
from imas_core.errors import ArtifactError


def _teacher(tmp_path: Path) -> Path:
    """A teacher weights file (any bytes) and a valid `teacher.json` beside it."""
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"not really safetensors")
    meta = TeacherMeta(
        model_config={"num_classes": 2, "depth": 50, "layers": [1, 1, 1, 1]},
        class_names=["road", "car"],
        palette=[[128, 64, 128], [0, 0, 142]],
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        weights_sha256=sha256_file(weights),
        split_sha256={"labeled": "0" * 64},
    )
    write_teacher_meta(weights, meta)
    return weights


def _edit(sidecar: Path, **fields: Any) -> None:
    raw = json.loads(sidecar.read_text())
    raw.update(fields)
    sidecar.write_text(json.dumps(raw))


def test_a_valid_teacher_sidecar_reads_back(tmp_path: Path) -> None:
    weights = _teacher(tmp_path)
    meta = read_teacher_meta(weights)
    assert meta.window == 769 and meta.class_names == ["road", "car"] and meta.split_sha256 == {"labeled": "0" * 64}


def test_a_string_window_is_refused_naming_the_field(tmp_path: Path) -> None:
    weights = _teacher(tmp_path)
    _edit(teacher_sidecar_path(weights), window="769")
    with pytest.raises(ArtifactError, match=r"teacher\.json: window: expected an integer, got '769'"):
        read_teacher_meta(weights)


def test_an_unknown_field_is_refused(tmp_path: Path) -> None:
    weights = _teacher(tmp_path)
    _edit(teacher_sidecar_path(weights), windwo=769)
    with pytest.raises(ArtifactError, match="unknown sidecar field"):
        read_teacher_meta(weights)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("class_names", ["road", 7], r"class_names\[1\]: expected a string, got 7"),
        ("class_names", "road,car", r"class_names: expected a list"),
        ("palette", [[128, 64, 128], [0, 0, "142"]], r"palette\[1\]\[2\]: expected an integer"),
        ("mean", [0.5, True, 0.5], r"mean\[1\]: expected a number, got True"),
        ("split_sha256", {"labeled": 5}, r"split_sha256\[labeled\]: expected a string, got 5"),
        ("split_sha256", ["labeled"], r"split_sha256: expected a mapping"),
        ("training_summary", "none", r"training_summary: expected a mapping"),
        ("miou_best", "0.7", r"miou_best: expected a number, got '0.7'"),
    ],
)
def test_list_and_dict_fields_are_type_checked(tmp_path: Path, field: str, value: Any, match: str) -> None:
    weights = _teacher(tmp_path)
    _edit(teacher_sidecar_path(weights), **{field: value})
    with pytest.raises(ArtifactError, match=match):
        read_teacher_meta(weights)


def test_any_typed_values_pass_through(tmp_path: Path) -> None:
    weights = _teacher(tmp_path)
    _edit(teacher_sidecar_path(weights), model_config={"num_classes": 2, "anything": [1, "x", None]})
    assert read_teacher_meta(weights).model_config["anything"] == [1, "x", None]


def _exported(tmp_path: Path) -> Path:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really onnx")
    meta = ExportedModelMeta(
        kind="onnx",
        num_classes=2,
        class_names=["road", "car"],
        palette=[[128, 64, 128], [0, 0, 142]],
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        input_name="image",
        input_dtype="float32",
        output_name="logits",
        output_kind="logits",
        output_dtype="float32",
        window=[16, 24],
        stride=[10, 16],
        eval_protocol="imas",
        precision="fp32",
        max_batch=8,
        source_sha256="0" * 64,
        artifact_sha256=sha256_file(model),
    )
    write_exported_meta(model, meta)
    return model


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("window", "16x24", r"window: expected a list, got '16x24'"),
        ("window", [16, "24"], r"window\[1\]: expected an integer, got '24'"),
        ("max_batch", 8.0, r"max_batch: expected an integer, got 8.0"),
        ("tensorrt", [], r"tensorrt: expected a mapping"),
        ("versions", {"onnx": 1.16}, r"versions\[onnx\]: expected a string"),
        ("stitched", "false", r"stitched: expected true or false"),
    ],
)
def test_exported_sidecar_fields_are_type_checked(tmp_path: Path, field: str, value: Any, match: str) -> None:
    model = _exported(tmp_path)
    _edit(sidecar_path(model), **{field: value})
    with pytest.raises(ArtifactError, match=match):
        read_exported_meta(model)


def test_optional_fields_accept_null_and_round_trip(tmp_path: Path) -> None:
    model = _exported(tmp_path)
    _edit(sidecar_path(model), window=None, max_batch=None)
    meta = read_exported_meta(model)
    assert meta.window is None and meta.max_batch is None and meta.input_size is None
    assert dataclasses.asdict(meta) == json.loads(sidecar_path(model).read_text())
