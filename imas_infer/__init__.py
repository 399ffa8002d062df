"""Sliding-window batch inference for exported iMAS models (`imas-infer`).

Python API (the CLI is a thin layer over it):

    from imas_infer import InferOptions, infer
    result = infer(InferOptions(model=Path("model.onnx"), input="val/", output=Path("pred/")))
    result.summary.succeeded, result.evaluation, result.report

The ONNX Runtime and TensorRT paths import only numpy, Pillow, `imas_core` and their runtime; torch is imported
only by the torch runner, when it is chosen (docs/style.md §1).

Larger jobs: `InferOptions(shard=(i, n))` keeps a deterministic 1/n of the inputs (`imas_infer.shard`),
`resume=True` skips what the manifest in the output folder records as finished (`imas_infer.manifest`), and
`imas_infer.ray_data.infer_ray(options, RayOptions(...))` runs the same pipeline on Ray Data (the `[ray]` extra).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imas_core import __version__
from imas_core.runners import open_backend
from imas_infer.evaluate import EvalResult, Evaluator, match_ground_truth
from imas_infer.image_io import check_output_folder, discover_inputs
from imas_infer.manifest import Journal, input_size, new_run_id, run_key, select_inputs
from imas_infer.options import InferOptions, RunSettings, resolve_settings
from imas_infer.pipeline import OutputSpec, SyntheticItem, run_pipeline
from imas_infer.report import RunSummary, benchmark_model, model_benchmark_dict, write_report

__all__ = ["InferEvents", "InferOptions", "InferResult", "RunSettings", "__version__", "infer"]


def _ignore(*_: Any) -> None:
    return None


@dataclass
class InferEvents:
    """Callbacks through which a run reports progress (the CLI prints them; the library never prints)."""

    stage: Callable[[str], None] = _ignore  # one line per stage: "model: ...", "inputs: ...", ...
    start: Callable[[int], None] = _ignore  # number of images, before the first one
    image: Callable[[], None] = _ignore  # once per finished image, success or failure
    error: Callable[[str, str], None] = _ignore  # (path, reason) of an image that failed
    notice: Callable[[str], None] = _ignore  # a line worth knowing about the inputs (16-bit images are scaled)


@dataclass
class InferResult:
    summary: RunSummary
    evaluation: EvalResult | None
    report: dict[str, Any]
    class_names: tuple[str, ...] = field(default_factory=tuple)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def infer(options: InferOptions, events: InferEvents | None = None) -> InferResult:
    """Run `imas-infer` as described by `options`.

    Returns:
        The run summary, the evaluation (with `options.gt`) and the report dictionary (also written to
        `options.report` when set).

    Raises:
        InferError / ArtifactError: unusable options, inputs or model (the CLI's exit code 2), including an
            output folder (or report folder) that is not writable, found before the model is loaded. Images that
            cannot be read or written are not errors: they are listed in `summary.failures` (exit code 3).
        RuntimeUnavailable: the backend's runtime (TensorRT, cuda-python, a CUDA provider) or GPU is missing
            (exit code 4).
    """
    options.validate()
    if options.output is not None:
        check_output_folder(options.output)
    if options.report is not None:
        check_output_folder(options.report.parent, "the folder of --report")
    ev = events or InferEvents()
    with open_backend(options.model, backend=options.backend, device=options.device, threads=options.threads) as be:
        ev.stage(f"model: {be.describe()}")
        settings = resolve_settings(options, be.info)
        if options.synthetic is not None:
            count, height, width = options.synthetic
            items: list[Any] = [SyntheticItem(i, height, width) for i in range(count)]
            ev.stage(f"inputs: {count} synthetic {height}x{width} images")
        else:
            assert options.input is not None
            _, items = discover_inputs(options.input)
            ev.stage(f"inputs: {len(items)} images from {options.input}")
        key = run_key(options, settings) if options.output is not None and options.synthetic is None else None
        items, selection = select_inputs(items, options, key, ev.stage)
        evaluator = None
        if options.gt is not None:
            gt_paths = match_ground_truth(items, options.gt, options.gt_suffix)
            evaluator = Evaluator(be.info.num_classes, gt_paths, len(items))
            ev.stage(f"ground truth: {len(gt_paths)} of {len(items)} images matched in {options.gt}")
        ev.stage(settings.describe())
        report: dict[str, Any] = {
            "model": {
                "path": str(be.info.path),
                "backend": be.name,
                "runtime": be.runtime,
                "info": _jsonable(dataclasses.asdict(be.info)),
            },
            "settings": _jsonable(dataclasses.asdict(settings)),
            "options": _jsonable(dataclasses.asdict(options)),
            **selection,
        }
        if key is not None:
            report["model"]["sha256"] = key["model_sha256"]
        if options.benchmark:
            batch, window, seconds = benchmark_model(
                be, settings, iterations=options.benchmark_iters, warmup=options.warmup
            )
            unit = "images" if be.info.stitched else "windows"
            bench = report["benchmark_model"] = model_benchmark_dict(batch, window, seconds, unit)
            ev.stage(
                f"benchmark: model alone {bench['ms_per_batch']['mean']:.1f} ms per batch of {batch} "
                f"{window[0]}x{window[1]} {unit} ({bench[f'{unit}_per_s']:.1f} {unit}/s, "
                f"{len(seconds)} iterations after {options.warmup} warm-up)"
            )
        outputs = OutputSpec(options.output, tuple(options.save), be.info.palette, options.overlay_alpha)
        ev.start(len(items))
        journal = Journal(options.output, key, new_run_id(), options.save) if key is not None else None
        summary = run_pipeline(
            be,
            settings,
            items,
            outputs,
            evaluator=evaluator,
            readers=options.readers,
            writers=options.writers,
            prefetch=options.prefetch,
            on_image=ev.image,
            on_error=ev.error,
            on_notice=ev.notice,
            exif_orientation=options.exif_orientation,
            on_written=(lambda item: journal.record(item.rel, input_size(item))) if journal is not None else None,
        )
        if journal is not None:
            journal.close()
        class_names = be.info.class_names
    report.update(summary.to_dict())
    evaluation = evaluator.result() if evaluator is not None else None
    if evaluation is not None:
        report["evaluation"] = evaluation.to_dict(class_names)
    if options.report is not None:
        write_report(options.report, report)
    return InferResult(summary, evaluation, report, class_names)
