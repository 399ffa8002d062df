"""The in-graph cell partition equals imas_infer's NumPy stitching, and stitched graphs survive fp16 and int8."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from imas_core.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tests.export.export_helpers import ort_run, random_images  # noqa: E402
from tests.infer.infer_helpers import encode_positions  # noqa: E402


class WindowSensitiveNet(nn.Module):
    """Logits from each pixel and from running means along x and y *inside the window*, like a real network.

    Overlapping windows therefore disagree on shared pixels, and only windows cut, averaged and placed at the
    right offsets reproduce the NumPy stitching.
    """

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        weight = torch.randn(num_classes, 9, 1, 1, generator=torch.Generator().manual_seed(5))
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        along_x = torch.cumsum(x, dim=3) / torch.arange(1, w + 1, dtype=torch.float32)
        along_y = torch.cumsum(x, dim=2) / torch.arange(1, h + 1, dtype=torch.float32).view(-1, 1)
        return nn.functional.conv2d(torch.cat([x, along_x, along_y], dim=1), self.weight)


def _numpy_stitching(net: nn.Module, image: np.ndarray, window: tuple[int, int], stride: tuple[int, int]) -> Any:
    """imas_infer's full_tiles path: plan, pad raw, run every window, softmax + sum + count in NumPy, argmax."""
    from imas_core.constants import PAD_RGB
    from imas_core.stitching import NumpyStitcher
    from imas_export.wrapper import ExportWrapper
    from imas_infer.stitch import pad_image, plan_image

    h, w = image.shape[:2]
    canvas_hw, windows = plan_image(h, w, "full_tiles", window, stride, window)
    padded = pad_image(image, canvas_hw, PAD_RGB)
    crops = np.stack([padded[y0:y1, x0:x1].transpose(2, 0, 1) for y0, y1, x0, x1 in windows]).astype(np.float32)
    with torch.inference_mode():
        logits = ExportWrapper(net, IMAGENET_MEAN, IMAGENET_STD).eval()(torch.from_numpy(crops)).numpy()
    stitcher = NumpyStitcher("logits", logits.shape[1], softmax=True)
    canvas, scores = stitcher.new_canvas(canvas_hw), stitcher.scores(logits)
    for k, win in enumerate(windows):
        stitcher.add(canvas, scores, k, win, False)
    return stitcher.finish(canvas, (h, w), keep_probs=True)


def _export(net: nn.Module, path: Path, size: tuple[int, int], window: Any, stride: Any, kind: str) -> Path:
    from imas_export.onnx_export import trace
    from imas_export.stitched import StitchedWrapper

    wrapper = StitchedWrapper(
        net, IMAGENET_MEAN, IMAGENET_STD, num_classes=4, image_size=size, window=window, stride=stride, output_kind=kind
    )
    trace(wrapper, path, size, output_kind=kind, input_dtype="float32", opset=17)
    return path


@pytest.mark.parametrize(
    ("size", "window", "stride"),
    [
        ((100, 150), (40, 64), (27, 43)),  # 4 x 3 windows, the last row moved back by 21 px: thin cells
        ((37, 150), (40, 64), (40, 64)),  # padded bottom, stride = window except the flush last column
    ],
)
def test_cells_equal_numpy_stitching(tmp_path: Path, size: tuple[int, int], window: Any, stride: Any) -> None:
    net = WindowSensitiveNet().eval()
    image = encode_positions(*size)  # every pixel's colour encodes where it is: misplaced slices show up
    image[..., 2] = np.random.default_rng(0).integers(0, 256, size)  # plus texture
    labels_ref, probs_ref = _numpy_stitching(net, image, window, stride)
    batch = np.stack([image.transpose(2, 0, 1)] * 2)
    probs = ort_run(_export(net, tmp_path / "p.onnx", size, window, stride, "probs"), batch)
    labels = ort_run(_export(net, tmp_path / "l.onnx", size, window, stride, "labels"), batch)
    for i in range(2):
        np.testing.assert_allclose(probs[i], probs_ref, atol=1e-6, rtol=0)
        top2 = np.sort(probs_ref, axis=0)[-2:]
        clear = top2[1] - top2[0] > 1e-5  # exact near-ties may break either way
        np.testing.assert_array_equal(labels[i][clear], labels_ref[clear])
        assert clear.mean() > 0.99


def test_fp16_stitched_model_runs_in_ort(export_tiny: Callable[..., Any]) -> None:
    result = export_tiny(
        "stitched.fp16.onnx", window=None, image_size=(100, 150), precision="fp16", output_kind="probs"
    )
    assert result.parity.agreement >= 0.99 and result.parity.max_abs is not None and result.parity.max_abs < 0.01
    model = onnx.load(str(result.path))
    graph = model.graph
    assert (
        graph.input[0].type.tensor_type.elem_type
        == graph.output[0].type.tensor_type.elem_type
        == onnx.TensorProto.FLOAT
    )
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.value_info, *inferred.output]}
    softmax = next(i for i, node in enumerate(graph.node) if node.op_type == "Exp")
    after = [out for node in graph.node[softmax:] for out in node.output if types.get(out) in (1, 10)]
    assert after and all(types[out] == onnx.TensorProto.FLOAT for out in after)  # accumulation/divide in float32
    out = ort_run(result.path, random_images(1, 100, 150, seed=2))
    assert out.shape == (1, 3, 100, 150) and out.dtype == np.float32


def test_int8_stitched_model_quantises_and_runs(export_tiny: Callable[..., Any], tmp_path: Path) -> None:
    from PIL import Image

    calib = tmp_path / "calib"
    calib.mkdir()
    for i, img in enumerate(random_images(3, 100, 150, seed=9)):
        Image.fromarray(img.transpose(1, 2, 0)).save(calib / f"{i}.png")
    result = export_tiny(
        "stitched.int8.onnx", window=None, image_size=(50, 60), precision="int8", calib_dir=calib,
        parity={"min_agreement": 0.0},
    )  # fmt: skip
    ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "ArgMax"} <= ops
    assert ort_run(result.path, random_images(2, 50, 60)).shape == (2, 50, 60)
