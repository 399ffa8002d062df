"""CPU thread settings: training iterations/s of the demo, alone and beside a busy process, per thread setting.

What it answers: which torch intra-op thread count `imas_train.threads.default_cpu_threads` should choose. On a
2-core machine, `accelerate launch --cpu --num_processes 1` gives torch 2 threads (Accelerate sets
OMP_NUM_THREADS to the physical cores per process), and beside one other CPU-bound process the demo training fell
from about 8 to 0.3-0.6 iterations/s: OpenMP threads meet at a barrier after every parallel region, so every
operator waits for the thread that was descheduled.

Training rows. Each setting is a fresh process training configs/demo.yaml (as shipped, but iMAS from the first
iteration: `imas.sup_only_epochs=0`; TensorBoard, easiness CSVs and mid-run checkpoints off; 8 val images for the
final evaluation, which is not timed). The process times each iteration (the progress bar's update), and the
figure is `--iters` iterations / their seconds, after `--warmup` untimed iterations. Settings:
* plain `python` process (as `python -m imas_train`): `run.cpu_threads` = 1, cores - 1, cores (torch's own count),
  and unset (the default policy), each with OMP_WAIT_POLICY unset and `PASSIVE` (spinning OpenMP threads yield
  the core while they wait);
* `accelerate launch` (no flags; it sets OMP_NUM_THREADS=1) and `accelerate launch --cpu --num_processes 1`, each
  keeping the launcher's thread count ("launcher": `run.cpu_threads` set to what the process started with, the
  behaviour before the policy existed) and with the default policy.
Every setting runs ALONE and UNDER LOAD: `--load-procs` busy-loop processes (default 1, `python -c "while True:
pass"`, not pinned to a core), started before the training process and killed after it. One busy process is the
situation measured above (another job on the machine); on a 2-core machine it takes one core of two. The
training processes run without OMP_NUM_THREADS in their environment, as a user's shell has it.

Inference rows (`--infer`): `imas-infer --backend torch` on `--infer-images` demo scenes (`imas-train
demo-scenes`, `--infer-size`, default 384x512) with the teacher of one of the trainings above, `--threads` 1,
cores and unset (the default policy), alone and under load; images/s and the model stage's ms per image from its
`--report` (the speed does not depend on how well the teacher is trained).

Rows run one after another (settings in order, each alone then under load), `--repeats` rounds; the median per
setting is reported. The machine's load average is printed in the header: compare rows of one run only. A run
takes tens of minutes on 2 cores, most of it in the slow settings under load (`--iters` shortens it;
`--threads N` tries that count only, beside the default policy; `--no-launchers` skips the launcher rows).

    python benchmarks/threads.py                 # every training setting: 20 training processes on 2 cores
    python benchmarks/threads.py --infer         # and the inference rows
    python benchmarks/threads.py --smoke         # one setting, a few iterations, alone and under load (--infer: alone)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "threads"
ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
BUSY_LOOP = "while True:\n    pass\n"
LAUNCHERS = {
    "python": [],
    "accelerate launch": ["-m", "accelerate.commands.launch"],
    "accelerate launch --cpu --num_processes 1": ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"],
}


# ---------------------------------------------------------------------------------------------------------------
# Worker: one training in this process, timed per iteration


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the demo as `spec` says and time its iterations; returns the figures (printed as the last line)."""
    import torch
    from tqdm.auto import tqdm

    import imas_train.train
    from imas_train.config import load_config

    started_with = torch.get_num_threads()  # what the launcher and the environment gave this process
    threads = spec["threads"]
    overrides = list(spec["overrides"])
    if threads == "launcher":
        overrides.append(f"run.cpu_threads={started_with}")
    elif threads != "default":
        overrides.append(f"run.cpu_threads={int(threads)}")
    stamps: list[float] = []
    during: list[int] = []

    class TimedBar(tqdm):  # the loop calls update(1) once per iteration
        def update(self, n: float | None = 1) -> bool | None:
            stamps.append(time.perf_counter())
            if not during:
                during.append(torch.get_num_threads())
            return super().update(n)

    imas_train.train.tqdm = TimedBar  # type: ignore[attr-defined]  (this process only)
    imas_train.train.train(load_config(spec["config"], overrides))
    warmup, iters = spec["warmup"], spec["iters"]
    if len(stamps) < warmup + iters or warmup < 1:
        raise RuntimeError(f"{len(stamps)} iterations timed, expected {warmup + iters} (warm-up >= 1)")
    seconds = stamps[warmup + iters - 1] - stamps[warmup - 1]
    return {
        "it_per_s": iters / seconds,
        "timed_s": seconds,
        "torch_threads": during[0],
        "started_with_threads": started_with,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"),
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent: the settings, the competing load, the table


class BusyLoad:
    """`count` CPU-bound busy-loop processes for the duration of a `with` block (killed by their own PIDs)."""

    def __init__(self, count: int) -> None:
        self.count, self.procs = count, []

    def __enter__(self) -> BusyLoad:
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(self.count)]
        time.sleep(0.5 if self.procs else 0)  # running before the measured process starts
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs = []


def _env(wait_policy: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    return env


def run_training(setting: dict[str, Any], args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """One training process of `setting` (its launcher, threads, wait policy); the worker's figures or an error."""
    overrides = [
        f"run.output_dir={run_dir}", f"optim.max_iters={args.warmup + args.iters}", "imas.sup_only_epochs=0",
        "run.tensorboard=false", "run.easiness_csv=false", "run.checkpoint_every=1000000", "run.log_every=1000",
        "data.demo.num_val=8", *args.overrides,
    ]  # fmt: skip
    spec = {"config": str(DEMO_CONFIG), "overrides": overrides, "threads": setting["threads"],
            "warmup": args.warmup, "iters": args.iters}  # fmt: skip
    cmd = [sys.executable, *LAUNCHERS[setting["launcher"]], str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=_env(setting["wait"]))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exited {proc.returncode}: {tail[0][:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_inference(threads: int | None, args: argparse.Namespace, teacher: Path, scenes: Path, out: Path) -> dict:
    """`imas-infer --backend torch` over the scenes; images/s and the model stage per image from its report."""
    report = out / "report.json"
    cmd = [sys.executable, "-m", "imas_infer", "--model", str(teacher), "--backend", "torch", "--device", "cpu",
           "--input", str(scenes / "images"), "--output", str(out), "--save", "labels",
           "--report", str(report)]  # fmt: skip
    if threads is not None:
        cmd += ["--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=_env(None))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exited {proc.returncode}: {tail[0][:300]}"}
    data = json.loads(report.read_text())
    return {"images_per_s": data["images_per_s"], "model_ms_per_image": data["stage_ms_per_image"]["model"],
            "wall_s": data["wall_s"], "runtime": data["model"]["runtime"]}  # fmt: skip


def training_settings(args: argparse.Namespace, cores: int) -> list[dict[str, Any]]:
    """The settings in run order: label, launcher, threads (a count, "default" or "launcher"), wait policy."""
    if args.smoke:
        return [{"launcher": "python", "threads": 1, "wait": None}]
    counts = [args.threads] if args.threads else sorted({1, max(1, cores - 1), cores})
    settings = [
        {"launcher": "python", "threads": t, "wait": w} for w in (None, "PASSIVE") for t in [*counts, "default"]
    ]
    if not args.no_launchers:
        settings += [{"launcher": launcher, "threads": t, "wait": None}
                     for launcher in list(LAUNCHERS)[1:] for t in ("launcher", "default")]  # fmt: skip
    return settings


def _median(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if "error" not in r]
    return float(statistics.median(values)) if values else None


def build_parser() -> argparse.ArgumentParser:
    from report import add_common_flags

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=60, help="timed iterations per training (default 60)")
    parser.add_argument("--load-procs", type=int, default=1, help="busy-loop processes of the loaded runs (default 1)")
    parser.add_argument("--no-launchers", action="store_true", help="skip the two `accelerate launch` forms")
    parser.add_argument("--infer", action="store_true", help="also time imas-infer --backend torch")
    parser.add_argument("--infer-images", type=int, default=64, help="demo scenes for --infer (default 64)")
    parser.add_argument("--infer-size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process before it is abandoned")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every training (e.g. data.batch_size=2)")  # fmt: skip
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders and outputs in this folder")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    add_common_flags(parser, NAME)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.smoke:  # one setting, alone and under load, a few iterations of shrunken scenes
        args.iters, args.warmup, args.repeats = 3, 1, 1
        args.infer_images, args.infer_size = 2, (96, 128)
        args.overrides = ["data.demo.height=48", "data.demo.width=64", "data.crop_size=33", "eval.window=64",
                          *args.overrides]  # fmt: skip
    args.warmup = 10 if args.warmup is None else args.warmup
    args.repeats = args.repeats or 1
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return measure(args, args.keep)
    with tempfile.TemporaryDirectory(prefix="imas-bench-threads-") as tmp:
        return measure(args, Path(tmp))


def measure(args: argparse.Namespace, workdir: Path) -> int:
    """Run every setting alone and under load, print the tables and write the JSON."""
    from report import format_table, header_lines, write_json

    from imas_train.threads import available_cores, default_cpu_threads

    cores = available_cores()
    settings = {
        "config": "configs/demo.yaml, imas.sup_only_epochs=0, 8 val images, no TensorBoard/CSV/mid-run checkpoints",
        "overrides": args.overrides,
        "timed_iterations": args.iters,
        "warmup_iterations": args.warmup,
        "repeats": args.repeats,
        "cores": cores,
        "default_policy_threads": default_cpu_threads(1),
        "load": f"{args.load_procs} busy-loop process(es) (python while True: pass), not pinned",
        "environment_without": "OMP_NUM_THREADS, OMP_WAIT_POLICY, MKL_NUM_THREADS (set per setting)",
        "parent_omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "infer": f"{args.infer_images} scenes {args.infer_size[0]}x{args.infer_size[1]}" if args.infer else None,
        "smoke": args.smoke,
        "load_average_at_start": list(os.getloadavg()),
    }
    print(header_lines(NAME, settings), flush=True)
    plan = training_settings(args, cores)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for round_ in range(args.repeats):
        for i, setting in enumerate(plan):
            for load in ("alone", "load"):
                run_dir = workdir / f"run-{i}-{load}"
                shutil.rmtree(run_dir, ignore_errors=True)
                with BusyLoad(args.load_procs if load == "load" else 0):
                    result = run_training(setting, args, run_dir)
                runs.setdefault((i, load), []).append(result)
                figure = result.get("error") or f"{result['it_per_s']:.2f} it/s"
                print(f"round {round_ + 1}: {setting['launcher']}, threads {setting['threads']}, "
                      f"OMP_WAIT_POLICY {setting['wait'] or '-'}, {load}: {figure}", flush=True)  # fmt: skip
    rows = []
    for i, setting in enumerate(plan):
        row: dict[str, Any] = {"kind": "train", **setting, "wait": setting["wait"] or "unset"}
        for load in ("alone", "load"):
            results = runs[(i, load)]
            good = [r for r in results if "error" not in r]
            row[f"it_per_s_{load}"] = _median(results, "it_per_s")
            row[f"torch_threads_{load}"] = good[0]["torch_threads"] if good else None
            row[f"omp_num_threads_env_{load}"] = good[0]["omp_num_threads_env"] if good else None
            row[f"errors_{load}"] = [r["error"] for r in results if "error" in r]
        alone, loaded = row["it_per_s_alone"], row["it_per_s_load"]
        row["load_over_alone"] = loaded / alone if alone and loaded else None
        rows.append(row)
    print(format_table(
        ["launch", "run.cpu_threads", "torch threads", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "it/s alone",
         "it/s under load", "load / alone"],
        [[r["launcher"], r["threads"], r["torch_threads_alone"] or "-", r["wait"],
          r["omp_num_threads_env_alone"] or "-", r["it_per_s_alone"] or "-", r["it_per_s_load"] or "-",
          f"{r['load_over_alone']:.2f}" if r["load_over_alone"] else "-"] for r in rows],
        title="training (demo, iterations/s; median of the rounds)",
    ), flush=True)  # fmt: skip
    if args.infer:
        rows += measure_inference(args, workdir, cores)
    for r in rows:
        for load in ("alone", "load"):
            for error in r.get(f"errors_{load}", []):
                print(f"{r['kind']} {r.get('launcher', '')} threads {r['threads']} {load}: {error}")
    notes = [
        "it/s: timed iterations / their seconds, from per-iteration timestamps after the warm-up (no eval, no save)",
        "launcher threads: run.cpu_threads = the torch thread count the process started with (before the policy)",
        "default: run.cpu_threads unset, imas_train.threads.default_cpu_threads",
        "load: busy-loop processes started before and killed after each measured process",
        "CPU timings depend on the machine's other load (machine.load_average_1_5_15); compare within one run",
    ]
    path = write_json(args.json, NAME, settings, rows, notes)
    print(f"wrote {path}")
    failed = any(r.get("errors_alone") or r.get("errors_load") for r in rows)
    return 1 if failed else 0


def measure_inference(args: argparse.Namespace, workdir: Path, cores: int) -> list[dict[str, Any]]:
    """Inference rows: a short training for a teacher, demo scenes, then imas-infer per thread setting."""
    from report import format_table

    from imas_train.data.demo import write_scenes

    trained = sorted(workdir.glob("run-*/teacher.safetensors"))  # any finished training's teacher will do
    made: dict[str, Any] = {}
    if trained:
        teacher = trained[0]
    else:
        teacher = workdir / "teacher" / "teacher.safetensors"
        shutil.rmtree(teacher.parent, ignore_errors=True)
        short = argparse.Namespace(**{**vars(args), "warmup": 1, "iters": 1})
        made = run_training({"launcher": "python", "threads": 1, "wait": None}, short, teacher.parent)
    scenes = workdir / "scenes"
    h, w = args.infer_size
    write_scenes(scenes, "val", args.infer_images, seed=0, height=h, width=w)
    rows = []
    for threads in [1, cores, None] if not args.smoke else [1]:
        row: dict[str, Any] = {"kind": "infer", "threads": threads if threads is not None else "default"}
        for load in ("alone",) if args.smoke else ("alone", "load"):  # the smoke run checks the load with training
            results = []
            for _ in range(args.repeats):
                out = workdir / f"pred-{row['threads']}-{load}"
                shutil.rmtree(out, ignore_errors=True)
                if "error" in made:
                    results.append({"error": f"no teacher: {made['error']}"})
                    continue
                with BusyLoad(args.load_procs if load == "load" else 0):
                    results.append(run_inference(threads, args, teacher, scenes, out))
            row[f"images_per_s_{load}"] = _median(results, "images_per_s")
            row[f"model_ms_per_image_{load}"] = _median(results, "model_ms_per_image")
            row[f"runtime_{load}"] = next((r["runtime"] for r in results if "error" not in r), None)
            row[f"errors_{load}"] = [r["error"] for r in results if "error" in r]
        rows.append(row)
    print(format_table(
        ["imas-infer --threads", "runtime", "img/s alone", "model ms/img alone", "img/s under load",
         "model ms/img under load"],
        [[r["threads"], r["runtime_alone"] or "-", r["images_per_s_alone"] or "-", r["model_ms_per_image_alone"] or "-",
          r.get("images_per_s_load") or "-", r.get("model_ms_per_image_load") or "-"] for r in rows],
        title=f"inference (imas-infer --backend torch, {args.infer_images} scenes {h}x{w}; median of the rounds)",
    ), flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
