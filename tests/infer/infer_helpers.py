"""Inference test helpers: tiny ONNX models with sidecars, fake numpy backends, test images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imas_core.artifacts import ExportedModelMeta, write_exported_meta
from imas_core.atomic import sha256_file
from imas_core.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from imas_core.runners.base import Backend, ModelInfo

CLASS_NAMES = ["zero", "one", "two"]
PALETTE = [[10, 20, 30], [200, 40, 40], [40, 200, 90]]


def conv_weights(num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(C, 3) weights and (C,) bias of the 1x1 convolution the tiny models compute on raw 0-255 RGB."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 0.03, size=(num_classes, 3)), rng.normal(0.0, 1.0, size=num_classes)


def expected_logits(image: np.ndarray, num_classes: int = 3, seed: int = 0) -> np.ndarray:
    """(C, H, W) float64 logits of the tiny model for an (H, W, 3) uint8 image."""
    weight, bias = conv_weights(num_classes, seed)
    return np.einsum("ck,hwk->chw", weight, image.astype(np.float64)) + bias[:, None, None]


def make_onnx(
    path: Path,
    *,
    num_classes: int = 3,
    window: tuple[int, int] | None = (16, 24),
    output_kind: str = "logits",
    input_dtype: str = "float32",
    max_batch: int | None = 8,
    static_batch: int | None = None,
    stride: tuple[int, int] | None = None,
    seed: int = 0,
) -> Path:
    """A 1x1-convolution segmentation model (raw RGB 0-255 in) and its sidecar, like an imas-export output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight, bias = conv_weights(num_classes, seed)
    dims: list[Any] = [static_batch or "batch", 3, *(window or ("height", "width"))]
    elem = TensorProto.FLOAT if input_dtype == "float32" else TensorProto.UINT8
    nodes, conv_in = [], "image"
    if input_dtype == "uint8":
        nodes.append(helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT))
        conv_in = "image_f"
    inits = [
        numpy_helper.from_array(weight.reshape(num_classes, 3, 1, 1).astype(np.float32), "w"),
        numpy_helper.from_array(bias.astype(np.float32), "b"),
    ]
    out_dims: list[Any] = [dims[0], num_classes, *dims[2:]]
    if output_kind == "logits":
        nodes.append(helper.make_node("Conv", [conv_in, "w", "b"], ["logits"]))
        output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_dims)
    elif output_kind == "probs":
        nodes.append(helper.make_node("Conv", [conv_in, "w", "b"], ["z"]))
        nodes.append(helper.make_node("Softmax", ["z"], ["probs"], axis=1))
        output = helper.make_tensor_value_info("probs", TensorProto.FLOAT, out_dims)
    else:
        nodes.append(helper.make_node("Conv", [conv_in, "w", "b"], ["z"]))
        nodes.append(helper.make_node("ArgMax", ["z"], ["ids"], axis=1, keepdims=0))
        nodes.append(helper.make_node("Cast", ["ids"], ["labels"], to=TensorProto.UINT8))
        output = helper.make_tensor_value_info("labels", TensorProto.UINT8, [dims[0], *dims[2:]])
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", elem, dims)], [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    names = list(CITYSCAPES_CLASSES) if num_classes == 19 else [f"c{i}" for i in range(num_classes)]
    if num_classes == 3:
        names = list(CLASS_NAMES)
    palette = (
        [list(c) for c in CITYSCAPES_PALETTE] if num_classes == 19 else [PALETTE[i % 3] for i in range(num_classes)]
    )
    win = list(window) if window else None
    meta = ExportedModelMeta(
        kind="onnx",
        num_classes=num_classes,
        class_names=names,
        palette=palette,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        input_name="image",
        input_dtype=input_dtype,
        output_name=output.name,
        output_kind=output_kind,
        output_dtype="uint8" if output_kind == "labels" else "float32",
        window=win,
        stride=list(stride or ([w * 2 // 3 for w in window] if window else [20, 20])),
        eval_protocol="imas",
        precision="fp32",
        max_batch=max_batch,
        source_sha256="0" * 64,
        artifact_sha256=sha256_file(path),
        opset=17,
        exporter="tests",
    )
    write_exported_meta(path, meta)
    return path


def expected_labels(image: np.ndarray, num_classes: int = 3, seed: int = 0) -> np.ndarray:
    """(H, W) uint8 class ids the tiny model predicts for an (H, W, 3) uint8 image."""
    return expected_logits(image, num_classes, seed).argmax(0).astype(np.uint8)


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save_image(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_images(root: Path, sizes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Random images saved as `root/<relative path>` (the i-th with seed i), keyed by relative path.

    Returns the pixels as read back from disk, so lossy formats (JPEG) compare with what inference decodes.
    """
    images = {}
    for i, (rel, (height, width)) in enumerate(sizes.items()):
        path = save_image(root / rel, random_image(height, width, seed=i))
        with Image.open(path) as img:
            images[rel] = np.asarray(img.convert("RGB"))
    return images


def read_png(path: Path) -> tuple[str, np.ndarray]:
    """(PIL mode, pixels) of an output image."""
    with Image.open(path) as img:
        return img.mode, np.asarray(img)


def cli_args(model: Path, inputs: Path, output: Path, *extra: str) -> list[str]:
    """`imas-infer` arguments: `model` over `inputs`, outputs under `output`, no progress bar, then `extra`."""
    return ["--model", str(model), "--input", str(inputs), "--output", str(output), "--no-progress", *extra]


def encode_positions(height: int, width: int) -> np.ndarray:
    """An image whose colour encodes each pixel's (y, x): R = y mod 256, G = x mod 256, B = 16 (y//256) + x//256."""
    y, x = np.mgrid[:height, :width]
    return np.stack([y % 256, x % 256, 16 * (y // 256) + x // 256], axis=-1).astype(np.uint8)


def position_logits(y: np.ndarray, x: np.ndarray, num_classes: int) -> np.ndarray:
    """The closed-form logits the position backend produces: (C, *y.shape)."""
    c = np.arange(num_classes, dtype=np.float64).reshape(-1, *([1] * y.ndim))
    return 3.0 * np.sin(0.31 * y * (c + 1) + 0.17 * x) + np.cos(0.053 * x * (c + 2) - 0.7 * y)


def _info(num_classes: int, window: tuple[int, int] | None, max_batch: int | None, kind: str) -> ModelInfo:
    return ModelInfo(
        path=Path("fake.onnx"),
        format="fake",
        num_classes=num_classes,
        class_names=tuple(f"c{i}" for i in range(num_classes)),
        palette=tuple((i * 40 % 256, i * 90 % 256, i * 150 % 256) for i in range(num_classes)),
        window=window,
        default_window=window or (16, 16),
        default_stride=(11, 11),
        max_batch=max_batch,
        max_batch_is_hard=False,
        output_kind=kind,
        input_dtype="float32",
        precision="fp32",
        eval_protocol="imas",
    )


class PositionBackend(Backend):
    """Fake model: logits = position_logits(y, x) of the global pixel position decoded from each pixel's colour.

    Since the output of a pixel depends only on where it is in the image, the stitched result equals the closed
    form exactly when every window is cut, flipped, placed and cropped at the right offset.
    """

    name = "fake"
    runtime = "numpy"

    def __init__(self, num_classes: int = 4, window: tuple[int, int] | None = None, max_batch: int | None = None):
        self.info = _info(num_classes, window, max_batch, "logits")
        self.calls: list[tuple[int, ...]] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.info.window is not None:
            assert batch.shape[2:] == self.info.window, batch.shape
        self.calls.append(batch.shape)
        b = batch.astype(np.int64)
        y, x = b[:, 0] + 256 * (b[:, 2] // 16), b[:, 1] + 256 * (b[:, 2] % 16)
        return np.moveaxis(position_logits(y, x, self.info.num_classes), 0, 1).astype(np.float32)


class WindowSensitiveBackend(Backend):
    """Fake model whose output depends on the whole window (running means along x and y), like a real network."""

    name = "fake"
    runtime = "numpy"

    def __init__(self, num_classes: int = 3, window: tuple[int, int] | None = None):
        self.info = _info(num_classes, window, None, "logits")
        self.calls: list[tuple[int, ...]] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.shape)
        x = batch.astype(np.float64) / 255.0
        along_x = np.cumsum(x, axis=3) / np.arange(1, x.shape[3] + 1)
        along_y = np.cumsum(x, axis=2) / np.arange(1, x.shape[2] + 1)[:, None]
        feats = np.concatenate([x, along_x, along_y], axis=1)  # (N, 9, h, w)
        weight = np.random.default_rng(5).normal(size=(self.info.num_classes, 9))
        return np.einsum("ck,nkhw->nchw", weight, feats).astype(np.float32)
