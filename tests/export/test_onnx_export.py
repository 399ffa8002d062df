"""Teacher -> ONNX: parity with torch, dynamic batch and H/W, output heads, uint8 input, Resize mode, metadata."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from imas_core.artifacts import read_exported_meta, read_teacher_meta  # noqa: E402
from imas_core.atomic import sha256_file  # noqa: E402
from tests.export.export_helpers import WINDOW, ort_run, random_images, torch_logits  # noqa: E402


def test_fp32_export_matches_torch_at_batch_1_3_8(export_tiny: Callable[..., Any], tiny_teacher: Path) -> None:
    result = export_tiny()
    assert result.parity.agreement == 1.0
    assert result.parity.max_abs is not None and result.parity.max_abs < 1e-4
    for batch in (1, 3, 8):  # the example batch was 2: the batch dimension must really be dynamic
        images = random_images(batch, *WINDOW, seed=batch)
        out = ort_run(result.path, images)
        ref = torch_logits(tiny_teacher, images)
        assert out.shape == (batch, 3, *WINDOW)
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
        assert (out.argmax(1) == ref.argmax(1)).all()
    assert_every_resize_is_align_corners_and_ir_loadable(result.path)


def assert_every_resize_is_align_corners_and_ir_loadable(path: Path) -> None:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert len(resizes) >= 3  # ASPP pool branch, decoder upsample, final upsample
    for node in resizes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["coordinate_transformation_mode"] == b"align_corners", node.name
        assert attrs["mode"] == b"linear"
    assert model.ir_version == 8  # opset 17's minimum, read by onnxruntime 1.31 (which refuses onnx's IR 14)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]


def test_metadata_props_and_sidecar_round_trip(export_tiny: Callable[..., Any], tiny_teacher: Path) -> None:
    result = export_tiny()
    teacher = read_teacher_meta(tiny_teacher)
    sidecar = read_exported_meta(result.path)  # verifies the checksum of the final bytes
    assert sidecar.artifact_sha256 == sha256_file(result.path)
    props = {p.key: json.loads(p.value) for p in onnx.load(str(result.path)).metadata_props}
    expected = {
        "num_classes": 3,
        "class_names": teacher.class_names,
        "palette": teacher.palette,
        "mean": teacher.mean,
        "std": teacher.std,
        "window": list(WINDOW),
        "eval_protocol": teacher.eval_protocol,
        "source_sha256": teacher.weights_sha256,
        "input_name": "image",
        "input_dtype": "float32",
        "output_name": "logits",
        "output_kind": "logits",
        "output_dtype": "float32",
        "precision": "fp32",
        "opset": 17,
        "max_batch": 8,
    }
    for key, value in expected.items():
        assert props[f"imas.{key}"] == value, key
        assert getattr(sidecar, key) == value, key
    assert sidecar.stride == [43, 64]  # 2/3 of each side of a window other than the teacher's (65)
    assert set(sidecar.versions) >= {"torch", "onnx", "onnxruntime", "imas"}
    assert sidecar.parity["agreement"] == 1.0 and sidecar.parity["passed"] is True
    assert [s.name for s in result.stages] == ["load", "export", "parity", "write"]
    assert "MB" in result.stages[1].line() or "KB" in result.stages[1].line()


def test_dynamic_hw_runs_at_two_sizes(export_tiny: Callable[..., Any], tiny_teacher: Path) -> None:
    result = export_tiny(dynamic_hw=True)
    sidecar = read_exported_meta(result.path)
    assert sidecar.window is None and sidecar.stride == [43, 43]  # the teacher's stride, not the example's
    assert_every_resize_is_align_corners_and_ir_loadable(result.path)
    for height, width in ((65, 97), (49, 81)):
        images = random_images(2, height, width, seed=height)
        out = ort_run(result.path, images)
        np.testing.assert_allclose(out, torch_logits(tiny_teacher, images), atol=1e-4, rtol=0)


def test_probs_head_is_softmax_of_torch_logits(export_tiny: Callable[..., Any], tiny_teacher: Path) -> None:
    result = export_tiny("probs.onnx", output_kind="probs")
    images = random_images(2, *WINDOW)
    out = ort_run(result.path, images)
    ref = torch_logits(tiny_teacher, images)
    expected = np.exp(ref - ref.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)


def test_labels_head_with_uint8_input(export_tiny: Callable[..., Any], tiny_teacher: Path) -> None:
    result = export_tiny("labels.onnx", output_kind="labels", input_dtype="uint8", simplify=True)
    model = onnx.load(str(result.path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    images = random_images(3, *WINDOW, seed=7)
    out = ort_run(result.path, images)
    ref = torch_logits(tiny_teacher, images)
    assert out.dtype == np.uint8 and out.shape == (3, *WINDOW)
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-5  # ignore exact near-ties
    assert (out[clear] == ref.argmax(1)[clear]).all()
    sidecar = read_exported_meta(result.path)
    assert (sidecar.input_dtype, sidecar.output_dtype, sidecar.output_kind) == ("uint8", "uint8", "labels")


def test_parity_failure_leaves_no_valid_looking_output(export_tiny: Callable[..., Any], tmp_path: Path) -> None:
    from imas_core.errors import ExportError

    with pytest.raises(ExportError, match="parity check failed"):
        export_tiny(parity={"min_agreement": 1.01})
    out_dir = tmp_path / "out"
    assert list(out_dir.iterdir()) == []  # no model, no sidecar, no temporary folder


def test_bad_options_are_refused_before_any_work(export_tiny: Callable[..., Any]) -> None:
    from imas_core.errors import ExportError

    with pytest.raises(ExportError, match="opset"):
        export_tiny(opset=9)
    with pytest.raises(ExportError, match="int8 only"):
        export_tiny(calib_dir=Path("x"))
    with pytest.raises(ExportError, match=".onnx"):
        export_tiny("model.bin")


def test_wrapper_normalises_like_training() -> None:
    import torch

    from imas_export.wrapper import ExportWrapper

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    wrapper = ExportWrapper(torch.nn.Identity(), mean, std)
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(wrapper(x), expected)
    torch.testing.assert_close(wrapper(x.float()), expected)
    labels = ExportWrapper(torch.nn.Identity(), mean, std, "labels")(x)
    assert labels.dtype == torch.uint8 and torch.equal(labels, expected.argmax(1).to(torch.uint8))
