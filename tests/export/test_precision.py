"""Reduced precision: the fp16 graph rewrite, int8 Q/DQ calibration, their reports and warnings."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tests.export.export_helpers import WINDOW, ort_run, random_images, torch_logits  # noqa: E402


def _resize_softmax_model() -> onnx.ModelProto:
    """x (1,2,5,7) -> Conv 1x1 -> Resize(scales computed from a float constant) -> Softmax -> y."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(2, 2, 1, 1)).astype(np.float32), "w")
    base = numpy_helper.from_array(np.array([1.0, 1.0, 1.5, 1.5], dtype=np.float32), "base")
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Mul", ["base", "two"], ["scales_raw"]),
        helper.make_node("Div", ["scales_raw", "two"], ["scales"]),
        helper.make_node(
            "Resize", ["c", "", "scales"], ["r"], mode="linear", coordinate_transformation_mode="align_corners"
        ),
        helper.make_node("Softmax", ["r"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, base, two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx 1.23 stamps IR 14, which onnxruntime 1.31 refuses
    return model


def test_fp16_rewrite_keeps_io_shape_math_and_softmax_in_fp32() -> None:
    from imas_export.quantize import convert_to_fp16

    model = _resize_softmax_model()
    half = convert_to_fp16(model)
    inits = {t.name: t.data_type for t in half.graph.initializer}
    assert inits == {"w": TensorProto.FLOAT16, "base": TensorProto.FLOAT, "two": TensorProto.FLOAT}
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    ops = [n.op_type for n in half.graph.node]
    assert ops.count("Cast") == 2  # x -> fp16 before the Conv, Resize output -> fp32 before the Softmax
    assert half.ir_version == 8
    x = np.random.default_rng(1).normal(size=(1, 2, 5, 7)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert out.dtype == np.float32 and out.shape == ref.shape == (1, 2, 7, 10)
    np.testing.assert_allclose(out, ref, atol=2e-3)


def test_fp16_export_runs_in_ort_with_high_agreement(export_tiny: Callable[..., Any], tiny_teacher: Path) -> None:
    result = export_tiny("model.fp16.onnx", precision="fp16")
    report = result.parity
    assert 0.0 <= report.agreement <= 1.0 and report.agreement >= 0.99
    assert report.max_abs is not None and 0.0 <= report.mean_abs <= report.max_abs < 0.05
    model = onnx.load(str(result.path))
    halves = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert len(halves) > 20  # the conv weights
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    images = random_images(2, *WINDOW, seed=3)
    out = ort_run(result.path, images)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, torch_logits(tiny_teacher, images), atol=0.05)


def _write_demo_pngs(folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(random_images(count, 80, 120, seed=11)):
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"img{i:02d}.png")
    return folder


def test_int8_qdq_export_reports_held_out_agreement(
    export_tiny: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calib = _write_demo_pngs(tmp_path / "calib", 5)
    with caplog.at_level(logging.WARNING, logger="imas_export"):
        result = export_tiny("model.int8.onnx", precision="int8", calib_dir=calib, parity={"min_agreement": 0.0})
    assert any("only 4 images" in r.getMessage() and "300" in r.getMessage() for r in caplog.records)
    report = result.parity
    assert report.images == 1 and "hold-out" in report.source  # last 20% of 5 images
    assert 0.0 <= report.agreement <= 1.0 and report.min_agreement == 0.0 and report.passed
    assert report.max_abs is not None and np.isfinite(report.max_abs)
    model = onnx.load(str(result.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    scales = [t for t in model.graph.initializer if t.name.endswith("zero_point")]
    assert scales and all(not numpy_helper.to_array(t).any() for t in scales)  # symmetric: zero points are 0
    assert ort_run(result.path, random_images(1, *WINDOW)).shape == (1, 3, *WINDOW)


def test_int8_threshold_is_enforced(export_tiny: Callable[..., Any], tmp_path: Path) -> None:
    from imas_core.errors import ExportError

    calib = _write_demo_pngs(tmp_path / "calib", 3)
    with pytest.raises(ExportError, match="int8"):
        export_tiny("bad.int8.onnx", precision="int8", calib_dir=calib, parity={"min_agreement": 1.5})
    assert not (tmp_path / "out" / "bad.int8.onnx").exists()


def test_demo_calibration_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    from imas_export.options import OnnxExportOptions, ParityOptions
    from imas_export.samples import calibration_samples

    options = OnnxExportOptions(
        teacher=Path("t"), output=Path("m.onnx"), precision="int8", parity=ParityOptions(num_images=2)
    )
    with caplog.at_level(logging.WARNING, logger="imas_export"):
        calibration, held = calibration_samples(options, (33, 49), ["a", "b", "c"])
    assert any("DEMO images" in r.getMessage() for r in caplog.records)
    assert calibration.images.shape[1:] == (3, 33, 49) and calibration.source == "demo:unlabeled"
    assert len(held) == 2 and held.source == "demo:val" and held.labels is None  # demo labels != these classes
