"""Artifact files and their JSON sidecars: the contract between training, export and inference.

Stdlib only. Every artifact `X` has a sidecar `X.json` beside it (`teacher.safetensors` ->
`teacher.safetensors.json` is NOT used: the teacher sidecar is `teacher.json`, see `teacher_sidecar_path`).
Writes are atomic (temporary file, fsync, rename), so a crash never leaves a truncated file behind. Readers check
every field's type with the same typed loader as the configs (`imas_core.typed`).

Sidecar kinds (field `kind`):
* ``teacher``: the EMA teacher weights (safetensors) written at the end of training.
* ``onnx``: an exported ONNX model.
* ``tensorrt``: a serialized TensorRT engine (the raw plan, never prefixed with metadata).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imas_core.atomic import atomic_write_json, sha256_file
from imas_core.constants import DEFAULT_WINDOW
from imas_core.errors import ArtifactError
from imas_core.typed import from_dict

FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------------- sidecars


def sidecar_path(artifact: Path | str) -> Path:
    """`model.onnx` -> `model.onnx.json`; `model.fp16.engine` -> `model.fp16.engine.json`."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def teacher_sidecar_path(weights: Path | str) -> Path:
    """`teacher.safetensors` -> `teacher.json` (docs/style.md §2)."""
    weights = Path(weights)
    return weights.with_suffix(".json")


@dataclass(frozen=True)
class TeacherMeta:
    """Sidecar of `teacher.safetensors`: everything needed to rebuild and use the model without the config file."""

    model_config: dict[str, Any]  # asdict(ModelConfig); rebuilt with config.model_config_from_dict
    class_names: list[str]
    palette: list[list[int]]  # one [r, g, b] per class
    mean: list[float]  # normalisation applied to 0-1 RGB
    std: list[float]
    weights_sha256: str
    window: int = DEFAULT_WINDOW  # sliding-window size the model was validated with
    stride: int = 512
    eval_protocol: str = "imas"
    dataset: str = ""
    epoch: int = 0
    step: int = 0
    miou_final: float | None = None
    miou_best: float | None = None
    best_epoch: int | None = None
    split_sha256: dict[str, str] = field(default_factory=dict)
    training_summary: dict[str, Any] = field(default_factory=dict)
    kind: str = "teacher"
    format_version: int = FORMAT_VERSION


@dataclass(frozen=True)
class ExportedModelMeta:
    """Sidecar of an exported model (`kind` 'onnx' or 'tensorrt').

    The input is raw RGB pixels, NCHW, value range 0-255; normalisation (mean/std, recorded for audit) happens in
    the graph. `window` is (H, W) for a static spatial size, or None when height and width are dynamic.

    A *stitched* model (`stitched` True) takes whole images of the static size `image_size` and runs the `full_tiles`
    sliding window inside the graph: `window` and `stride` are then its in-graph window plan, `max_batch` counts
    images, and the output is the final label map or averaged probabilities. `input_size` is the static input
    (H, W) in both cases.
    """

    kind: str  # "onnx" | "tensorrt"
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    mean: list[float]
    std: list[float]
    input_name: str
    input_dtype: str  # "float32" | "uint8"
    output_name: str
    output_kind: str  # "logits" | "probs" | "labels"
    output_dtype: str  # "float32" | "float16" | "uint8"
    window: list[int] | None  # [H, W], or None for dynamic height/width
    stride: list[int]  # [H, W] default sliding-window stride
    eval_protocol: str  # protocol the source teacher was validated with
    precision: str  # "fp32" | "fp16" | "int8"
    max_batch: int | None  # None = dynamic batch without a declared maximum; images for stitched models
    source_sha256: str  # sha256 of the teacher safetensors
    artifact_sha256: str  # sha256 of this artifact's bytes
    opset: int | None = None
    exporter: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    input_layout: str = "NCHW"
    input_range: list[float] = field(default_factory=lambda: [0.0, 255.0])
    parity: dict[str, Any] = field(default_factory=dict)  # the export-time parity report
    tensorrt: dict[str, Any] = field(default_factory=dict)  # engines: version, gpu, compute capability, profiles
    format_version: int = FORMAT_VERSION
    # Optional since they were added: sidecars written before read as window models of unknown default window.
    stitched: bool = False  # the full_tiles sliding window runs inside the graph on whole images
    image_size: list[int] | None = None  # [H, W] of the whole images a stitched model takes (static)
    default_window: list[int] | None = None  # [H, W] the teacher was validated with: the window of dynamic-HW models

    @property
    def input_size(self) -> list[int] | None:
        """The static input [H, W]: the image size of a stitched model, else `window` (None: dynamic)."""
        return self.image_size if self.stitched else self.window


def _meta_from_json(cls: type, raw: Any, path: Path) -> Any:
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: sidecar must be a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - raw.keys())
    if missing:
        raise ArtifactError(f"{path}: sidecar lacks field(s) {', '.join(missing)}; re-create the artifact")
    version = raw.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: sidecar format_version {version}, this toolkit reads {FORMAT_VERSION}")
    unknown = sorted(raw.keys() - names)
    if unknown:
        raise ArtifactError(f"{path}: unknown sidecar field(s) {', '.join(unknown)}; written by a newer toolkit?")
    return from_dict(cls, raw, str(path), ArtifactError)


def read_json(path: Path | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: sidecar JSON not found (every artifact travels with its .json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from err


def write_teacher_meta(weights: Path | str, meta: TeacherMeta) -> Path:
    path = teacher_sidecar_path(weights)
    atomic_write_json(path, dataclasses.asdict(meta))
    return path


def read_teacher_meta(weights: Path | str, *, verify_checksum: bool = True) -> TeacherMeta:
    """Read and validate `teacher.json` beside `weights`; refuse a weights file whose sha256 differs."""
    weights = Path(weights)
    path = teacher_sidecar_path(weights)
    meta: TeacherMeta = _meta_from_json(TeacherMeta, read_json(path), path)
    if meta.kind != "teacher":
        raise ArtifactError(f"{path}: kind is {meta.kind!r}, expected 'teacher'")
    if len(meta.class_names) != meta.model_config.get("num_classes"):
        raise ArtifactError(
            f"{path}: {len(meta.class_names)} class names but model_config.num_classes="
            f"{meta.model_config.get('num_classes')}"
        )
    if verify_checksum:
        if not weights.is_file():
            raise ArtifactError(f"{weights}: weights file not found")
        actual = sha256_file(weights)
        if actual != meta.weights_sha256:
            raise ArtifactError(
                f"{weights.name}: sha256 {actual[:12]}... does not match {path.name} ({meta.weights_sha256[:12]}...);"
                " the file was modified or belongs to another run"
            )
    return meta


def write_exported_meta(artifact: Path | str, meta: ExportedModelMeta) -> Path:
    path = sidecar_path(artifact)
    atomic_write_json(path, dataclasses.asdict(meta))
    return path


def read_exported_meta(artifact: Path | str, *, verify_checksum: bool = True) -> ExportedModelMeta:
    """Read and validate `<artifact>.json`; refuse an artifact whose bytes do not match the recorded sha256."""
    artifact = Path(artifact)
    path = sidecar_path(artifact)
    meta: ExportedModelMeta = _meta_from_json(ExportedModelMeta, read_json(path), path)
    if meta.kind not in ("onnx", "tensorrt"):
        raise ArtifactError(f"{path}: kind is {meta.kind!r}, expected 'onnx' or 'tensorrt'")
    if len(meta.class_names) != meta.num_classes:
        raise ArtifactError(f"{path}: {len(meta.class_names)} class names but num_classes={meta.num_classes}")
    if meta.stitched and (meta.image_size is None or meta.window is None):
        raise ArtifactError(f"{path}: a stitched model needs image_size and window ({meta.image_size}, {meta.window})")
    if verify_checksum:
        if not artifact.is_file():
            raise ArtifactError(f"{artifact}: file not found")
        actual = sha256_file(artifact)
        if actual != meta.artifact_sha256:
            raise ArtifactError(
                f"{artifact.name}: sha256 {actual[:12]}... does not match {path.name} "
                f"({meta.artifact_sha256[:12]}...); the file was modified or the sidecar belongs to another export"
            )
    return meta
