"""Shared helpers of the benchmark scripts: timing, machine and version info, the stdout table and the JSON file.

Imported by the scripts in this folder as a sibling module (`python benchmarks/<name>.py` puts this folder first on
`sys.path`). Stdlib only, plus torch where a function says so (imported lazily).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
JSON_FORMAT_VERSION = 1


def scaled_model_config(args: argparse.Namespace) -> Any:
    """An R-50 DeepLabV3+ at `base_width/64` of the real width, with the head channels scaled alike."""
    from imas_train.config import ModelConfig

    scale = args.base_width / 64
    return ModelConfig(
        num_classes=args.classes,
        aux_head=True,
        depth=args.depth,
        output_stride=args.output_stride,
        base_width=args.base_width,
        layers=tuple(args.layers) if args.layers else None,
        aspp_channels=max(8, round(256 * scale)),
        decoder_channels=max(8, round(256 * scale)),
        aux_channels=max(8, round(256 * scale)),
        low_level_channels=max(4, round(48 * scale)),
    )


def add_common_flags(parser: argparse.ArgumentParser, name: str) -> None:
    """--json, --threads, --warmup, --repeats and --smoke, the same in every script."""
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / f"{name}.json", help="where to write the results")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations; the median is reported")
    parser.add_argument("--smoke", action="store_true", help="tiniest settings: checks the script runs, times nothing")


def sync_fn(device: str) -> Callable[[], None]:
    """A function that waits for the device's queued work (no-op on the CPU)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    """Wall seconds of `repeats` calls of `fn`, after `warmup` untimed calls, each bracketed by `sync()`."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(
    fns: dict[str, Callable[[], Any]], *, warmup: int, repeats: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Like `time_calls` for several functions, called round-robin so drifting machine load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores, load average, OS and (when torch sees one) the GPU."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
            }
    except ImportError:
        pass
    return info


def versions() -> dict[str, str | None]:
    """Versions of the packages the benchmarks touch (None when one is missing)."""
    out: dict[str, str | None] = {}
    for module in ("imas_train", "torch", "numpy", "onnx", "onnxruntime", "tensorrt"):
        try:
            mod = __import__(module)
            out["imas" if module == "imas_train" else module] = str(getattr(mod, "__version__", "unknown"))
        except ImportError:
            out["imas" if module == "imas_train" else module] = None
    return out


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A plain fixed-width text table (Markdown-compatible pipes, so it pastes into the README)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = [] if title is None else [title, ""]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in body:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def write_json(path: Path, name: str, settings: dict[str, Any], results: Any, notes: Sequence[str] = ()) -> Path:
    """Write the standard result file: name, date, settings, versions, machine, results, notes."""
    payload = {
        "format_version": JSON_FORMAT_VERSION,
        "benchmark": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "versions": versions(),
        "machine": machine_info(),
        "results": results,
        "notes": list(notes),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def header_lines(name: str, settings: dict[str, Any]) -> str:
    """The lines printed above every table: what ran, where and under which load."""
    m = machine_info()
    load = m.get("load_average_1_5_15")
    gpu = m.get("gpu")
    where = f"{m['cpu_model']}, {m['logical_cores']} logical cores"
    if gpu:
        where += f"; GPU {gpu['name']} (cc {gpu['compute_capability']}, CUDA {gpu['cuda']})"
    lines = [
        f"# {name}",
        f"machine: {where}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else f"machine: {where}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v is not None),
        "settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
    ]
    return "\n".join(lines)


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count when asked."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
