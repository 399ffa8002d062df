"""`imas-export onnx|trt|verify`: flags -> option dataclasses -> the same functions as the Python API.

Exit codes (`imas_core.errors`): 0 success; 2 an error explained in one line (bad command line, bad file, failed
check, parity below threshold); 4 TensorRT or a CUDA GPU is missing (the message carries the trtexec command).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import imas_export
from imas_core.errors import EXIT_INTERRUPTED, ImasError, exit_code
from imas_export.options import EngineOptions, OnnxExportOptions, ParityOptions, VerifyOptions
from imas_export.stages import Stage

EPILOG = "exit codes: 0 ok, 2 error (incl. bad usage and parity below threshold), 4 TensorRT/CUDA not available"


def _pair(name: str) -> dict[str, Any]:
    return {"nargs": 2, "type": int, "metavar": ("H", "W"), "help": f"{name} (height width)"}


def _add_parity_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parity check")
    g.add_argument("--images", type=Path, help="folder of real images (default: demo validation images)")
    g.add_argument("--labels", type=Path, help="ground-truth PNGs named <image stem>.png: adds mIoU")
    g.add_argument("-n", "--num-images", type=int, default=8, help="images compared (default 8; int8: held-out images)")
    g.add_argument("--min-agreement", type=float, help="argmax agreement threshold (fp32 .999, fp16 .99, int8 .95)")
    g.add_argument("--max-abs-diff", type=float, help="max-abs output difference threshold (fp32 default 1e-2)")
    g.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime provider (default cpu)")


def _parity(args: argparse.Namespace) -> ParityOptions:
    return ParityOptions(
        images_dir=args.images,
        labels_dir=args.labels,
        num_images=args.num_images,
        min_agreement=args.min_agreement,
        max_abs_diff=args.max_abs_diff,
        provider=args.provider,
    )


def add_onnx_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("onnx", help="teacher.safetensors -> model.onnx (+ .json), parity-checked", epilog=EPILOG)
    p.add_argument("--teacher", type=Path, required=True, help="teacher.safetensors (teacher.json beside it)")
    p.add_argument("--output", type=Path, required=True, help="model.onnx to write")
    p.add_argument("--window", **_pair("fixed input size; default: the teacher's validation window"))
    p.add_argument("--dynamic-hw", action="store_true", help="dynamic height/width as well as batch")
    p.add_argument(
        "--image-size",
        **_pair(
            "stitched model: whole images of this static size in, the full_tiles sliding window run "
            "inside the graph, final labels/probabilities out"
        ),
    )
    p.add_argument("--input-dtype", choices=("float32", "uint8"), default="float32")
    p.add_argument(
        "--output-kind", choices=("logits", "probs", "labels"), help="default: labels if stitched, else logits"
    )
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    p.add_argument("--calib-dir", type=Path, help="int8 calibration images (300+ recommended)")
    p.add_argument(
        "--eval-dir", type=Path, help="int8 held-out images (default: --images, else the last 20%% of --calib-dir)"
    )
    p.add_argument("--calib-images", type=int, default=500, help="int8: read at most this many (default 500)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17: TensorRT 8.6+, ORT 1.13+)")
    p.add_argument("--simplify", action="store_true", help="ONNX Runtime offline basic graph optimisation")
    p.add_argument(
        "--max-batch",
        type=int,
        help="declared maximum batch, dynamic in the ONNX (default 8 windows; stitched 2 images)",
    )
    _add_parity_flags(p)
    p.set_defaults(run=_run_onnx)


def add_trt_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("trt", help="model.onnx -> TensorRT engine (+ .json), strongly typed", epilog=EPILOG)
    p.add_argument("--onnx", type=Path, required=True, help="model.onnx (its .json sidecar beside it)")
    p.add_argument("--output", type=Path, required=True, help="engine to write, e.g. model.fp16.engine")
    batch = "profile batch in windows, or in whole images for a stitched ONNX"
    p.add_argument("--min-batch", type=int, help=f"{batch} (default 1)")
    p.add_argument("--opt-batch", type=int, help=f"{batch} (default 4; stitched 1)")
    p.add_argument("--max-batch", type=int, help=f"{batch} (default 8; stitched 2)")
    p.add_argument("--min-hw", **_pair("dynamic-HW ONNX: smallest input"))
    p.add_argument("--opt-hw", **_pair("dynamic-HW ONNX: input size to optimise for"))
    p.add_argument("--max-hw", **_pair("dynamic-HW ONNX: largest input"))
    p.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace limit (default 4)")
    p.add_argument("--timing-cache", type=Path, help="timing cache file (default: timing.cache beside the engine)")
    p.add_argument("--version-compatible", action="store_true", help="runs on later TensorRT of the same major")
    p.add_argument("--hardware-compat", choices=("none", "ampere+", "same-cc"), default="none")
    p.set_defaults(run=_run_trt)


def add_verify_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("verify", help="PyTorch vs ONNX Runtime vs TensorRT on the same images", epilog=EPILOG)
    p.add_argument("--teacher", type=Path, required=True, help="teacher.safetensors the model was exported from")
    p.add_argument("--onnx", type=Path, required=True, help="model.onnx")
    p.add_argument("--engine", type=Path, help="TensorRT engine (checked only where TensorRT and a GPU exist)")
    _add_parity_flags(p)
    p.set_defaults(run=_run_verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imas-export", description=__doc__.split("\n")[0], epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{onnx,trt,verify}")
    add_onnx_parser(subparsers)
    add_trt_parser(subparsers)
    add_verify_parser(subparsers)
    return parser


def _print_stage(stage: Stage) -> None:
    print(stage.line(), flush=True)


def _run_onnx(args: argparse.Namespace) -> None:
    options = OnnxExportOptions(
        teacher=args.teacher,
        output=args.output,
        window=tuple(args.window) if args.window else None,
        dynamic_hw=args.dynamic_hw,
        image_size=tuple(args.image_size) if args.image_size else None,
        input_dtype=args.input_dtype,
        output_kind=args.output_kind,
        precision=args.precision,
        calib_dir=args.calib_dir,
        eval_dir=args.eval_dir,
        calib_images=args.calib_images,
        opset=args.opset,
        simplify=args.simplify,
        max_batch=args.max_batch,
        parity=_parity(args),
    )
    result = imas_export.export_onnx(options, on_stage=_print_stage)
    engine = result.path.with_suffix(".engine")
    size = _benchmark_size(result.meta)
    print("next:")
    print(f"  imas-export verify --teacher {options.teacher} --onnx {result.path}")
    print(f"  imas-export trt --onnx {result.path} --output {engine} --max-batch {result.meta.max_batch}")
    print(f"  imas-infer --model {result.path} --input IMAGES --output OUT")
    print(f"  imas-infer --model {result.path} --benchmark --synthetic 8 {size}")
    print("  python benchmarks/infer.py  # every backend and precision on this machine")


def _benchmark_size(meta: Any) -> str:
    """HxW of the suggested synthetic benchmark: a stitched model's image size, else a Cityscapes frame."""
    if meta.stitched and meta.image_size:
        return f"{meta.image_size[0]}x{meta.image_size[1]}"
    return "1024x2048"


def _run_trt(args: argparse.Namespace) -> None:
    options = EngineOptions(
        onnx=args.onnx,
        output=args.output,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        min_hw=tuple(args.min_hw) if args.min_hw else None,
        opt_hw=tuple(args.opt_hw) if args.opt_hw else None,
        max_hw=tuple(args.max_hw) if args.max_hw else None,
        workspace_gb=args.workspace_gb,
        timing_cache=args.timing_cache,
        version_compatible=args.version_compatible,
        hardware_compat=args.hardware_compat,
    )
    result = imas_export.build_engine(options, on_stage=_print_stage)
    print(f"trtexec equivalent: {result.trtexec}")
    print("next:")
    print(f"  imas-export verify --teacher TEACHER.safetensors --onnx {options.onnx} --engine {result.path}")
    print(f"  imas-infer --model {result.path} --input IMAGES --output OUT")
    print(f"  imas-infer --model {result.path} --benchmark --synthetic 8 {_benchmark_size(result.meta)}")


def _run_verify(args: argparse.Namespace) -> None:
    options = VerifyOptions(teacher=args.teacher, onnx=args.onnx, engine=args.engine, parity=_parity(args))
    imas_export.verify(options, on_stage=_print_stage)
    print("verify: every backend that ran is within its thresholds")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("imas_export")  # library warnings (e.g. few calibration images) reach the user
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("imas-export: %(levelname)s: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        args.run(args)
    except ImasError as err:
        print(f"imas-export: error: {err}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt:
        print("imas-export: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return 0
