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

import imas_core
from imas_core.artifacts import ExportedModelMeta, sidecar_path, write_exported_meta
from imas_core.atomic import atomic_write_bytes, sha256_file
from imas_core.errors import ExportError
from imas_core.tiling import default_stride
from imas_export.graph import (
    check_resize_align_corners,
    declare_output_shape,
    ort_runner,
    ort_session,
    set_min_ir_version,
    simplify_with_ort,
    write_metadata,
)
from imas_export.options import OnnxExportOptions
from imas_export.parity import ParityReport, compare, require_passed, run_batched, teacher_reference, thresholds
from imas_export.quantize import convert_to_fp16, quantize_int8
from imas_export.samples import calibration_samples, parity_samples
from imas_export.stages import Stage, StageCallback, StageLog
from imas_export.stitched import STITCHED_OUTPUTS, StitchedWrapper
from imas_export.wrapper import INPUT_NAME, OUTPUT_NAMES, ExportWrapper, example_input

_log = logging.getLogger(__name__)
MIN_OPSET = 11  # first opset with Resize align_corners


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
    if options.resolved_max_batch < 1 or options.parity.num_images < 1:
        raise ExportError("--max-batch and -n/--num-images must be >= 1")
    if options.image_size is not None:
        if min(options.image_size) < 1:
            raise ExportError(f"--image-size must be two positive sizes (H W), got {options.image_size}")
        if options.dynamic_hw:
            raise ExportError("--image-size (a stitched model of static size) and --dynamic-hw are exclusive")
        if options.resolved_output_kind not in STITCHED_OUTPUTS:
            raise ExportError(
                "a stitched model (--image-size) outputs labels or probs: the full_tiles protocol averages the "
                "windows' softmax probabilities, so there are no whole-image logits; use --output-kind labels|probs"
            )
    if options.output.suffix != ".onnx":
        raise ExportError(f"--output must end in .onnx, got {options.output.name}")
    if options.precision != "int8" and (options.calib_dir is not None or options.eval_dir is not None):
        raise ExportError("--calib-dir/--eval-dir apply to --precision int8 only")


def trace(
    wrapper: torch.nn.Module,
    path: Path,
    example_hw: tuple[int, int],
    *,
    output_kind: str,
    input_dtype: str,
    opset: int,
    dynamic_hw: bool = False,
) -> None:
    """Legacy TorchScript exporter (dynamo=False), example batch 2, dynamic batch (and H/W when asked)."""
    output_name = OUTPUT_NAMES[output_kind]
    spatial_out = (1, 2) if output_kind == "labels" else (2, 3)
    in_axes: dict[int, str] = {0: "batch"}
    out_axes: dict[int, str] = {0: "batch"}
    if dynamic_hw:
        in_axes.update({2: "height", 3: "width"})
        out_axes.update({spatial_out[0]: "height", spatial_out[1]: "width"})
    example = example_input(2, example_hw[0], example_hw[1], input_dtype)  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, mature Resize/align_corners support
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_axes={INPUT_NAME: in_axes, output_name: out_axes},
            do_constant_folding=True,
        )
    for item in caught:  # the exporter's own deprecation notices are expected; anything else may matter
        if not issubclass(item.category, DeprecationWarning):
            _log.warning("torch.onnx.export: %s", item.message)


def _stride(options: OnnxExportOptions, teacher_meta: Any, window: tuple[int, int]) -> tuple[int, int]:
    """The teacher's stride for its own window (or any size, if dynamic); 2/3 of each side of another window."""
    if not options.dynamic_hw and window != (teacher_meta.window, teacher_meta.window):
        return default_stride(window[0]), default_stride(window[1])
    return teacher_meta.stride, teacher_meta.stride


def _meta(
    options: OnnxExportOptions, teacher_meta: Any, window: tuple[int, int], stride: tuple[int, int], num_classes: int
) -> dict[str, Any]:
    import onnxruntime

    output_kind = options.resolved_output_kind
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
        "output_name": OUTPUT_NAMES[output_kind],
        "output_kind": output_kind,
        "output_dtype": "uint8" if output_kind == "labels" else "float32",
        "window": None if options.dynamic_hw else list(window),
        "stride": list(stride),
        "eval_protocol": teacher_meta.eval_protocol,
        "precision": options.precision,
        "max_batch": options.resolved_max_batch,
        "source_sha256": teacher_meta.weights_sha256,
        "artifact_sha256": "",
        "opset": options.opset,
        "exporter": "torch.onnx TorchScript (dynamo=False)",
        "versions": {
            "imas": imas_core.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "format_version": 1,
        "stitched": options.stitched,
        "image_size": list(options.image_size) if options.image_size is not None else None,
        "default_window": [teacher_meta.window, teacher_meta.window],
    }


def _wrap(
    options: OnnxExportOptions,
    teacher: torch.nn.Module,
    teacher_meta: Any,
    window: tuple[int, int],
    stride: tuple[int, int],
) -> tuple[torch.nn.Module, tuple[int, int], str]:
    """(module to trace, its example H/W, a note for the stage line): a window model or a stitched one."""
    mean, std, kind = teacher_meta.mean, teacher_meta.std, options.resolved_output_kind
    if options.image_size is None:
        return ExportWrapper(teacher, mean, std, kind), window, ""
    size = (int(options.image_size[0]), int(options.image_size[1]))
    wrapper = StitchedWrapper(
        teacher,
        mean,
        std,
        num_classes=len(teacher_meta.class_names),
        image_size=size,
        window=window,
        stride=stride,
        output_kind=kind,
    )
    windows = len(wrapper.plan.windows)
    plural = "s" * (windows != 1)
    return wrapper, size, f", stitched {size[0]}x{size[1]}: {windows} window{plural} {window[0]}x{window[1]} in-graph"


def export_onnx(options: OnnxExportOptions, on_stage: StageCallback | None = None) -> OnnxExportResult:
    """Export the teacher at `options.teacher` to `options.output` (+ `.json` sidecar); see OnnxExportOptions.

    Raises:
        ArtifactError: the teacher or its sidecar is missing, tampered with or inconsistent.
        ExportError: the export, a graph check or the parity check failed (the output is then not written).
    """
    from imas_train.teacher_artifact import load_teacher

    _validate(options)
    log = StageLog(on_stage)
    teacher, teacher_meta = load_teacher(options.teacher, "cpu")
    num_classes = len(teacher_meta.class_names)
    output_kind = options.resolved_output_kind
    if output_kind == "labels" and num_classes > 256:
        raise ExportError(f"--output-kind labels stores uint8 class ids; this model has {num_classes} classes")
    window = options.window or (teacher_meta.window, teacher_meta.window)
    stride = _stride(options, teacher_meta, window)
    log.done("load", options.teacher, note=f"{num_classes} classes, sha256 verified")
    options.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{options.output.name}.", dir=options.output.parent) as tmp:
        work = Path(tmp)
        current = work / "fp32.onnx"
        wrapper, input_hw, note = _wrap(options, teacher, teacher_meta, window, stride)
        trace(
            wrapper,
            current,
            input_hw,
            output_kind=output_kind,
            input_dtype=options.input_dtype,
            opset=options.opset,
            dynamic_hw=options.dynamic_hw,
        )
        if options.stitched:  # the exporter leaves the output's sizes symbolic; they are static here
            declare_output_shape(current, [None, *([] if output_kind == "labels" else [num_classes]), *input_hw])
        resize_count = check_resize_align_corners(onnx.load(str(current)))
        log.done("export", current, note=f"opset {options.opset}, {resize_count} Resize align_corners{note}")
        if options.simplify:
            simplify_with_ort(current, work / "simplified.onnx")
            current = work / "simplified.onnx"
            log.done("simplify", current, note="onnxruntime basic optimisation")
        if options.precision == "int8":
            calibration, samples = calibration_samples(options, input_hw, teacher_meta.class_names)
            quantize_int8(current, work / "int8.onnx", calibration, options.input_dtype, work)
            current = work / "int8.onnx"
            log.done("int8", current, note=f"calibrated on {len(calibration)} images ({calibration.source})")
        else:
            samples = parity_samples(options, input_hw, teacher_meta.class_names)
        model = onnx.load(str(current))
        if options.precision == "fp16":
            model = convert_to_fp16(model)
        meta = _meta(options, teacher_meta, window, stride, num_classes)
        write_metadata(model, meta)
        set_min_ir_version(model)
        onnx.checker.check_model(model)
        final = work / options.output.name
        onnx.save(model, str(final))
        if options.precision == "fp16":
            log.done("fp16", final, note="float16 compute, float32 I/O")

        min_agreement, max_abs = thresholds(options.precision, options.parity)
        session = ort_session(final, options.parity.provider)
        runner = ort_runner(session, options.input_dtype)
        output = run_batched(runner, samples.images, options.resolved_max_batch)
        reference, reference_kind = teacher_reference(
            teacher,
            teacher_meta.mean,
            teacher_meta.std,
            samples.images,
            num_classes=num_classes,
            stitch=(window, stride) if options.stitched else None,
        )
        report = compare(
            reference,
            output,
            output_kind,
            backend=f"onnxruntime-{options.parity.provider}",
            precision=options.precision,
            source=samples.source,
            min_agreement=min_agreement,
            max_abs_limit=max_abs,
            labels=samples.labels,
            reference_kind=reference_kind,
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
