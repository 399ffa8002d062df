"""`imas-infer --ray` (Ray Data, local cluster) against the single-process pipeline on the same images and model.

Both sides run the same exported ONNX model (a random R-50 DeepLabV3+ at reduced width, from `infer.py`'s
helpers) over the same PNG demo scenes with the same windows, write label PNGs, and are compared byte for byte.
Rounds alternate (single, Ray, single, Ray, ...) so drifting machine load hits both alike; figures are medians.

* single: `imas_infer.infer` in this process, ONNX Runtime with `--threads` intra-op threads, 2 reader and 2 writer
  threads (the defaults).
* Ray: `imas_infer.ray_data.infer_ray` on `ray.init(num_cpus=--ray-cpus)` started once before the rounds; the
  default layout (one actor per CPU left after one for decoding; ONNX Runtime with one thread per actor CPU).
  Its wall time starts after `ray.init` and includes starting the actors and loading the model in each, which the
  single-process figure does not (it starts after the model is loaded); both are listed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

NAME = "ray_infer"


def build_parser() -> argparse.ArgumentParser:
    from report import add_common_flags

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--window", type=int, default=385, help="square tile; stride = floor(2/3 window)")
    parser.add_argument("--batch", type=int, default=4, help="windows per model call")
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101))
    parser.add_argument("--base-width", type=int, default=16, help="64 = the real ResNet width")
    parser.add_argument("--layers", type=int, nargs=4, default=None)
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16))
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--rounds", type=int, default=2, help="single/Ray pairs, alternating; medians reported")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--images-per-call", type=int, default=4, help="images per actor call")
    parser.add_argument("--keep", type=Path, default=None, help="keep the artifacts and outputs in this folder")
    add_common_flags(parser, NAME)
    return parser


def _row(label: str, report: dict[str, Any], extra_s: float = 0.0) -> dict[str, Any]:
    per = report["stage_ms_per_image"]
    return {
        "label": label,
        "images": report["succeeded"],
        "wall_s": report["wall_s"],
        "images_per_s": report["images_per_s"],
        "setup_s": extra_s,
        **{f"{stage}_ms_per_image": per[stage] for stage in ("decode", "preprocess", "model", "stitch", "write")},
        "model_calls": report["model_calls"],
    }


def measure(args: argparse.Namespace, work: Path) -> int:
    import infer as infer_bench  # the sibling benchmark: teacher, export and demo images
    import ray
    from report import format_table, header_lines, median, write_json

    from imas_infer import InferOptions, infer
    from imas_infer.ray_data import RayOptions, infer_ray

    threads = args.threads or 1
    teacher, model, stride = infer_bench.save_teacher_artifact(args, work)
    del model
    onnx, note = infer_bench.export(teacher, work / "model.onnx", "fp32", args)
    if onnx is None:
        print(note, file=sys.stderr)
        return 1
    (work / "in").mkdir(exist_ok=True)
    infer_bench.write_images(args, work / "in")
    settings = {
        "images": args.images,
        "image": f"{args.height}x{args.width}",
        "window": args.window,
        "stride": stride,
        "batch": args.batch,
        "model": f"R-{args.depth} os{args.output_stride} width {args.base_width}/64 (ONNX fp32, ORT CPU)"
        + (f" layers {tuple(args.layers)}" if args.layers else ""),
        "threads": threads,
        "ray_cpus": args.ray_cpus,
        "images_per_call": args.images_per_call,
        "rounds": args.rounds,
        "outputs": "labels PNG",
        "statistic": "median over alternating rounds",
        "smoke": args.smoke,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": list(os.getloadavg()),
    }
    print(header_lines(NAME, settings), flush=True)
    t0 = time.perf_counter()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level="WARNING")
    ray_init_s = time.perf_counter() - t0
    rows: dict[str, list[dict[str, Any]]] = {"single": [], "ray": []}
    loads = []
    try:
        for r in range(args.rounds):
            common = {"model": onnx, "input": str(work / "in"), "threads": threads, "progress": False}
            single = infer(InferOptions(**common, output=work / f"single{r}"))
            rows["single"].append(_row("single process", single.report))
            ray_opts = InferOptions(**{**common, "threads": None}, output=work / f"ray{r}", resume=False)
            ray_run = infer_ray(ray_opts, RayOptions(images_per_call=args.images_per_call))
            rows["ray"].append(_row(f"Ray local ({args.ray_cpus} CPUs)", ray_run.report, ray_init_s))
            rows["ray"][-1]["actors"] = ray_run.report["ray"]["layout"]["actors"]
            loads.append(os.getloadavg()[0])
    finally:
        ray.shutdown()
    equal = (
        all(
            (work / "single0" / "labels" / p.name).read_bytes() == p.read_bytes()
            for p in sorted((work / "ray0" / "labels").glob("*.png"))
        )
        and len(list((work / "ray0" / "labels").glob("*.png"))) == args.images
    )
    results = []
    for rounds in rows.values():
        merged = dict(rounds[0])
        for key in ("wall_s", "images_per_s", *(k for k in merged if k.endswith("_ms_per_image"))):
            merged[key] = median([row[key] for row in rounds])
        merged["rounds_wall_s"] = [row["wall_s"] for row in rounds]
        results.append(merged)
    ratio = results[1]["images_per_s"] / results[0]["images_per_s"]
    headers = ["run", "img/s", "wall s", "decode ms/img", "model ms/img", "stitch ms/img", "write ms/img"]
    table = [
        [
            row["label"],
            row["images_per_s"],
            row["wall_s"],
            row["decode_ms_per_image"],
            row["model_ms_per_image"],
            row["stitch_ms_per_image"],
            row["write_ms_per_image"],
        ]
        for row in results
    ]
    print(format_table(headers, table))
    print(f"Ray / single throughput: {ratio:.2f}x; labels byte-equal: {equal}; ray.init {ray_init_s:.1f} s")
    notes = [
        f"ray.init took {ray_init_s:.1f} s (not in the Ray wall time; actor start and model load are)",
        f"1-minute load average after each round: {[round(v, 2) for v in loads]}",
        "stage ms/img of Ray: decode in Ray tasks, the rest inside the actor (sums over images, as the pipeline's)",
    ]
    summary = {"ratio_ray_over_single": ratio, "labels_byte_equal": equal, "ray_init_s": ray_init_s}
    write_json(args.json, NAME, settings, {"rows": results, **summary}, notes)
    print(f"wrote {args.json}")
    return 0 if equal else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.height, args.width, args.window, args.base_width, args.layers = 65, 97, 33, 8, [1, 1, 1, 1]
        args.images, args.rounds, args.batch = 4, 1, 2
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return measure(args, args.keep)
    with tempfile.TemporaryDirectory(prefix="imas-bench-ray-") as tmp:
        return measure(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
