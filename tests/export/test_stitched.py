"""Stitched export (--image-size): the full_tiles sliding window inside the graph vs the torch sliding window."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from imas_core.artifacts import read_exported_meta  # noqa: E402
from imas_core.errors import ExportError  # noqa: E402
from tests.export.export_helpers import ort_run, random_images  # noqa: E402

SIZE = (100, 150)  # window 65, stride 43: rows at 0 and 35, columns at 0, 43 and 85 -> 6 overlapping windows


def _reference(weights: Path, images: np.ndarray) -> np.ndarray:
    """Averaged probabilities of the teacher by the torch full_tiles sliding window (65x65, stride 43)."""
    from imas_export.stitched import sliding_reference
    from imas_train.teacher_artifact import load_teacher

    model, meta = load_teacher(weights, "cpu")
    return sliding_reference(model, meta.mean, meta.std, images, 3, (65, 65), (43, 43))


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def test_stitched_labels_match_the_torch_sliding_window(export_tiny: Callable[..., Any], tiny_teacher: Path) -> None:
    result = export_tiny("stitched.onnx", window=None, image_size=SIZE)  # window None: the teacher's 65x65
    assert result.parity.agreement >= 0.999 and result.parity.compared == "labels"
    assert "6 windows 65x65 in-graph" in result.stages[1].note
    model = onnx.load(str(result.path))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"Loop", "Scan", "If"} and {"Exp", "ReduceSum", "ArgMax", "Slice", "Concat"} <= ops
    in_dims, out_dims = _dims(model.graph.input[0]), _dims(model.graph.output[0])
    assert isinstance(in_dims[0], str) and in_dims[1:] == [3, *SIZE]  # only N is dynamic
    assert isinstance(out_dims[0], str) and out_dims[1:] == list(SIZE)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    for batch in (1, 3):  # traced at batch 2: the (N, K, C, h, w) reshape must keep N dynamic
        images = random_images(batch, *SIZE, seed=batch)
        out = ort_run(result.path, images)
        assert out.shape == (batch, *SIZE) and out.dtype == np.uint8
        assert (out == _reference(tiny_teacher, images).argmax(1)).mean() >= 0.999

    meta = read_exported_meta(result.path)
    assert (meta.stitched, meta.image_size, meta.window, meta.stride) == (True, list(SIZE), [65, 65], [43, 43])
    assert (meta.default_window, meta.max_batch, meta.output_kind, meta.input_size) == (
        [65, 65],
        2,
        "labels",
        [100, 150],
    )
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert (props["imas.stitched"], props["imas.image_size"], props["imas.default_window"]) == (
        True,
        [100, 150],
        [65, 65],
    )


@pytest.mark.parametrize("size", [SIZE, (50, 60)])  # 50x60 is smaller than the window: padded with the pad colour
def test_stitched_probs_are_the_averaged_probabilities(
    export_tiny: Callable[..., Any], tiny_teacher: Path, size: tuple[int, int]
) -> None:
    result = export_tiny(f"probs{size[0]}.onnx", window=None, image_size=size, output_kind="probs", input_dtype="uint8")
    assert result.parity.max_abs is not None and result.parity.max_abs < 1e-4
    images = random_images(2, *size, seed=5)
    out = ort_run(result.path, images)
    ref = _reference(tiny_teacher, images)
    assert out.shape == (2, 3, *size)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)
    ops = [node.op_type for node in onnx.load(str(result.path)).graph.node]
    assert not {"Pad", "Tile", "Expand", "ConstantOfShape", "Loop", "Scan", "If"} & set(ops)


def test_verify_compares_a_stitched_onnx_with_the_sliding_window(
    export_tiny: Callable[..., Any], tiny_teacher: Path
) -> None:
    from imas_export import ParityOptions, VerifyOptions, verify

    path = export_tiny("stitched.onnx", window=None, image_size=SIZE).path
    result = verify(VerifyOptions(teacher=tiny_teacher, onnx=path, parity=ParityOptions(num_images=1)))
    assert [r.backend for r in result.reports] == ["onnxruntime-cpu"]
    assert result.reports[0].agreement >= 0.999 and result.reports[0].images == 1
    assert "full_tiles sliding window" in result.stages[1].note


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"output_kind": "logits"}, "outputs labels or probs"),
        ({"dynamic_hw": True}, "exclusive"),
        ({"image_size": (0, 150)}, "positive"),
    ],
)
def test_stitched_refusals(export_tiny: Callable[..., Any], options: dict[str, Any], match: str) -> None:
    with pytest.raises(ExportError, match=match):
        export_tiny("bad.onnx", **{"image_size": SIZE, **options})


def test_cli_image_size_prints_the_stitched_next_steps(
    tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imas_export.cli import main

    model = tmp_path / "stitched.onnx"
    argv = ["onnx", "--teacher", str(tiny_teacher), "--output", str(model), "--image-size", "50", "60", "-n", "1"]
    assert main([*argv, "--input-dtype", "uint8"]) == 0
    out = capsys.readouterr().out
    assert "stitched 50x60: 1 window 65x65 in-graph" in out
    assert f"imas-export trt --onnx {model} --output {model.with_suffix('.engine')} --max-batch 2" in out
    assert "--synthetic 8 50x60" in out
    assert read_exported_meta(model).output_kind == "labels"  # the default head of stitched models
