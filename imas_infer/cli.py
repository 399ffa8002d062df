"""`imas-infer`: command-line front end of `imas_infer.infer`.

Exit codes (`imas_core.errors`): 0 every image processed; 2 unusable arguments, inputs or model (argparse errors
too); 3 some images failed (each reported on stderr, the rest written); 4 the backend's runtime or GPU is missing;
130 interrupted.

`--protocol fast` is the deprecated spelling of `--protocol full_tiles`: it is still accepted, with one warning line
on stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imas_core.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, ImasError, exit_code
from imas_core.tiling import WINDOW_PROTOCOLS
from imas_infer.options import BACKENDS, PROTOCOL_ALIASES, SAVE_KINDS, InferOptions

EPILOG = (
    "exit codes: 0 ok, 2 unusable arguments, inputs or model, 3 some images failed, "
    "4 the backend's runtime or GPU is missing, 130 interrupted"
)


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:[xX,](\d+))?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    h = int(match.group(1))
    return h, int(match.group(2) or h)


def _protocol(text: str) -> str:
    """A --protocol value; a deprecated alias is mapped to its new name with one warning line on stderr."""
    new = PROTOCOL_ALIASES.get(text)
    if new is None:
        return text  # argparse checks it against the choices
    print(f"imas-infer: warning: --protocol {text} is deprecated, use --protocol {new}", file=sys.stderr)
    return new


def _save(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    bad = [k for k in kinds if k not in SAVE_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown output kind(s) {', '.join(bad) or '(none)'}; choose from {', '.join(SAVE_KINDS)}"
        )
    return kinds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imas-infer",
        description="Sliding-window semantic segmentation of images "
        "with an exported iMAS model (ONNX, TensorRT engine or teacher artifact).",
        epilog=EPILOG,
    )
    p.add_argument("--model", type=Path, required=True, help="model.onnx, *.engine/*.plan, or teacher.safetensors")
    p.add_argument("--input", help="image file, directory (recursive), glob, or .txt list of paths")
    p.add_argument("--output", type=Path, help="output root; one sub-folder per --save kind, input tree mirrored")
    p.add_argument("--backend", choices=BACKENDS, help="override the backend chosen from the model file")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the backend's)")
    p.add_argument(
        "--no-exif-orientation", dest="exif_orientation", action="store_false",
        help="ignore the EXIF orientation tag of inputs (default: applied, so outputs match what a viewer shows)",
    )  # fmt: skip
    g = p.add_argument_group("windows")
    g.add_argument(
        "--protocol",
        type=_protocol,
        choices=WINDOW_PROTOCOLS,
        default="full_tiles",
        help="full_tiles (default): full windows, the last one flush with the border, overlaps averaged "
        "(static-shape friendly; 'fast' is a deprecated alias); imas: the reference "
        "(769/512, truncated edge windows, summed softmax; needs a dynamic-size model)",
    )
    g.add_argument("--window", type=_size, help="window H[xW] (default: the model's)")
    g.add_argument("--stride", type=_size, help="stride H[xW] (default: the sidecar's)")
    g.add_argument("--batch", type=int, help="windows per model call (default: the sidecar's max batch)")
    g.add_argument("--whole-image", action="store_true", help="one window per image")
    g.add_argument("--flip", action="store_true", help="horizontal-flip test-time augmentation")
    o = p.add_argument_group("outputs")
    o.add_argument(
        "--save", type=_save, default=("labels",), help=f"comma list of {', '.join(SAVE_KINDS)} (default: labels)"
    )
    o.add_argument("--overlay-alpha", type=float, default=0.5, help="colour weight of overlays (default 0.5)")
    o.add_argument("--gt", type=Path, help="ground-truth label folder: report mIoU")
    o.add_argument("--gt-suffix", help="GT name = input stem + suffix (default .png; Cityscapes names automatic)")
    o.add_argument("--report", type=Path, help="write a JSON report (timings, failures, mIoU)")
    r = p.add_argument_group("runtime")
    r.add_argument(
        "--threads",
        type=int,
        help="intra-op threads of ONNX Runtime / torch (default: ONNX Runtime's own; "
        "torch on the CPU: the cores minus one, at least 1)",
    )
    r.add_argument("--readers", type=int, default=2, help="decoding threads (default 2)")
    r.add_argument("--writers", type=int, default=2, help="writing threads (default 2)")
    r.add_argument("--prefetch", type=int, default=8, help="decoded images queued ahead (default 8)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    b = p.add_argument_group("benchmark")
    b.add_argument("--benchmark", action="store_true", help="time the model alone, then the full pipeline")
    b.add_argument("--iters", type=int, default=20, help="timed model-only iterations (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="warm-up iterations (default 3)")
    b.add_argument("--synthetic", nargs=2, metavar=("N", "HxW"), help="benchmark on N random HxW images")
    j = p.add_argument_group("large jobs (README: Inference on a Ray cluster)")
    j.add_argument(
        "--shard", type=_shard, metavar="I/N",
        help="process only shard I of N (0 <= I < N), a deterministic split by input path: one per Slurm array "
        "task or Kubernetes indexed job; implies --resume",
    )  # fmt: skip
    j.add_argument(
        "--resume", action=argparse.BooleanOptionalAction, default=None,
        help="skip inputs the manifest in --output records as finished with this model and these settings "
        "(default: on with --shard and --ray, off otherwise)",
    )  # fmt: skip
    j.add_argument(
        "--ray", nargs="?", const="", metavar="ADDRESS",
        help="run on Ray Data: a running cluster's address (auto, ray://host:10001), or none for RAY_ADDRESS or a "
        "new local cluster; --input may then be a URI (s3://, gs://, file://)",
    )  # fmt: skip
    j.add_argument("--ray-actors", type=int, help="segmentation actors (default: one per GPU, else per CPU group)")
    j.add_argument("--ray-gpus-per-actor", type=float, help="GPUs per actor (default: 1 if the cluster has GPUs)")
    j.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="CPUs per actor (default 1)")
    j.add_argument("--ray-images-per-call", type=int, default=8, help="images per actor call (default 8)")
    j.add_argument("--ray-decode-cpus", type=float, default=1.0, help="CPUs per decoding task (default 1)")
    j.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray cluster started when no address is given")
    return p


def _shard(text: str) -> tuple[int, int]:
    from imas_core.errors import InferError
    from imas_infer.shard import parse_shard

    try:
        return parse_shard(text)
    except InferError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def options_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> InferOptions:
    synthetic = None
    if args.synthetic is not None:
        count, size = args.synthetic
        if not count.isdigit():
            parser.error(f"--synthetic N HxW: N must be an integer, got {count!r}")
        try:
            synthetic = (int(count), *_size(size))
        except argparse.ArgumentTypeError as err:
            parser.error(f"--synthetic N HxW: {err}")
    return InferOptions(
        model=args.model,
        input=args.input,
        output=args.output,
        backend=args.backend,
        device=args.device,
        protocol=args.protocol,
        window=args.window,
        stride=args.stride,
        batch=args.batch,
        whole_image=args.whole_image,
        flip=args.flip,
        save=args.save,
        gt=args.gt,
        gt_suffix=args.gt_suffix,
        exif_orientation=args.exif_orientation,
        threads=args.threads,
        readers=args.readers,
        writers=args.writers,
        prefetch=args.prefetch,
        overlay_alpha=args.overlay_alpha,
        report=args.report,
        benchmark=args.benchmark,
        benchmark_iters=args.iters,
        warmup=args.warmup,
        synthetic=synthetic,  # type: ignore[arg-type]
        progress=not args.no_progress,
        shard=args.shard,
        resume=args.resume,
    )


class _Console:
    """Prints stage lines to stdout, errors to stderr, and drives an optional tqdm bar."""

    def __init__(self, progress: bool) -> None:
        self.progress, self.bar = progress, None

    def stage(self, line: str) -> None:
        print(line, flush=True)

    def start(self, total: int) -> None:
        if not self.progress:
            return
        try:
            from tqdm import tqdm  # optional and light; no bar without it
        except ImportError:
            return
        self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, disable=None)

    def image(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def error(self, path: str, reason: str) -> None:
        self._stderr(f"imas-infer: skipped {path}: {reason}")

    def notice(self, line: str) -> None:
        self._stderr(f"imas-infer: note: {line}")

    def _stderr(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv: Sequence[str] | None = None) -> int:
    from imas_infer import InferEvents, infer

    parser = build_parser()
    args = parser.parse_args(argv)
    options = options_from_args(args, parser)
    console = _Console(options.progress)
    events = InferEvents(
        stage=console.stage, start=console.start, image=console.image, error=console.error, notice=console.notice
    )
    try:
        if args.ray is not None:
            from imas_infer.ray_data import RayOptions, infer_ray

            ray_options = RayOptions(
                address=args.ray or None,
                actors=args.ray_actors,
                gpus_per_actor=args.ray_gpus_per_actor,
                cpus_per_actor=args.ray_cpus_per_actor,
                images_per_call=args.ray_images_per_call,
                decode_cpus=args.ray_decode_cpus,
                num_cpus=args.ray_num_cpus,
            )
            result = infer_ray(options, ray_options, events)
        else:
            result = infer(options, events)
    except ImasError as err:
        console.close()
        print(f"imas-infer: error: {err}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt:
        console.close()
        print("imas-infer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    console.close()
    _print_summary(result, options)
    return EXIT_PARTIAL if result.summary.failures else EXIT_OK


def _print_summary(result: Any, options: InferOptions) -> None:
    for line in result.summary.lines():
        print(line)
    if result.evaluation is not None:
        ev = result.evaluation
        print(result.evaluation.table(result.class_names))
        missing = f"; {ev.missing} input(s) had no ground truth" if ev.missing else ""
        print(f"mIoU: {100 * ev.miou:.2f}% over {ev.images} images{missing}")
    if options.output is not None:
        print(f"outputs: {options.output} ({', '.join(options.save)})")
    if result.summary.failures and result.report.get("manifest", {}).get("resume"):
        print("retry: run the same command again; the finished images are skipped (--resume)")
    if options.report is not None:
        print(f"report: {options.report}")
