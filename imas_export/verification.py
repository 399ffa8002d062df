"""`imas-export verify`: the PyTorch teacher vs ONNX Runtime vs TensorRT on the same images.

Each exported artifact is first checked against its sidecar (checksum, class count) and against the teacher (the
sidecar's `source_sha256` must be the teacher's weights hash). TensorRT runs only where it is importable and a CUDA
GPU is visible; otherwise it is reported as skipped, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imas_core.artifacts import ExportedModelMeta, TeacherMeta, read_exported_meta
from imas_core.errors import ArtifactError
from imas_core.runners.onnxruntime_backend import OrtBackend
from imas_core.runtime import gpu_info
from imas_export.graph import check_onnx_artifact
from imas_export.options import VerifyOptions
from imas_export.parity import ParityReport, Runner, compare, require_passed, run_batched, teacher_reference, thresholds
from imas_export.samples import Samples, demo_samples, load_folder
from imas_export.stages import Stage, StageCallback, StageLog

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyResult:
    """One parity report per backend that ran; `skipped` maps the others to the reason."""

    reports: list[ParityReport]
    skipped: dict[str, str] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)


def check_same_source(teacher: TeacherMeta, meta: ExportedModelMeta, artifact: Path) -> None:
    """Refuse an exported model that was not made from this teacher (weights hash or classes differ)."""
    if meta.source_sha256 != teacher.weights_sha256:
        raise ArtifactError(
            f"{artifact.name} was exported from weights {meta.source_sha256[:12]}..., not from this teacher "
            f"({teacher.weights_sha256[:12]}...); pass the teacher it came from or re-export"
        )
    if list(meta.class_names) != list(teacher.class_names):
        raise ArtifactError(f"{artifact.name}: class names {meta.class_names} differ from the teacher's")


def _tensorrt_runner(engine: Path, meta: ExportedModelMeta) -> tuple[Runner | None, str, Any]:
    """(runner, reason-if-unavailable, closable backend) for a TensorRT engine."""
    try:
        import tensorrt  # noqa: F401  # optional; present on GPU hosts and Jetsons only
    except ImportError:
        return (
            None,
            'TensorRT is not installed (pip install -e ".[trt]" in the imas checkout, on a machine with an NVIDIA GPU)',
            None,
        )
    if gpu_info() is None:
        return None, "no CUDA GPU is visible", None
    from imas_core.runners.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend(engine, meta)
    return (lambda batch: np.array(backend.run(batch), copy=True)), "", backend


def _ort_runner(backend: OrtBackend) -> Runner:
    """Raw RGB images (N, 3, H, W) -> the model's output, through the same ONNX Runtime runner as `imas-infer`."""
    dtype = backend.input_dtype
    return lambda batch: np.array(backend.run(np.ascontiguousarray(batch.astype(dtype, copy=False))), copy=True)


def _window(
    onnx_meta: ExportedModelMeta, engine_meta: ExportedModelMeta | None, teacher: TeacherMeta
) -> tuple[int, int]:
    """The static input (window, or whole image if stitched), else the engine profile's optimal size, else the
    teacher's validation window."""
    if onnx_meta.input_size:
        return int(onnx_meta.input_size[0]), int(onnx_meta.input_size[1])
    profiles = engine_meta.tensorrt.get("profiles") if engine_meta is not None else None
    if profiles:
        opt = profiles[0][engine_meta.input_name]["opt"]  # type: ignore[union-attr]
        return int(opt[2]), int(opt[3])
    return teacher.window, teacher.window


def verify(options: VerifyOptions, on_stage: StageCallback | None = None) -> VerifyResult:
    """Compare ONNX Runtime (and TensorRT) outputs with the teacher's; see VerifyOptions.

    Raises:
        ArtifactError: an artifact does not match its sidecar or does not come from this teacher.
        ExportError: a backend is below its parity thresholds (every report has been emitted as a stage first).
    """
    from imas_train.teacher_artifact import load_teacher

    log = StageLog(on_stage)
    teacher, teacher_meta = load_teacher(options.teacher, "cpu")
    onnx_meta = check_onnx_artifact(options.onnx)
    check_same_source(teacher_meta, onnx_meta, options.onnx)
    engine_meta = None
    if options.engine is not None:
        engine_meta = read_exported_meta(options.engine)
        check_same_source(teacher_meta, engine_meta, options.engine)
        if engine_meta.tensorrt.get("onnx_sha256") not in (None, onnx_meta.artifact_sha256):
            _log.warning("%s was built from another ONNX than %s", options.engine.name, options.onnx.name)
    log.done("check", note="teacher, ONNX" + (" and engine" if options.engine else "") + " checksums verified")

    p = options.parity
    window = _window(onnx_meta, engine_meta, teacher_meta)
    samples: Samples = (
        load_folder(p.images_dir, window, p.num_images, p.labels_dir)
        if p.images_dir is not None
        else demo_samples(window, p.num_images, "val", teacher_meta.class_names)
    )
    stitch = None
    if onnx_meta.stitched and onnx_meta.window is not None:
        stitch = (tuple(onnx_meta.window), tuple(onnx_meta.stride))
    reference, reference_kind = teacher_reference(
        teacher,
        teacher_meta.mean,
        teacher_meta.std,
        samples.images,
        num_classes=onnx_meta.num_classes,
        stitch=stitch,  # type: ignore[arg-type]
    )
    note = ", full_tiles sliding window (stitched model)" if stitch else ""
    log.done("torch", note=f"{len(samples)} images from {samples.source}{note}")

    candidates: list[tuple[str, ExportedModelMeta, Runner, Path]] = []
    ort = OrtBackend(options.onnx, onnx_meta, name=f"ort-{p.provider}")  # the runner imas-infer uses
    candidates.append((f"onnxruntime-{p.provider}", onnx_meta, _ort_runner(ort), options.onnx))
    skipped: dict[str, str] = {}
    closable = None
    if options.engine is not None and engine_meta is not None:
        runner, reason, closable = _tensorrt_runner(options.engine, engine_meta)
        if runner is None:
            skipped["tensorrt"] = reason
        else:
            candidates.append(("tensorrt", engine_meta, runner, options.engine))

    reports = []
    try:
        for backend, meta, runner, path in candidates:
            min_agreement, max_abs = thresholds(meta.precision, p)
            batch = meta.max_batch or 1
            output = run_batched(runner, samples.images, batch)
            report = compare(
                reference,
                output,
                meta.output_kind,  # type: ignore[arg-type]
                backend=backend,
                precision=meta.precision,
                source=samples.source,
                min_agreement=min_agreement,
                max_abs_limit=max_abs,
                labels=samples.labels,
                reference_kind=reference_kind,
            )
            reports.append((report, path))
            log.done("compare", path, note=report.line())
    finally:
        if closable is not None:
            closable.close()
    for name, reason in skipped.items():
        log.done(name, note=f"skipped: {reason}")
    for report, path in reports:
        require_passed(report, path, "it does not reproduce the teacher closely enough")
    return VerifyResult([r for r, _ in reports], skipped, log.stages)
