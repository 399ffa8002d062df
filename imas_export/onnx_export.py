"""Teacher artifact -> ONNX (+ sidecar): trace, check, optionally reduce precision, then prove parity before writing.

Opset 17 is the default because it is the widest-supported recent opset: TensorRT 8.6, 10.x and 11.x parse it,
ONNX Runtime >= 1.13 runs it, and JetPack 5/6 ship such TensorRT versions; `Resize` with
coordinate_transformation_mode=align_corners, which the model needs, exists since opset 11.

Nothing is written at the output path until the model has passed `onnx.checker` and the parity check: every
intermediate file lives in a temporary folder beside the output, and the final bytes (metadata included) are the
ones that were checked and hashed.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

import imas_train
from imas_export.graph import (
    check_resize_align_corners,
    ort_runner,
    ort_session,
    set_min_ir_version,
    simplify_with_ort,
    write_metadata,
)
from imas_export.options import MIN_CALIBRATION_IMAGES, OnnxExportOptions
from imas_export.parity import ParityReport, compare, require_passed, run_batched, thresholds, torch_reference
from imas_export.quantize import convert_to_fp16, quantize_int8
from imas_export.samples import Samples, demo_samples, list_images, load_files, load_folder
from imas_export.stages import Stage, StageCallback, StageLog
from imas_export.wrapper import INPUT_NAME, OUTPUT_NAMES, ExportWrapper, example_input
from imas_train.artifacts import ExportedModelMeta, atomic_write_bytes, sha256_file, sidecar_path, write_exported_meta
from imas_train.errors import ExportError
from imas_train.tiling import default_stride

_log = logging.getLogger(__name__)
MIN_OPSET = 11  # first opset with Resize align_corners
DEMO_CALIBRATION_IMAGES = 16  # demo calibration is a smoke test of the pipeline, not a calibration


@dataclass(frozen=True)
class OnnxExportResult:
    """What `export_onnx` wrote and measured."""

    path: Path
    sidecar: Path
    meta: ExportedModelMeta
    parity: ParityReport
    stages: list[Stage]


def _validate(options: OnnxExportOptions) -> None:
    if not MIN_OPSET <= options.opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"--opset must be in [{MIN_OPSET}, {onnx.defs.onnx_opset_version()}], got {options.opset}")
    if options.window is not None and min(options.window) < 1:
        raise ExportError(f"--window must be two positive sizes (H W), got {options.window}")
    if options.max_batch < 1 or options.parity.num_images < 1:
        raise ExportError("--max-batch and -n/--num-images must be >= 1")
    if options.output.suffix != ".onnx":
        raise ExportError(f"--output must end in .onnx, got {options.output.name}")
    if options.precision != "int8" and (options.calib_dir is not None or options.eval_dir is not None):
        raise ExportError("--calib-dir/--eval-dir apply to --precision int8 only")


def _trace(wrapper: ExportWrapper, path: Path, window: tuple[int, int], options: OnnxExportOptions) -> None:
    """Legacy TorchScript exporter (dynamo=False), example batch 2, dynamic batch (and H/W when asked)."""
    output_name = OUTPUT_NAMES[options.output_kind]
    spatial_out = (1, 2) if options.output_kind == "labels" else (2, 3)
    in_axes: dict[int, str] = {0: "batch"}
    out_axes: dict[int, str] = {0: "batch"}
    if options.dynamic_hw:
        in_axes.update({2: "height", 3: "width"})
        out_axes.update({spatial_out[0]: "height", spatial_out[1]: "width"})
    example = example_input(2, window[0], window[1], options.input_dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, mature Resize/align_corners support
            opset_version=options.opset,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_axes={INPUT_NAME: in_axes, output_name: out_axes},
            do_constant_folding=True,
        )
    for item in caught:  # the exporter's own deprecation notices are expected; anything else may matter
        if not issubclass(item.category, DeprecationWarning):
            _log.warning("torch.onnx.export: %s", item.message)


def _parity_samples(options: OnnxExportOptions, window: tuple[int, int], class_names: list[str]) -> Samples:
    p = options.parity
    if p.images_dir is not None:
        return load_folder(p.images_dir, window, p.num_images, p.labels_dir)
    return demo_samples(window, p.num_images, "val", class_names)


def _calibration_samples(
    options: OnnxExportOptions, window: tuple[int, int], class_names: list[str]
) -> tuple[Samples, Samples]:
    """(calibration images, held-out evaluation images) for int8."""
    p = options.parity
    if options.calib_dir is None:
        _log.warning(
            "int8 without --calib-dir: calibrating on %d DEMO images, whose activation ranges do not match real "
            "data; the accuracy figures below say nothing about your dataset. Pass --calib-dir with %d+ images",
            DEMO_CALIBRATION_IMAGES,
            MIN_CALIBRATION_IMAGES,
        )
        calibration = demo_samples(window, DEMO_CALIBRATION_IMAGES, "unlabeled", class_names)
        return calibration, _parity_samples(options, window, class_names)
    eval_dir = options.eval_dir or p.images_dir
    if eval_dir is not None:
        calibration = load_folder(options.calib_dir, window, options.calib_images)
        held = load_folder(eval_dir, window, p.num_images, p.labels_dir)
    else:  # hold out the last 20% of the (sorted) calibration folder
        files = list_images(options.calib_dir)[: options.calib_images]
        if len(files) < 2:
            raise ExportError(f"{options.calib_dir}: int8 needs at least 2 images (calibration + hold-out)")
        cut = len(files) - max(1, len(files) // 5)
        calibration = load_files(files[:cut], window, None, str(options.calib_dir))
        held_files = files[cut:][: p.num_images]  # -n bounds the (CPU) torch reference work
        held = load_files(held_files, window, p.labels_dir, f"hold-out (last 20%) of {options.calib_dir}")
    if len(calibration) < MIN_CALIBRATION_IMAGES:
        _log.warning(
            "int8 calibration on only %d images (< %d): activation ranges may be noisy; use more images",
            len(calibration),
            MIN_CALIBRATION_IMAGES,
        )
    return calibration, held


def _meta(options: OnnxExportOptions, teacher_meta: Any, window: tuple[int, int], num_classes: int) -> dict[str, Any]:
    import onnxruntime

    stride = [teacher_meta.stride, teacher_meta.stride]  # validated with the teacher's window (any size if dynamic)
    if not options.dynamic_hw and window != (teacher_meta.window, teacher_meta.window):
        stride = [default_stride(w) for w in window]
    return {
        "kind": "onnx",
        "num_classes": num_classes,
        "class_names": list(teacher_meta.class_names),
        "palette": [list(c) for c in teacher_meta.palette],
        "mean": list(teacher_meta.mean),
        "std": list(teacher_meta.std),
        "input_name": INPUT_NAME,
        "input_dtype": options.input_dtype,
        "input_layout": "NCHW",
        "input_range": [0.0, 255.0],
        "output_name": OUTPUT_NAMES[options.output_kind],
        "output_kind": options.output_kind,
        "output_dtype": "uint8" if options.output_kind == "labels" else "float32",
        "window": None if options.dynamic_hw else list(window),
        "stride": stride,
        "eval_protocol": teacher_meta.eval_protocol,
        "precision": options.precision,
        "max_batch": options.max_batch,
        "source_sha256": teacher_meta.weights_sha256,
        "artifact_sha256": "",
        "opset": options.opset,
        "exporter": "torch.onnx TorchScript (dynamo=False)",
        "versions": {
            "imas": imas_train.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "format_version": 1,
    }


def export_onnx(options: OnnxExportOptions, on_stage: StageCallback | None = None) -> OnnxExportResult:
    """Export the teacher at `options.teacher` to `options.output` (+ `.json` sidecar); see OnnxExportOptions.

    Raises:
        ArtifactError: the teacher or its sidecar is missing, tampered with or inconsistent.
        ExportError: the export, a graph check or the parity check failed (the output is then not written).
    """
    from imas_train.checkpoint import load_teacher

    _validate(options)
    log = StageLog(on_stage)
    teacher, teacher_meta = load_teacher(options.teacher, "cpu")
    num_classes = len(teacher_meta.class_names)
    if options.output_kind == "labels" and num_classes > 256:
        raise ExportError(f"--output-kind labels stores uint8 class ids; this model has {num_classes} classes")
    window = options.window or (teacher_meta.window, teacher_meta.window)
    log.done("load", options.teacher, note=f"{num_classes} classes, sha256 verified")
    options.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{options.output.name}.", dir=options.output.parent) as tmp:
        work = Path(tmp)
        current = work / "fp32.onnx"
        wrapper = ExportWrapper(teacher, teacher_meta.mean, teacher_meta.std, options.output_kind)
        _trace(wrapper, current, window, options)
        resize_count = check_resize_align_corners(onnx.load(str(current)))
        log.done("export", current, note=f"opset {options.opset}, {resize_count} Resize align_corners")
        if options.simplify:
            simplify_with_ort(current, work / "simplified.onnx")
            current = work / "simplified.onnx"
            log.done("simplify", current, note="onnxruntime basic optimisation")
        if options.precision == "int8":
            calibration, samples = _calibration_samples(options, window, teacher_meta.class_names)
            quantize_int8(current, work / "int8.onnx", calibration, options.input_dtype, work)
            current = work / "int8.onnx"
            log.done("int8", current, note=f"calibrated on {len(calibration)} images ({calibration.source})")
        else:
            samples = _parity_samples(options, window, teacher_meta.class_names)
        model = onnx.load(str(current))
        if options.precision == "fp16":
            model = convert_to_fp16(model)
        meta = _meta(options, teacher_meta, window, num_classes)
        write_metadata(model, meta)
        set_min_ir_version(model)
        onnx.checker.check_model(model)
        final = work / options.output.name
        onnx.save(model, str(final))
        if options.precision == "fp16":
            log.done("fp16", final, note="float16 compute, float32 I/O")

        min_agreement, max_abs = thresholds(options.precision, options.parity)
        session = ort_session(final, options.parity.provider)
        output = run_batched(ort_runner(session, options.input_dtype), samples.images, options.max_batch)
        reference = torch_reference(teacher, teacher_meta.mean, teacher_meta.std, samples.images)
        report = compare(
            reference,
            output,
            options.output_kind,
            backend=f"onnxruntime-{options.parity.provider}",
            precision=options.precision,
            source=samples.source,
            min_agreement=min_agreement,
            max_abs_limit=max_abs,
            labels=samples.labels,
        )
        log.done("parity", note=report.line())
        require_passed(report, options.output)

        sidecar_path(options.output).unlink(missing_ok=True)  # never leave an old sidecar beside new bytes
        atomic_write_bytes(options.output, final.read_bytes())
    meta.update(artifact_sha256=sha256_file(options.output), parity=report.to_dict())
    exported = ExportedModelMeta(**meta)
    sidecar = write_exported_meta(options.output, exported)
    log.done("write", options.output, note=f"+ {sidecar.name}")
    return OnnxExportResult(options.output, sidecar, exported, report, log.stages)
