"""The optional sidecar fields (stitched, image_size, default_window): round trip, old sidecars, dynamic windows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from imas_core.artifacts import read_exported_meta, sidecar_path, write_exported_meta
from imas_core.errors import ArtifactError
from imas_core.runners import open_backend
from imas_infer.options import DEFAULT_WINDOW, InferOptions, resolve_settings
from tests.infer.infer_helpers import make_onnx

pytest.importorskip("onnxruntime")


def test_new_fields_round_trip_and_old_sidecars_still_load(tmp_path: Path) -> None:
    model = make_onnx(tmp_path / "model.onnx")
    raw = json.loads(sidecar_path(model).read_text())
    old = {k: v for k, v in raw.items() if k not in ("stitched", "image_size", "default_window")}
    assert len(old) == len(raw) - 3
    sidecar_path(model).write_text(json.dumps(old))  # as written before the fields existed
    meta = read_exported_meta(model)
    assert (meta.stitched, meta.image_size, meta.default_window) == (False, None, None)

    stitched = dataclasses.replace(meta, stitched=True, image_size=[32, 48], default_window=[16, 24])
    write_exported_meta(model, stitched)
    again = read_exported_meta(model)
    assert again == stitched and again.input_size == [32, 48] and meta.input_size == [16, 24]

    write_exported_meta(model, dataclasses.replace(stitched, image_size=None))
    with pytest.raises(ArtifactError, match="stitched model needs image_size"):
        read_exported_meta(model)


def test_default_window_is_used_for_dynamic_hw_models(tmp_path: Path) -> None:
    model = make_onnx(tmp_path / "dyn.onnx", window=None)
    options = InferOptions(model, "in", tmp_path / "out")
    with open_backend(model, backend="ort-cpu") as backend:  # no default_window recorded: the reference 769
        assert resolve_settings(options, backend.info).window == (DEFAULT_WINDOW, DEFAULT_WINDOW)
    write_exported_meta(model, dataclasses.replace(read_exported_meta(model), default_window=[65, 97]))
    with open_backend(model, backend="ort-cpu") as backend:
        assert backend.info.window is None and backend.info.default_window == (65, 97)
        assert resolve_settings(options, backend.info).window == (65, 97)
        assert resolve_settings(dataclasses.replace(options, window=(33, 33)), backend.info).window == (33, 33)


def test_a_stitched_sidecar_must_match_the_graph_input(tmp_path: Path) -> None:
    model = make_onnx(tmp_path / "model.onnx")  # a 16x24 window graph
    meta = dataclasses.replace(read_exported_meta(model), stitched=True, image_size=[32, 48])
    write_exported_meta(model, meta)
    with pytest.raises(ArtifactError, match=r"sidecar image_size \(stitched\) \[32, 48\]"):
        open_backend(model, backend="ort-cpu")
