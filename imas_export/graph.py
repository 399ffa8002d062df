"""ONNX model helpers: IR version, Resize semantics, metadata properties, ORT sessions and sidecar checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from imas_core.artifacts import ExportedModelMeta, read_exported_meta
from imas_core.errors import ArtifactError, ExportError
from imas_export.options import Provider

# Sidecar fields mirrored into the ONNX metadata_props (JSON strings), so a bare .onnx still describes itself.
METADATA_FIELDS = (
    "num_classes", "class_names", "palette", "mean", "std", "input_name", "input_dtype", "input_layout",
    "input_range", "output_name", "output_kind", "output_dtype", "window", "stride", "eval_protocol", "precision",
    "max_batch", "source_sha256", "opset", "exporter", "versions", "format_version", "stitched", "image_size",
    "default_window",
)  # fmt: skip
METADATA_PREFIX = "imas."


def set_min_ir_version(model: onnx.ModelProto) -> int:
    """Lower the IR version to the smallest one that supports the model's opsets (IR 8 for opset 17).

    onnx >= 1.23 stamps new models with IR 14 (by onnx.helper / quantisation tools), which onnxruntime 1.31 and
    TensorRT's parser reject; the minimum is read by every runtime that supports the opset. Returns the version.
    """
    required = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = required
    return required


def strip_unused_opsets(model: onnx.ModelProto) -> None:
    """Drop opset imports of domains no node uses (ORT's optimiser adds its private ones)."""
    used = {node.domain for node in model.graph.node} | {""}
    keep = [op for op in model.opset_import if op.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def check_resize_align_corners(model: onnx.ModelProto) -> int:
    """Every Resize must use coordinate_transformation_mode=align_corners (docs/algorithm.md §4). Returns the count."""
    count = 0
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        count += 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("coordinate_transformation_mode", b"half_pixel")
        if mode != b"align_corners":
            raise ExportError(
                f"Resize node {node.name!r} uses coordinate_transformation_mode={mode.decode()}, not align_corners: "
                "the model's interpolate calls must pass align_corners=True"
            )
    return count


def declare_output_shape(path: Path, dims: list[int | None]) -> None:
    """Declare the static sizes of the single graph output in place (None keeps the dimension as it is)."""
    model = onnx.load(str(path))
    shape = model.graph.output[0].type.tensor_type.shape
    if len(shape.dim) != len(dims):
        raise ExportError(f"output {model.graph.output[0].name} has rank {len(shape.dim)}, expected {len(dims)}")
    for dim, size in zip(shape.dim, dims, strict=True):
        if size is not None:
            dim.Clear()
            dim.dim_value = size
    onnx.save(model, str(path))


def write_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Replace the model's metadata_props with `imas.<field>` = JSON of each METADATA_FIELDS entry of `meta`."""
    del model.metadata_props[:]
    for key in METADATA_FIELDS:
        prop = model.metadata_props.add()
        prop.key, prop.value = METADATA_PREFIX + key, json.dumps(meta[key])


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The `imas.*` metadata_props of a model, JSON-decoded, keyed without the prefix."""
    out = {}
    for prop in model.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            out[prop.key[len(METADATA_PREFIX) :]] = json.loads(prop.value)
    return out


def simplify_with_ort(source: Path, target: Path) -> None:
    """Offline ONNX Runtime basic optimisation (constant folding, redundant-node removal, Conv+BN/Add/Mul fusion).

    Basic-level rewrites use standard ONNX ops only, so the result stays portable to TensorRT and other runtimes.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(target)
    opts.log_severity_level = 3
    ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(target))
    strip_unused_opsets(model)
    set_min_ir_version(model)
    onnx.save(model, str(target))


def ort_session(path: Path, provider: Provider) -> Any:
    """An onnxruntime InferenceSession with explicit providers; refuses a silent CUDA -> CPU fallback."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        raise ExportError(f"{path.name}: ONNX Runtime cannot load the model: {err}") from err
    if provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise ExportError("ONNX Runtime's CUDA provider did not start (no GPU or CUDA libraries); use --provider cpu")
    return session


def ort_runner(session: Any, input_dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping raw uint8 images (N, 3, H, W) to the session's single output."""
    name = session.get_inputs()[0].name
    dtype = np.uint8 if input_dtype == "uint8" else np.float32

    def run(images: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: np.ascontiguousarray(images.astype(dtype))})[0])

    return run


def check_onnx_artifact(path: Path) -> ExportedModelMeta:
    """Read `<model>.onnx.json`, verify the checksum, and refuse an ONNX whose own metadata or output disagree."""
    meta = read_exported_meta(path)
    if meta.kind != "onnx":
        raise ArtifactError(f"{path.name}: sidecar kind is {meta.kind!r}, expected 'onnx'")
    model = onnx.load(str(path), load_external_data=False)
    props = read_metadata(model)
    for key in ("num_classes", "class_names", "input_name", "output_name", "output_kind", "precision", "stitched"):
        if key in props and props[key] != getattr(meta, key):
            raise ArtifactError(
                f"{path.name}: sidecar {key}={getattr(meta, key)!r} but the ONNX metadata says {props[key]!r}; "
                "the sidecar belongs to another export"
            )
    outputs = {o.name: o for o in model.graph.output}
    if meta.output_name not in outputs:
        raise ArtifactError(f"{path.name}: no output named {meta.output_name!r} (sidecar); outputs {list(outputs)}")
    dims = outputs[meta.output_name].type.tensor_type.shape.dim
    if meta.output_kind != "labels" and len(dims) == 4 and dims[1].HasField("dim_value"):
        if dims[1].dim_value != meta.num_classes:
            raise ArtifactError(
                f"{path.name}: the model outputs {dims[1].dim_value} classes but the sidecar says num_classes="
                f"{meta.num_classes}"
            )
    return meta
