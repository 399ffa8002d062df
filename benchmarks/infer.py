"""Sliding-window inference of Cityscapes-size images: PyTorch eager vs ONNX Runtime fp32 and INT8 (and GPU runtimes).

Every backend runs the same window plan through `imas_infer.pipeline.run_pipeline` (the `full_tiles` protocol: full
tiles, the last one flush with the border; same window, stride and windows per model call) on the same PNG images,
decoding them and writing label PNGs. Each backend runs in a fresh subprocess, which reports its peak resident set
(VmHWM from /proc/self/status: runtime import, model load and the run; `ru_maxrss` would carry the parent's peak across
fork+exec, so it is only the fallback off Linux). The ONNX models come from `imas_export.export_onnx` (INT8: QDQ,
calibrated on the demo images); the PyTorch column runs the same teacher artifact through `imas_infer`'s torch backend.

Reported per backend: model time per image (the pipeline's model stage, and the model alone on full batches), wall
time and images/s, pipeline overhead = (wall - model) / model, the stage times (decode, preprocess, stitch, write;
reader and writer threads overlap the model), peak RSS, and FLOPs per image = FLOPs per window
(`FlopCounterMode`) x windows in the plan.

    python benchmarks/infer.py                 # CPU default: 512x1024 image, window 385, R-50 at 1/4 width
    python benchmarks/infer.py --full          # 1024x2048, window 769, R-50 os16 (GPU: adds CUDA/TensorRT rows)
    python benchmarks/infer.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

NAME = "infer"


# ---------------------------------------------------------------------------------------------------------------
# Worker: one backend in its own process (no torch import unless the backend itself needs it)


def _status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status in MiB (VmRSS now, VmHWM peak), None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> tuple[float, str]:
    """Peak resident memory of this process. VmHWM is reset by exec; ru_maxrss is not (a subprocess started from
    a parent holding torch would report the parent's peak), so it is only the fallback."""
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"


def model_only(backend: Any, batch: int, window: tuple[int, int], iterations: int) -> list[float]:
    """Seconds per call of the backend alone on one full batch of random windows (after one warm-up call)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(batch, 3, *window)).astype(backend.input_dtype)
    backend.run(x)
    seconds = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        backend.run(x)  # returns host numpy: includes any device sync and copy
        seconds.append(time.perf_counter() - t0)
    return seconds


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    from imas_core.runners import open_backend
    from imas_infer.image_io import InputItem
    from imas_infer.options import RunSettings
    from imas_infer.pipeline import OutputSpec, run_pipeline

    t0 = time.perf_counter()
    backend = open_backend(Path(spec["model"]), backend=spec["backend"], device=spec["device"], threads=spec["threads"])
    load_s = time.perf_counter() - t0
    rss_loaded = _status_mib("VmRSS")
    window, stride = tuple(spec["window"]), tuple(spec["stride"])
    settings = RunSettings("full_tiles", window, stride, spec["batch"], False, True, False)  # type: ignore[arg-type]
    items = [InputItem(Path(p), Path(Path(p).name)) for p in spec["images"]]
    palette = backend.info.palette

    def run(root: Path, chosen: list[InputItem]) -> Any:
        outputs = OutputSpec(root=root, kinds=("labels",), palette=palette)
        return run_pipeline(backend, settings, chosen, outputs, readers=2, writers=2, prefetch=4)

    for i in range(spec["warmup"]):  # untimed: allocations, kernel selection
        run(Path(spec["out"]) / f"warmup{i}", items[i % len(items) : i % len(items) + 1])
    summary = run(Path(spec["out"]) / "timed", items).to_dict()
    if summary["failed"]:
        raise RuntimeError(f"pipeline failures: {summary['failures']}")
    seconds = model_only(backend, spec["batch"], window, spec["model_iters"])
    peak = peak_rss_mib()
    backend.close()
    n = summary["succeeded"]
    windows_per_image = summary["windows"] / n
    model_s = summary["stage_total_s"]["model"]
    return {
        "runtime": backend.runtime,
        "load_s": load_s,
        "images": n,
        "windows_per_image": windows_per_image,
        "model_calls": summary["model_calls"],
        "wall_ms_per_image": 1e3 * summary["wall_s"] / n,
        "images_per_s": summary["images_per_s"],
        "model_ms_per_image": 1e3 * model_s / n,
        "model_only_ms_per_image": 1e3 * float(np.median(seconds)) * windows_per_image / spec["batch"],
        "stage_ms_per_image": summary["stage_ms_per_image"],
        "overhead_of_model": (summary["wall_s"] - model_s) / model_s,
        "overhead_share_of_wall": (summary["wall_s"] - model_s) / summary["wall_s"],
        "latency_ms": summary["latency_ms"],
        "rss_after_load_mib": rss_loaded,
        "peak_rss_mib": peak[0],
        "peak_rss_source": peak[1],
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent: build the artifacts, then one subprocess per backend


def save_teacher_artifact(args: argparse.Namespace, root: Path) -> tuple[Path, Any, int]:
    """A randomly initialised teacher (seeded) whose BN running statistics are re-estimated on demo images.

    With the default running statistics (mean 0, var 1) the activations of a random deep network shrink into float32
    denormals, which run several times slower on x86 CPUs and would make the eager column measure that artifact
    instead of the model. Re-estimated statistics normalise every layer, as training does.
    """
    import torch

    from imas_core.artifacts import TeacherMeta
    from imas_core.constants import IMAGENET_MEAN, IMAGENET_STD
    from imas_core.tiling import default_stride
    from imas_core.typed import to_dict
    from imas_train.models import build_model
    from imas_train.teacher_artifact import save_teacher

    torch.manual_seed(0)
    from report import scaled_model_config

    cfg = scaled_model_config(args)
    model = build_model(cfg)
    recalibrate_bn(model, args.window)
    rng = np.random.default_rng(0)
    meta = TeacherMeta(
        model_config=to_dict(cfg),
        class_names=[f"class{i}" for i in range(args.classes)],
        palette=[[int(v) for v in rng.integers(0, 256, 3)] for _ in range(args.classes)],
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        weights_sha256="",
        window=args.window,
        stride=default_stride(args.window),
        eval_protocol="full_tiles",
        dataset="benchmark",
    )
    path = root / "teacher.safetensors"
    save_teacher(model, path, meta)
    return path, model, meta.stride


def recalibrate_bn(model: Any, window: int, images: int = 4) -> None:
    """Cumulative-average BN statistics over `images` demo windows (train-mode forwards, no grad), then eval()."""
    import torch

    from imas_core.constants import IMAGENET_MEAN, IMAGENET_STD
    from imas_train.data.demo import render

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    batch = np.stack([render("unlabeled", i, 0, window, window)[0] for i in range(images)])
    x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    model.train()
    with torch.no_grad():
        for i in range(0, images, 2):  # two per forward: train-mode BN needs more than one value per channel
            model(x[i : i + 2])
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    model.eval()


def export(
    teacher: Path, out: Path, precision: str, args: argparse.Namespace, output_kind: str = "logits"
) -> tuple[Path | None, str]:
    """ONNX via imas_export; returns (path, note) or (None, reason). Parity gates relaxed: random weights."""
    try:
        from imas_export import OnnxExportOptions, ParityOptions, export_onnx

        t0 = time.perf_counter()
        result = export_onnx(
            OnnxExportOptions(
                teacher=teacher,
                output=out,
                window=(args.window, args.window),
                precision=precision,  # type: ignore[arg-type]
                output_kind=output_kind,  # type: ignore[arg-type]
                max_batch=args.batch,
                parity=ParityOptions(num_images=2, min_agreement=0.0, max_abs_diff=float("inf")),
            )
        )
        agreement = result.parity.agreement
        return out, f"exported in {time.perf_counter() - t0:.0f} s; argmax agreement with torch {100 * agreement:.1f}%"
    except Exception as err:  # a column that cannot be produced says why
        return None, f"n/a: export failed ({type(err).__name__}: {str(err)[:200]})"


def write_images(args: argparse.Namespace, root: Path) -> list[str]:
    """Demo scenes at the benchmark size, as PNG (a realistic decode cost)."""
    from PIL import Image

    from imas_train.data.demo import render

    paths = []
    for i in range(args.images):
        image, _ = render("val", i, 0, args.height, args.width)
        path = root / f"image_{i:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def flops_per_window(model: Any, window: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, window, window))
    return int(counter.get_total_flops())


def backend_plan(args: argparse.Namespace, cuda: bool, trt: bool) -> list[dict[str, Any]]:
    """(label, open_backend name, artifact key, device, precision) of each column."""
    plan = [
        {"label": "torch eager", "backend": "torch", "artifact": "teacher", "device": "cpu", "precision": "fp32"},
        {"label": "ORT CPU", "backend": "ort-cpu", "artifact": "fp32", "device": "cpu", "precision": "fp32"},
        {"label": "ORT CPU INT8", "backend": "ort-cpu", "artifact": "int8", "device": "cpu", "precision": "int8"},
        # prototype: softmax in the graph (--output-kind probs), so the host stitcher skips its numpy softmax
        {
            "label": "ORT CPU probs-out",
            "backend": "ort-cpu",
            "artifact": "fp32-probs",
            "device": "cpu",
            "precision": "fp32",
        },
    ]
    if cuda:
        plan += [
            {"label": "torch eager CUDA", "backend": "torch", "artifact": "teacher", "device": "cuda",
             "precision": "fp32"},
            {"label": "ORT CUDA", "backend": "ort-cuda", "artifact": "fp32", "device": "cuda", "precision": "fp32"},
            {"label": "ORT TensorRT EP fp16", "backend": "ort-trt", "artifact": "fp16", "device": "cuda",
             "precision": "fp16"},
        ]  # fmt: skip
        if trt:
            plan += [
                {"label": "TensorRT fp16", "backend": "tensorrt", "artifact": "engine-fp16", "device": "cuda",
                 "precision": "fp16"},
                {"label": "TensorRT INT8", "backend": "tensorrt", "artifact": "engine-int8", "device": "cuda",
                 "precision": "int8"},
            ]  # fmt: skip
    if args.backends:
        plan = [p for p in plan if p["label"] in args.backends]
    elif args.smoke:  # the prototype row costs an extra export and run; the smoke run checks the product columns
        plan = [p for p in plan if p["artifact"] != "fp32-probs"]
    return plan


def build_engine(onnx: Path | None, out: Path, args: argparse.Namespace) -> tuple[Path | None, str]:
    if onnx is None:
        return None, "n/a: no ONNX to build from"
    try:
        from imas_export import EngineOptions
        from imas_export import build_engine as build

        t0 = time.perf_counter()
        build(EngineOptions(onnx=onnx, output=out, min_batch=1, opt_batch=args.batch, max_batch=args.batch))
        return out, f"built in {time.perf_counter() - t0:.0f} s"
    except Exception as err:
        return None, f"n/a: engine build failed ({type(err).__name__}: {str(err)[:200]})"


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds of every timing; the largest peak memory; the raw rounds kept."""
    first = results[0]
    out: dict[str, Any] = {
        "rounds": results,
        "runtime": first["runtime"],
        "windows_per_image": first["windows_per_image"],
    }
    for key in ("wall_ms_per_image", "images_per_s", "model_ms_per_image", "model_only_ms_per_image",
                "overhead_of_model", "overhead_share_of_wall", "load_s"):  # fmt: skip
        out[key] = float(np.median([r[key] for r in results]))
    out["stage_ms_per_image"] = {
        k: float(np.median([r["stage_ms_per_image"][k] for r in results])) for k in first["stage_ms_per_image"]
    }
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in results)
    out["peak_rss_source"] = first["peak_rss_source"]
    out["rss_after_load_mib"] = float(np.median([r["rss_after_load_mib"] for r in results]))
    return out


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"n/a: worker exited {proc.returncode}: {tail[0][:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    from report import add_common_flags

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--window", type=int, default=385, help="square tile; stride = floor(2/3 window)")
    parser.add_argument("--batch", type=int, default=4, help="windows per model call")
    parser.add_argument("--images", type=int, default=5, help="timed images per backend (plus one warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per backend, round-robin; medians reported")
    parser.add_argument("--model-iters", type=int, default=5, help="timed calls of the model-only measurement")
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101))
    parser.add_argument("--base-width", type=int, default=16, help="64 = the real ResNet width")
    parser.add_argument("--layers", type=int, nargs=4, default=None)
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16))
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--backends", nargs="+", default=None, help="labels of the columns to run (default: all)")
    parser.add_argument("--full", action="store_true", help="Cityscapes: 1024x2048, window 769, R-50 os16")
    parser.add_argument("--keep", type=Path, default=None, help="keep the artifacts and outputs in this folder")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    add_common_flags(parser, NAME)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.full:
        args.height, args.width, args.window, args.base_width, args.layers = 1024, 2048, 769, 64, None
    if args.smoke:
        args.height, args.width, args.window, args.base_width, args.layers = 65, 97, 33, 8, [1, 1, 1, 1]
        args.images, args.model_iters, args.batch, args.rounds = 1, 1, 2, 1
        args.threads = args.threads or 1  # 2 OpenMP threads on a busy 2-core machine run several times slower
    args.warmup = 1 if args.warmup is None else args.warmup  # warm-up images per run (untimed)
    args.rounds = args.repeats or args.rounds  # --repeats is the shared spelling of --rounds
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return measure(args, args.keep)
    with tempfile.TemporaryDirectory(prefix="imas-bench-infer-") as tmp:
        return measure(args, Path(tmp))


def measure(args: argparse.Namespace, workdir: Path) -> int:
    """Build the artifacts in `workdir`, run every backend, print the table and write the JSON."""
    import torch
    from report import format_table, header_lines, write_json

    from imas_core.tiling import plan_windows

    threads = args.threads or os.cpu_count()
    cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        trt = cuda
    except ImportError:
        trt = False
    torch.set_num_threads(threads)
    teacher, model, stride = save_teacher_artifact(args, workdir)
    windows = len(plan_windows(args.height, args.width, args.window, stride, "full_tiles"))
    settings = {
        "image": f"{args.height}x{args.width}",
        "window": args.window,
        "stride": stride,
        "protocol": "full_tiles (last tile flush with the border)",
        "windows_per_image": windows,
        "batch": args.batch,
        "model": f"R-{args.depth} os{args.output_stride} width {args.base_width}/64"
        + (f" layers {tuple(args.layers)}" if args.layers else ""),
        "classes": args.classes,
        "images_timed": args.images,
        "rounds": args.rounds,
        "warmup_images": args.warmup,
        "statistic": "median over rounds (backends round-robin) of per-run figures",
        "threads": threads,
        "outputs": "labels PNG",
        "peak_memory": "peak RSS (VmHWM) of a fresh subprocess per backend: runtime import + model load + run",
        "smoke": args.smoke,
        "load_average_at_start": list(os.getloadavg()),
    }
    print(header_lines(NAME, settings), flush=True)
    gflop = flops_per_window(model, args.window) * windows / 1e9
    del model
    artifacts: dict[str, tuple[Path | None, str]] = {"teacher": (teacher, "teacher.safetensors")}
    plan = backend_plan(args, cuda, trt)
    needed = {p["artifact"] for p in plan}
    for precision in ("fp32", "int8", "fp16"):
        if (
            precision in needed
            or (precision == "fp16" and "engine-fp16" in needed)
            or (precision == "int8" and "engine-int8" in needed)
        ):
            artifacts[precision] = export(teacher, workdir / f"model.{precision}.onnx", precision, args)
            print(f"{precision} ONNX: {artifacts[precision][1]}", flush=True)
    if "fp32-probs" in needed:
        artifacts["fp32-probs"] = export(teacher, workdir / "model.fp32.probs.onnx", "fp32", args, "probs")
        print(f"fp32 probs-output ONNX: {artifacts['fp32-probs'][1]}", flush=True)
    for precision in ("fp16", "int8"):
        if f"engine-{precision}" in needed:
            artifacts[f"engine-{precision}"] = build_engine(
                artifacts[precision][0], workdir / f"model.{precision}.engine", args
            )
    images = write_images(args, workdir)
    runs: dict[str, list[dict[str, Any]]] = {p["label"]: [] for p in plan}
    errors: dict[str, str] = {
        p["label"]: artifacts[p["artifact"]][1] for p in plan if artifacts[p["artifact"]][0] is None
    }
    for round_ in range(args.rounds):  # backends round-robin, order rotated, so drifting load hits all alike
        order = plan[round_ % len(plan) :] + plan[: round_ % len(plan)]
        for p in order:
            if p["label"] in errors:
                continue
            spec = {
                "model": str(artifacts[p["artifact"]][0]), "backend": p["backend"], "device": p["device"],
                "threads": threads, "window": [args.window] * 2, "stride": [stride] * 2, "batch": args.batch,
                "images": images, "out": str(workdir / "out" / p["label"].replace(" ", "_")),
                "model_iters": args.model_iters, "warmup": args.warmup,
            }  # fmt: skip
            try:
                result = run_worker(spec, timeout=3600)
            except subprocess.TimeoutExpired:
                result = {"error": "n/a: timed out"}
            if "error" in result:
                errors[p["label"]] = result["error"]
            else:
                runs[p["label"]].append(result)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    rows = []
    for p in plan:
        row: dict[str, Any] = {**p, "gflop_per_image": gflop}
        if p["label"] in errors:
            row["error"] = errors[p["label"]]
        else:
            row.update(aggregate(runs[p["label"]]))
        rows.append(row)

    torch_row = next((r for r in rows if r["label"] == "torch eager" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            continue
        r["achieved_gflops"] = gflop / (r["model_only_ms_per_image"] / 1e3)
        if torch_row is not None:
            r["model_speedup_vs_torch"] = torch_row["model_ms_per_image"] / r["model_ms_per_image"]
            r["model_only_speedup_vs_torch"] = torch_row["model_only_ms_per_image"] / r["model_only_ms_per_image"]
    table = format_table(
        [
            "backend",
            "model ms/img",
            "model-only ms/img",
            "vs torch",
            "wall ms/img",
            "img/s",
            "overhead / model",
            "decode|pre|stitch|write ms",
            "peak RSS MiB",
            "GFLOP/img",
            "GFLOP/s",
        ],  # fmt: skip
        [
            [r["label"]]
            + (
                ["-"] * 10
                if "error" in r
                else [
                    r["model_ms_per_image"],
                    r["model_only_ms_per_image"],
                    f"{r['model_speedup_vs_torch']:.2f}x" if "model_speedup_vs_torch" in r else "-",
                    r["wall_ms_per_image"],
                    r["images_per_s"],
                    f"{100 * r['overhead_of_model']:.1f}%",
                    "|".join(f"{r['stage_ms_per_image'][s]:.0f}" for s in ("decode", "preprocess", "stitch", "write")),
                    r["peak_rss_mib"],
                    r["gflop_per_image"],
                    r["achieved_gflops"],
                ]
            )  # fmt: skip
            for r in rows
        ],
    )
    print(table)
    for r in rows:
        if "error" in r:
            print(f"{r['label']}: {r['error']}")
        else:
            print(f"{r['label']}: runtime {r['runtime']}; model ms/img per round "
                  + ", ".join(f"{x['model_ms_per_image']:.0f}" for x in r["rounds"]))  # fmt: skip
    notes = [
        "vs torch: PyTorch eager model time / this backend's model time (pipeline model stage), same windows",
        "overhead / model: (wall - model stage) / model stage; decode and write run in threads beside the model",
        "model-only: median call time of backend.run on one full batch x windows per image / batch",
        "random weights: the export parity gates are relaxed (speed only); INT8 calibrated on demo images",
        "CPU timings depend on the load (machine.load_average_1_5_15); compare ratios within one run only",
    ] + [f"{k}: {v[1]}" for k, v in artifacts.items() if k != "teacher"]
    path = write_json(args.json, NAME, settings, rows, notes)
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows if r["device"] == "cpu") else 1


if __name__ == "__main__":
    raise SystemExit(main())
