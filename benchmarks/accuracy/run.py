"""Real-photo accuracy benchmark: every training method against supervised-only, at equal iterations, over seeds.

    python benchmarks/accuracy/prepare.py --source data/ccp --out data/ccp_prepared     # once (see prepare.py)
    python benchmarks/accuracy/run.py --data data/ccp_prepared                          # supervised + iMAS, 3 seeds
    python benchmarks/accuracy/run.py --data data/ccp_prepared --methods all            # every method that exists
    python benchmarks/accuracy/run.py --data data/ccp_prepared --methods imas --variant tau0.8 --set imas.tau=0.8
    python benchmarks/accuracy/run.py --report-only                                     # table + plot from results

Each run is `python -m imas_train --config configs/custom_folder.yaml --set ...` in a subprocess with one torch
thread: the custom-data config a user starts from, with the overrides of `scratch_overrides` (the demo's tiny
ResNet-18 DeepLabV3+ from scratch, the prepared folder's paths and classes, batch, crop, schedule). So the method
settings measured as "imas" are the recommended recipe of `configs/custom_folder.yaml`; a method without a section
there takes it from `configs/demo.yaml` (the from-scratch settings). Equal iterations: a semi-supervised epoch is one
pass over the unlabeled list (⌊N_u/B⌋ iterations) and the run lasts `--epochs` of them; supervised-only (an epoch =
⌊N_l/B⌋ iterations) gets the same number through `optim.max_iters`, its poly schedule spanning the next whole epoch
(at most ⌊N_l/B⌋ - 1 iterations more, LR at the stop < 2 % of the base). Evaluations are about one per unlabeled
epoch for every method, so "best" is a maximum over the same number of evaluations.

A finished run (its `teacher.json` at the planned iteration) is not trained again: the runner reads it back, so an
interrupted benchmark continues where it stopped and new methods or variants add rows. Every run's record goes to
`--results` (default `benchmarks/accuracy/results.json`); the table (mean ± std over seeds of final and best teacher
mIoU, per-seed gain over supervised, wall time) is printed and written between the markers of `--readme`, and the
mIoU-against-iterations curves of each split to `miou_<split>.png` beside it.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CODE = ROOT  # the toolkit checkout the runs use (--code)
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CLASS_NAMES = ("background", "skin", "hair", "upper_clothes", "lower_clothes", "dress", "shoes", "accessories")

# The demo's tiny model (configs/demo.yaml `model:`), from scratch: no ImageNet file.
TINY_MODEL = {
    "depth": 18, "layers": "[1,1,1,1]", "base_width": 16, "aspp_channels": 32, "low_level_channels": 16,
    "decoder_channels": 32, "rep_channels": 64, "output_stride": 16, "aux_head": "false", "pretrained": "null",
}  # fmt: skip


class BenchmarkError(Exception):
    """A run failed or the inputs are missing; the message names the run folder or file."""


def scratch_overrides(data: Path, split: str, *, batch: int, crop: int, num_classes: int = 8) -> list[str]:
    """The `--set` items that turn configs/custom_folder.yaml into this benchmark's from-scratch run (method and
    schedule excluded)."""
    items = [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + [f"model.num_classes={num_classes}"]
    items += [
        "method=supervised",
        f"data.root={data}",
        "data.image_dir=images",
        "data.mask_dir=masks",
        f"data.class_names=[{','.join(CLASS_NAMES[:num_classes])}]",
        "data.value_remap=null",
        "data.ignore_values=[]",
        f"data.labeled_list={data / 'splits' / split / 'labeled.txt'}",
        f"data.unlabeled_list={data / 'splits' / split / 'unlabeled.txt'}",
        f"data.val_list={data / 'splits' / 'val.txt'}",
        f"data.crop_size={crop}",
        f"data.batch_size={batch}",
        "data.num_workers=0",
        "optim.lr=0.01",  # from scratch (configs/demo.yaml); the file's 0.001 is the pretrained fine-tuning LR
        "eval.protocol=whole",
        "eval.window=256",
        "run.cpu_threads=1",
        "run.checkpoint_every=1000000",
        "run.keep_checkpoints=8",  # one per epoch-end of a semi-supervised run, for diagnose.py
        "run.tensorboard=false",
        "run.log_every=50",
    ]
    return items


def _count(path: Path) -> int:
    if not path.is_file():
        raise BenchmarkError(f"{path}: not found; run benchmarks/accuracy/prepare.py first (--data names its --out)")
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#"))


def _method_section(method: str, base: Path) -> list[str]:
    """`--set` items that copy the method's section from configs/demo.yaml when `base` has none."""
    import yaml

    if method == "supervised":
        return []
    raw = yaml.safe_load(base.read_text())
    if method in raw:
        return []
    demo = yaml.safe_load((CODE / "configs" / "demo.yaml").read_text())
    if method not in demo or not isinstance(demo[method], dict):
        return []  # a method without settings
    return [f"{method}.{k}={json.dumps(v)}" for k, v in demo[method].items()]


def _resolved(config: Path, items: list[str]) -> dict:
    """The experiment `config` + `items` resolve to, without the run bookkeeping: equal for equal experiments."""
    import dataclasses

    from imas_train.config import load_config

    if not config.is_file():
        return {}
    cfg = dataclasses.asdict(load_config(config, items))
    cfg["run"] = {"seed": cfg["run"]["seed"]}  # the rest is bookkeeping (folder, checkpoints, logs)
    return json.loads(json.dumps(cfg, default=str))


def uses_unlabeled(method: str) -> bool:
    from imas_train.methods import METHODS

    if method not in METHODS:
        raise BenchmarkError(f"unknown method {method!r}; this install has {', '.join(METHODS)}")
    return bool(METHODS[method].uses_unlabeled)


def st_pp_stage_epochs(n_lab: int, n_unl: int, *, batch: int, total: int) -> tuple[list[int], int]:
    """ST++'s stage epochs closest to `total` training iterations, and the iterations they make.

    The re-trainings run one epoch each (their lists repeat the labeled images ⌈N_p/N_l⌉ times, so one epoch is
    already N_u-sized: `imas_train.methods.st_pp.retrain_items`); the supervised stage (the labeled list, twice when
    N_l < ``double_labeled_below``) takes the rest, at least K epochs for its K snapshots. Labelling passes are not
    iterations (docs/methods.md, ST / ST++)."""
    from imas_train.config import StPpConfig

    st = StPpConfig()
    it1 = n_lab * (2 if n_lab < st.double_labeled_below else 1) // batch
    reliable = int(st.reliable_fraction * n_unl)

    def retrain(n_pseudo: int) -> int:
        return (-(-n_pseudo // n_lab) * n_lab + n_pseudo) // batch

    it2, it3 = retrain(reliable), retrain(n_unl)
    e1 = max(st.checkpoints, round((total - it2 - it3) / it1))
    return [e1, 1, 1], e1 * it1 + it2 + it3


def plan(method: str, n_lab: int, n_unl: int, *, batch: int, epochs: int) -> dict:
    """Iterations, epochs and evaluation interval of one method (module docstring: equal iterations)."""
    iters_u, iters_l = n_unl // batch, n_lab // batch
    if iters_u < 1 or iters_l < 1:
        raise BenchmarkError(f"batch {batch} exceeds the {n_lab} labeled or {n_unl} unlabeled images")
    total = epochs * iters_u
    if method == "st_pp":  # a pipeline of trainings: the budget is split over its stages
        stage_epochs, iterations = st_pp_stage_epochs(n_lab, n_unl, batch=batch, total=total)
        return {"iterations": iterations, "stage_epochs": stage_epochs, "eval_every": 1}
    if uses_unlabeled(method):
        return {"iterations": total, "epochs": epochs, "iters_per_epoch": iters_u, "eval_every": 1}
    sup_epochs = -(-total // iters_l)
    return {"iterations": total, "epochs": sup_epochs, "iters_per_epoch": iters_l,
            "eval_every": max(1, round(iters_u / iters_l))}  # fmt: skip


def _iterations(meta: dict) -> int:
    """Training iterations of a finished run: its last step, or all of a pipeline's stages (ST++)."""
    return int(meta["training_summary"].get("st_pp", {}).get("total_iterations", meta["step"]))


def _history(run_dir: Path, meta: dict) -> tuple[list[list[float]], float]:
    """[iteration, mIoU %] after each evaluation, counted over the whole run (a pipeline's stages one after the
    other), and the training wall time in seconds (a pipeline's labelling passes excluded)."""
    summary = meta["training_summary"]
    stages = summary.get("st_pp", {}).get("iterations") or {None: _iterations(meta)}
    history, offset, wall = [], 0, 0.0
    for stage, n in stages.items():
        s = summary if stage is None else json.loads((run_dir / stage / "teacher.json").read_text())["training_summary"]
        ipe = s["iters_per_epoch"]
        history += [[offset + min((e + 1) * ipe, n), round(100 * m, 2)] for e, m in s["miou_history"]]
        offset, wall = offset + n, wall + s["wall_time_s"]
    return history, round(wall, 1)


def _easiness_means(run_dir: Path) -> list[float]:
    means = []
    for path in sorted((run_dir / "easiness").glob("epoch_*.csv")):
        with path.open() as f:
            values = [float(row["easiness"]) for row in csv.DictReader(f)]
        means.append(round(statistics.fmean(values), 4) if values else float("nan"))
    return means


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_one(
    *, base: Path, data: Path, split: str, method: str, name: str, seed: int, sets: list[str], runs: Path,
    batch: int, crop: int, epochs: int, rerun: bool, log=print,
) -> dict:  # fmt: skip
    """Train (or read back) one run; returns its record."""
    n_lab = _count(data / "splits" / split / "labeled.txt")
    n_unl = _count(data / "splits" / split / "unlabeled.txt")
    p = plan(method, n_lab, n_unl, batch=batch, epochs=epochs)
    out = runs / split / name / f"seed{seed}"
    meta_path = out / "teacher.json"
    items = scratch_overrides(data, split, batch=batch, crop=crop) + _method_section(method, base)
    if "stage_epochs" in p:
        schedule = [f"st_pp.stage_epochs=[{','.join(map(str, p['stage_epochs']))}]"]
    else:
        schedule = [f"optim.epochs={p['epochs']}", f"optim.max_iters={p['iterations']}"]
    items += [f"method={method}", *schedule, f"eval.every_epochs={p['eval_every']}", f"run.seed={seed}",
              f"run.output_dir={out}", *sets]  # fmt: skip
    expected = _resolved(base, items)
    done = (meta_path.is_file() and _iterations(json.loads(meta_path.read_text())) == p["iterations"]
            and _resolved(out / "config.yaml", []) == expected)  # fmt: skip
    load_before = _load_average()
    wall = None
    if rerun or not done:
        cmd = [sys.executable, "-m", "imas_train", "--config", str(base), "--set", *items]
        if out.exists():
            cmd.append("--overwrite")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(CODE))
        when = time.strftime("%H:%M:%S")
        log(f"[{when}] {split} {name} seed {seed}: {method}, {p['iterations']} iterations -> {out}")
        out.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with (out / "train.log").open("w") as logf:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=CODE)
        wall = round(time.monotonic() - start, 1)
        if proc.returncode != 0:
            tail = (out / "train.log").read_text(errors="replace")[-1500:]
            raise BenchmarkError(f"{out}: training exited {proc.returncode}; {out / 'train.log'} ends:\n{tail}")
    meta = json.loads(meta_path.read_text())
    summary = meta["training_summary"]
    history, train_wall = _history(out, meta)
    best = round(100 * (meta["miou_best"] if meta["miou_best"] is not None else meta["miou_final"]), 2)
    best_it = max((it for it, m in history if m == best), default=None)
    record = {
        "split": split, "name": name, "method": method, "seed": seed, "sets": sets,
        "iterations": _iterations(meta), "batch": batch, "crop": crop,
        "final": round(100 * meta["miou_final"], 2), "best": best,
        "best_iteration": best_it, "history": history,
        "train_wall_s": train_wall, "process_wall_s": wall,
        "easiness_mean_per_epoch": _easiness_means(out),
        "load_average_before": load_before, "load_average_after": _load_average(),
        "method_config": expected.get(method),
        "run_dir": str(out),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    log(f"  final {record['final']:.2f} %, best {record['best']:.2f} % (iteration {best_it}), "
        f"{summary['wall_time_s']:.0f} s of training")  # fmt: skip
    return record


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text())["runs"] if path.is_file() else []


def save_results(path: Path, records: list[dict], settings: dict) -> None:
    sys.path.insert(0, str(HERE.parent))
    from report import machine_info, versions

    from imas_core.atomic import atomic_write_json

    payload = {"benchmark": "accuracy", "settings": settings, "versions": versions(), "machine": machine_info(),
               "runs": records}  # fmt: skip
    atomic_write_json(path, payload)


def merge(records: list[dict], new: dict) -> list[dict]:
    key = (new["split"], new["name"], new["seed"])
    return [r for r in records if (r["split"], r["name"], r["seed"]) != key] + [new]


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(records: list[dict], split: str) -> str:
    """The markdown table of one split: one row per name, seeds in columns."""
    rows = [r for r in records if r["split"] == split]
    if not rows:
        return f"(no runs for split {split})"
    seeds = sorted({r["seed"] for r in rows})
    names = sorted({r["name"] for r in rows}, key=lambda n: (not n.startswith("supervised"), n))
    # the supervised-only run of the same seed and budget (a row of method supervised, whatever its name); a
    # pipeline's stage epochs can only approach the budget (ST++: 1123 for 1120), so within 1 % counts as equal
    sups = [r for r in rows if r["method"] == "supervised"]
    sup = {(r["seed"], it): s["final"] for r in rows for s in sups
           if s["seed"] == r["seed"] and abs(s["iterations"] - (it := r["iterations"])) <= 0.01 * it}  # fmt: skip
    head = ["name", "method", "iterations", *(f"seed {s}" for s in seeds), "final mean ± std", "best mean ± std"]
    head += ["gain over supervised (final, per seed)", "wall time", "settings"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        rs = {r["seed"]: r for r in rows if r["name"] == name}
        finals = [rs[s]["final"] for s in seeds if s in rs]
        bests = [rs[s]["best"] for s in seeds if s in rs]
        keys = [(s, rs[s]["iterations"]) for s in seeds if s in rs]
        gains = [f"{rs[s]['final'] - sup[(s, it)]:+.1f}" for s, it in keys if (s, it) in sup]
        if next(iter(rs.values()))["method"] == "supervised":
            gains = []
        walls = [rs[s]["train_wall_s"] for s in seeds if s in rs]
        first = next(iter(rs.values()))
        cells = [name, first["method"], str(first["iterations"])]
        cells += [f"{rs[s]['final']:.2f} ({rs[s]['best']:.2f})" if s in rs else "not run" for s in seeds]
        cells += [_ms(finals), _ms(bests), " / ".join(gains) or "-", f"{statistics.fmean(walls):.0f} s",
                  " ".join(f"`{x}`" for x in first["sets"]) or "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], split: str, path: Path) -> Path | None:
    """Mean teacher mIoU (over seeds) against iterations per name, min-max band; PNG at `path`."""
    rows = [r for r in records if r["split"] == split and r["history"]]
    if not rows:
        return None
    import matplotlib
    from matplotlib.figure import Figure

    from imas_core.atomic import atomic_write

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    names = sorted({r["name"] for r in rows}, key=lambda n: (not n.startswith("supervised"), n))
    colors = matplotlib.colormaps["tab20"].colors if len(names) > 10 else matplotlib.colormaps["tab10"].colors
    for k, name in enumerate(names):
        runs = [r["history"] for r in rows if r["name"] == name]
        its = sorted({h[0] for hist in runs for h in hist})
        means, lo, hi, xs = [], [], [], []
        for it in its:
            vals = [m for hist in runs for i, m in hist if i == it]
            if len(vals) == len(runs):
                xs.append(it)
                means.append(statistics.fmean(vals))
                lo.append(min(vals))
                hi.append(max(vals))
        (line,) = ax.plot(xs, means, "o-" if k % 2 == 0 else "s--", ms=3, color=colors[k % len(colors)],
                          label=f"{name} (n={len(runs)})")  # fmt: skip
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("iteration")
    ax.set_ylabel("val teacher mIoU (%)")
    ax.set_title(f"Clothing Co-Parsing {split.replace('_', '/')}: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return path


def write_readme(readme: Path, records: list[dict], splits: list[str]) -> None:
    """Replace the block between the result markers of `readme` with the tables of `splits`."""
    from imas_core.atomic import atomic_write_text

    if not readme.is_file():
        text = f"# Accuracy on real photos\n\n{BEGIN}\n{END}\n"
    else:
        text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise BenchmarkError(f"{readme}: the markers {BEGIN} and {END} are missing; add them where the table goes")
    body = []
    for split in splits:
        body += [f"**Split {split.replace('_', '/')}** (final (best) teacher mIoU % per seed):", "",
                 table(records, split), ""]  # fmt: skip
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    atomic_write_text(readme, head + BEGIN + "\n" + "\n".join(body) + END + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="prepared folder (prepare.py --out)")
    parser.add_argument("--split", action="append", help="split folder under <data>/splits (default 1_8; repeatable)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["supervised", "imas"],
        help="methods to run; 'all' = every method of this install (default: supervised imas)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="run.seed values (default 0 1 2)")
    parser.add_argument("--epochs", type=int, default=5, help="unlabeled epochs = the iteration budget (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="labeled and unlabeled batch each (default 8)")
    parser.add_argument("--crop", type=int, default=96, help="training crop (default 96)")
    parser.add_argument("--variant", help="name of this row (default: the method); with --set for a study")
    parser.add_argument("--set", dest="sets", nargs="+", default=[], help="extra config overrides of this row")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "custom_folder.yaml", help="base config")
    parser.add_argument("--runs", type=Path, default=Path("runs/accuracy"), help="run folders (default runs/accuracy)")
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md", help="where the table goes")
    parser.add_argument(
        "--code",
        type=Path,
        default=ROOT,
        help="toolkit checkout to train with (default: this one); e.g. a fixed snapshot of it",
    )
    parser.add_argument("--rerun", action="store_true", help="train again even when a finished run exists")
    parser.add_argument("--report-only", action="store_true", help="no training: table and plot from --results")
    parser.add_argument("--smoke", action="store_true", help="tiniest setting: 2 epochs, batch 2, crop 32, seed 0")
    args = parser.parse_args(argv)
    global CODE
    CODE = args.code.resolve()
    sys.path.insert(0, str(CODE))
    if args.smoke:
        args.epochs, args.batch, args.crop, args.seeds = 2, 2, 32, args.seeds[:1]  # 2: one past the warm-up
    splits = args.split or ["1_8"]
    records = load_results(args.results)
    settings = {"code": str(CODE), "epochs": args.epochs, "batch": args.batch, "crop": args.crop,
                "config": str(args.config), "threads": 1, "smoke": args.smoke}  # fmt: skip
    try:
        if not args.report_only:
            if args.data is None:
                parser.error("--data is required unless --report-only")
            from imas_train.methods import METHODS

            methods = list(METHODS) if args.methods == ["all"] else args.methods
            if args.variant and len(methods) != 1:
                parser.error("--variant names one row: give exactly one method")
            for split in splits:
                for seed in args.seeds:  # seed-major: every method has a result for seed 0 before seed 1 starts
                    for method in methods:
                        rec = run_one(
                            base=args.config, data=args.data.resolve(), split=split, method=method,
                            name=args.variant or method, seed=seed, sets=args.sets, runs=args.runs.resolve(),
                            batch=args.batch, crop=args.crop, epochs=args.epochs, rerun=args.rerun,
                        )  # fmt: skip
                        records = merge(records, rec)
                        save_results(args.results, records, settings)
        report_splits = sorted({r["split"] for r in records}, key=lambda s: (s != "1_8", s))
        for split in report_splits:
            print(f"\n{split}:\n{table(records, split)}")
            png = plot(records, split, args.readme.parent / f"miou_{split}.png")
            if png:
                print(f"plot: {png}")
        write_readme(args.readme, records, report_splits)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"results: {args.results}; table: {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
