"""Does labelling the images iMAS found hardest beat labelling random ones? The demo experiment of `imas-train
label-next`, reproduced by one command.

For each seed pair (run.seed / data.demo.seed):

1. the demo's scenes are written as a folder dataset (`imas_train.data.demo.write_scenes`): the 16 labeled, the 320
   unlabeled (with their ground truth, which the demo has because it draws the scenes) and the 64 val scenes, with
   split lists `labeled.txt`, `unlabeled.txt`, `val.txt` ("image label" lines); the PNGs hold exactly the pixels the
   demo renders, so a run on them is the demo run (the config is configs/demo.yaml with `data:` pointing there);
2. a base iMAS run (16 labeled + 320 unlabeled, 15 epochs = 1200 iterations);
3. `imas-train label-next --run <base> --top K --rule R --write-splits ...` for each rule, plus K images drawn at
   random: each writes lists that move the K chosen images, with their true labels, to the labeled list (the person
   who labels them is simulated by the ground truth);
4. one iMAS run from scratch per new split (16 + K labeled, 320 - K unlabeled, 15 epochs of (320 - K) / 4
   iterations: every arm of a seed trains the same number of iterations);
5. the final and best teacher mIoU (teacher.json) of every run, the per-rule gain over random, and the true teacher
   mIoU of the chosen images under the base run's teacher (are the picked images really the ones it gets wrong?).

Runs go one at a time in subprocesses with OMP_NUM_THREADS=1 (one torch thread, as configs/demo.yaml's table) and
log to `--logs`; a finished run (teacher.json present) is skipped, so an interrupted experiment continues where it
stopped. `--stage base` runs only the base runs. The JSON is rewritten after every run.

    python benchmarks/label_next.py --rules mean last projected --random-draws 3   # the README figures, 24 runs
    python benchmarks/label_next.py --smoke              # 1 seed, tiny runs: checks the script end to end
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import format_table, header_lines, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ("2/0", "2/1", "5/2")  # run.seed / data.demo.seed, the three seeds of configs/demo.yaml's table
RANDOM_BASE_SEED = (
    1000  # random draw j (1, 2, ...) of seed pair i: numpy default_rng(RANDOM_BASE_SEED + 100 (j - 1) + i)
)


def _materialise(folder: Path, data_seed: int, counts: dict[str, int], height: int, width: int) -> None:
    """Write the demo's scenes of one data seed as a folder dataset with its three split lists."""
    from imas_train.data.demo import write_scenes

    if (folder / "val.txt").is_file():
        return
    streams = {"labeled": "labeled", "unlabeled": "unlabeled", "val": "val"}
    lists = {}
    for key, stream in streams.items():
        names = write_scenes(folder, stream, counts[key], seed=data_seed, height=height, width=width)
        lists[key] = "".join(f"images/{n}.png labels/{n}.png\n" for n in names)
    for key, text in lists.items():  # val.txt last: its presence marks a complete folder
        (folder / f"{key}.txt").write_text(text)


def _folder_config(folder: Path, smoke: bool) -> Path:
    """configs/demo.yaml (its iMAS sections) with `data:` pointing at the materialised folder dataset."""
    import yaml

    from imas_core.classes import DEMO_CLASSES, DEMO_PALETTE

    path = folder / "folder.yaml"
    if path.is_file():  # written once: every run of the experiment trains with the same settings
        return path
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg = {key: demo[key] for key in ("model", "data", "loss", "optim", "imas", "eval", "run")}  # method imas only
    data = {k: v for k, v in cfg["data"].items() if k != "demo"}
    data.update(
        dataset="folder", root=str(folder), image_dir="images", mask_dir="labels",
        class_names=list(DEMO_CLASSES), palette=[list(c) for c in DEMO_PALETTE],
        labeled_list=str(folder / "labeled.txt"), unlabeled_list=str(folder / "unlabeled.txt"),
        val_list=str(folder / "val.txt"),
    )  # fmt: skip
    cfg["data"] = data
    if smoke:
        cfg["optim"]["epochs"] = 3
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _train(config: Path, run_dir: Path, seed: int, log: Path, extra: list[str]) -> float:
    """One training run in a subprocess (skipped when finished); returns its wall seconds (0 when skipped)."""
    if (run_dir / "teacher.json").is_file():
        return 0.0
    cmd = [sys.executable, "-m", "imas_train", "--config", str(config), "--output-dir", str(run_dir), "--overwrite",
           "--set", f"run.seed={seed}", "run.tensorboard=false", *extra]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"train: {run_dir} (log {log})", flush=True)
    seconds = _subprocess(cmd, log)
    (run_dir / "runner_wall_s.txt").write_text(f"{seconds:.1f}\n")  # kept for the summary of a later invocation
    return seconds


def _subprocess(cmd: list[str], log: Path, attempts: int = 5, pause_s: float = 60.0) -> float:
    """Run `cmd` (output to `log`); a failure is retried after a pause, `attempts` times in all (a checkout that
    others edit can fail to import for a moment). Returns the wall seconds of the successful attempt."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for attempt in range(1, attempts + 1):
        t0 = time.time()
        with log.open("w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if proc.returncode == 0:
            return time.time() - t0
        print(f"failed ({proc.returncode}, attempt {attempt}/{attempts}): {' '.join(cmd)}; see {log}", flush=True)
        if attempt < attempts:
            time.sleep(pause_s)
    raise SystemExit(f"gave up after {attempts} attempts: {' '.join(cmd)}; see {log}")


def _label_next(run_dir: Path, k: int, rule: str, window: int, out: Path, log: Path) -> float:
    """`imas-train label-next` on a finished run, writing the report and the new splits; returns its seconds."""
    cmd = [sys.executable, "-m", "imas_train", "label-next", "--run", str(run_dir), "--top", str(k), "--rule", rule,
           "--window", str(window), "--output", str(out / "report"), "--write-splits", str(out)]  # fmt: skip
    return _subprocess(cmd, log)


def _random_splits(folder: Path, out: Path, k: int, seed: int) -> list[str]:
    """Move K unlabeled lines drawn at random to the labeled list (the control arm)."""
    import numpy as np

    from imas_train.label_next import move_to_labeled, write_split_lists

    unlabeled = [line for line in (folder / "unlabeled.txt").read_text().splitlines() if line.strip()]
    labeled = [line for line in (folder / "labeled.txt").read_text().splitlines() if line.strip()]
    chosen = sorted(np.random.default_rng(seed).choice(len(unlabeled), size=k, replace=False).tolist())
    new_labeled, new_unlabeled = move_to_labeled(labeled, unlabeled, chosen)
    write_split_lists(out, new_labeled, new_unlabeled)
    return [unlabeled[i].split()[0] for i in chosen]


def _chosen(split_dir: Path, folder: Path) -> list[str]:
    base = set((folder / "labeled.txt").read_text().split("\n"))
    return [line.split()[0] for line in (split_dir / "labeled.txt").read_text().splitlines() if line not in base]


def _true_miou_per_image(run_dir: Path, folder: Path) -> list[float]:
    """The run's teacher's per-image mIoU (%) against the ground truth on every unlabeled scene, in list order
    (whole-image forward, as the demo is validated)."""
    import numpy as np
    import torch

    from imas_core.images import decode_rgb
    from imas_core.scores import miou
    from imas_train.augment import normalise_images
    from imas_train.data.labels import folder_rule, read_label
    from imas_train.metrics import intersection_union
    from imas_train.teacher_artifact import load_teacher

    model, meta = load_teacher(run_dir / "teacher.safetensors")
    c = len(meta.class_names)
    rule = folder_rule(c, (), None)
    scores = []
    with torch.no_grad():
        for line in (folder / "unlabeled.txt").read_text().splitlines():
            image, label = line.split()
            rgb = decode_rgb(folder / image).rgb
            x = normalise_images(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None])
            truth = torch.from_numpy(read_label(folder / label, rule).astype(np.int64))[None]
            inter, union = intersection_union(model(x).argmax(1), truth, c)
            scores.append(100 * miou(inter[0].numpy(), union[0].numpy())[0])
    return scores


def _rules_vs_truth(run_dir: Path, truth: list[float], k: int, window: int) -> dict[str, Any]:
    """How well each rule's order on the base run matches the teacher's true per-image mIoU: Spearman correlation
    of score and mIoU, and the mean true mIoU of the rule's top K (random K: the mean over all images)."""
    import numpy as np

    from imas_train.label_next import RULES, rank, read_easiness, scores, summarise

    y = np.asarray(truth)
    summary = summarise(read_easiness(run_dir / "easiness", y.size), window)
    out: dict[str, Any] = {"all_images_true_miou": round(float(y.mean()), 2)}
    for rule in RULES:
        score = scores(summary, rule)
        ok = np.isfinite(score)
        ranks = [np.argsort(np.argsort(v[ok])) for v in (score, y)]
        out[rule] = {"spearman": round(float(np.corrcoef(*ranks)[0, 1]), 3),
                     "top_k_true_miou": round(float(y[rank(score)[:k]].mean()), 2)}  # fmt: skip
    return out


def _result(run_dir: Path, wall: float) -> dict[str, Any]:
    """Scores and times of a finished run: `wall_time_s` is the training subprocess's wall time (process start to
    end, recorded in `<run>/runner_wall_s.txt`), `train_time_s` the training time the loop recorded in
    teacher.json."""
    meta = json.loads((run_dir / "teacher.json").read_text())
    summary = meta["training_summary"]
    return {
        "run": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
        "miou_final": round(100 * meta["miou_final"], 2),
        "miou_best": round(100 * meta["miou_best"], 2),
        "iterations": summary["iterations"],
        "train_time_s": summary["wall_time_s"],
        "wall_time_s": round(wall, 1) if wall > 0 else _recorded_wall(run_dir),
    }


def _recorded_wall(run_dir: Path) -> float | None:
    path = run_dir / "runner_wall_s.txt"
    return float(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", default=list(SEEDS), help="run.seed/data.demo.seed pairs")
    parser.add_argument("--top", type=int, default=16, help="K images labelled per arm (default 16)")
    parser.add_argument("--rules", nargs="+", default=["mean", "last"], help="label-next rules compared")
    parser.add_argument("--random-draws", type=int, default=1, help="random arms per seed (default 1)")
    parser.add_argument("--window", type=int, default=5, help="label-next --window (epochs; default 5)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "label_next", help="data and run folders")
    parser.add_argument("--logs", type=Path, default=None, help="training logs (default: <work>/logs)")
    parser.add_argument("--stage", choices=("all", "base"), default="all", help="base: the base runs only")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "label_next.json")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 24 unlabeled scenes, 3 epochs, K 4")
    args = parser.parse_args(argv)
    counts = {"labeled": 16, "unlabeled": 320, "val": 64}
    seeds, k = args.seeds, args.top
    if args.smoke:
        counts, seeds, k = {"labeled": 4, "unlabeled": 24, "val": 4}, args.seeds[:1], 4
    logs = args.logs or args.work / "logs"
    settings = {
        "seeds": seeds,
        "top": k,
        "rules": args.rules,
        "counts": counts,
        "epochs": 3 if args.smoke else 15,
        "threads": 1,
        "smoke": args.smoke,
        "random_seed": f"numpy default_rng({RANDOM_BASE_SEED} + 100 (draw - 1) + seed pair index)",
        "random_draws": args.random_draws,
    }
    print(header_lines("label_next", settings), flush=True)
    results: list[dict[str, Any]] = []
    randoms = ["random"] + [f"random_{j}" for j in range(2, args.random_draws + 1)]
    arms = [*args.rules, *randoms]
    for i, pair in enumerate(seeds):
        run_seed, data_seed = (int(v) for v in pair.split("/"))
        folder = args.work / f"data_d{data_seed}" if not args.smoke else args.work / "smoke_data"
        _materialise(folder, data_seed, counts, 96, 128)
        config = _folder_config(folder, args.smoke)
        tag = f"s{run_seed}_d{data_seed}"
        base = args.work / tag / "base"
        wall = _train(config, base, run_seed, logs / f"{tag}_base.log", [])
        truth = _true_miou_per_image(base, folder)
        row: dict[str, Any] = {"seed": pair, "base": _result(base, wall),
                               "rules_vs_truth": _rules_vs_truth(base, truth, k, args.window)}  # fmt: skip
        unlabeled_images = [line.split()[0] for line in (folder / "unlabeled.txt").read_text().splitlines()]
        results.append(row)
        write_json(args.json, "label_next", settings, {"runs": results})
        if args.stage == "base":
            continue
        for arm in arms:
            split_dir = args.work / tag / f"split_{arm}"
            if not (split_dir / "unlabeled.txt").is_file():
                if arm.startswith("random"):
                    draw = 1 if arm == "random" else int(arm.split("_")[1])
                    _random_splits(folder, split_dir, k, RANDOM_BASE_SEED + 100 * (draw - 1) + i)
                else:
                    seconds = _label_next(base, k, arm, args.window, split_dir, logs / f"{tag}_label_next_{arm}.log")
                    (split_dir / "report_seconds.txt").write_text(f"{seconds:.2f}\n")
            if (split_dir / "report_seconds.txt").is_file():  # the label-next command's wall time, CLI start to end
                row.setdefault("report_s", {})[arm] = float((split_dir / "report_seconds.txt").read_text())
            chosen = _chosen(split_dir, folder)
            run = args.work / tag / arm
            extra = [
                f"data.labeled_list={split_dir / 'labeled.txt'}",
                f"data.unlabeled_list={split_dir / 'unlabeled.txt'}",
            ]
            wall = _train(config, run, run_seed, logs / f"{tag}_{arm}.log", extra)
            row[arm] = _result(run, wall) | {
                "chosen": chosen,
                "base_teacher_miou_on_chosen": round(sum(truth[unlabeled_images.index(c)] for c in chosen) / k, 2),
            }  # fmt: skip
            write_json(args.json, "label_next", settings, {"runs": results})
    _summarise(results, arms, args.json, settings)
    return 0


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _summarise(results: list[dict[str, Any]], arms: list[str], path: Path, settings: dict[str, Any]) -> None:
    """Print the tables and write the JSON: per arm, the per-seed final (best) mIoU, mean ± std, training time and
    the base teacher's true mIoU on the chosen images; each rule minus random; each rule against the truth."""
    rows, summary = [], {}
    for key in ["base", *arms]:
        done = [r[key] for r in results if key in r]
        if not done:
            continue
        (final, final_std), (best, best_std) = (_mean_std([d[m] for d in done]) for m in ("miou_final", "miou_best"))
        times = [d["train_time_s"] for d in done]
        summary[key] = {"final_mean": round(final, 2), "final_std": round(final_std, 2), "best_mean": round(best, 2),
                        "best_std": round(best_std, 2),
                        "train_time_s_mean": round(statistics.mean(times), 1)}  # fmt: skip
        per_seed = "  ".join(f"{d['miou_final']:.2f} ({d['miou_best']:.2f})" for d in done)
        chosen = [d["base_teacher_miou_on_chosen"] for d in done if "base_teacher_miou_on_chosen" in d]
        rows.append([key, per_seed, f"{final:.2f} ± {final_std:.2f}", f"{best:.2f} ± {best_std:.2f}",
                     f"{statistics.mean(times):.0f}", f"{statistics.mean(chosen):.2f}" if chosen else "-"])  # fmt: skip
    gains = []
    randoms = [a for a in arms if a.startswith("random")]

    def random_mean(r: dict[str, Any], metric: str) -> float:  # the mean over the random draws of one seed pair
        return statistics.mean(r[k][metric] for k in randoms)

    comparisons = [(arm, "random" if len(randoms) == 1 else "mean of the random draws") for arm in arms
                   if not arm.startswith("random")]  # fmt: skip
    comparisons += [(extra, "random") for extra in randoms[1:]]  # draw-to-draw spread of the random arm
    for arm, reference in comparisons:
        done = [r for r in results if arm in r and all(k in r for k in randoms)]
        if not done:
            continue

        def ref(r: dict[str, Any], metric: str, reference: str = reference) -> float:
            return r["random"][metric] if reference == "random" else random_mean(r, metric)

        final = [r[arm]["miou_final"] - ref(r, "miou_final") for r in done]
        best = [r[arm]["miou_best"] - ref(r, "miou_best") for r in done]
        (fm, fs), (bm, bs) = _mean_std(final), _mean_std(best)
        summary[f"{arm}_minus_{reference.replace(' ', '_')}"] = {
            "final_per_seed": [round(g, 2) for g in final], "final_mean": round(fm, 2), "final_std": round(fs, 2),
            "best_per_seed": [round(g, 2) for g in best], "best_mean": round(bm, 2), "best_std": round(bs, 2),
        }  # fmt: skip
        gains.append([f"{arm} - {reference}", "  ".join(f"{g:+.2f}" for g in final), f"{fm:+.2f} ± {fs:.2f}",
                      "  ".join(f"{g:+.2f}" for g in best), f"{bm:+.2f} ± {bs:.2f}"])  # fmt: skip
    truth = [r["rules_vs_truth"] for r in results if "rules_vs_truth" in r]
    rule_rows = []
    for rule in ("mean", "last", "projected"):
        rho = [t[rule]["spearman"] for t in truth]
        top = [t[rule]["top_k_true_miou"] for t in truth]
        summary[f"{rule}_vs_truth"] = {"spearman_mean": round(statistics.mean(rho), 3),
                                       "top_k_true_miou_mean": round(statistics.mean(top), 2)}  # fmt: skip
        rule_rows.append([rule, "  ".join(f"{v:.3f}" for v in rho), "  ".join(f"{v:.2f}" for v in top)])
    rule_rows.append(["(all images)", "", "  ".join(f"{t['all_images_true_miou']:.2f}" for t in truth)])
    headers = ["arm", "final (best) mIoU % per seed", "final mean ± std", "best mean ± std", "train s",
               "base teacher mIoU % on chosen"]  # fmt: skip
    print(format_table(headers, rows, title="label_next: retrained from scratch on each split"))
    print(format_table(["difference", "final per seed", "final mean ± std", "best per seed", "best mean ± std"],
                       gains, title="rule minus random (mIoU points)"))  # fmt: skip
    print(format_table(["rule on the base run", "Spearman(score, true mIoU) per seed", "true mIoU % of its top K"],
                       rule_rows, title="rules against the truth"))  # fmt: skip
    write_json(path, "label_next", settings, {"runs": results, "summary": summary})


if __name__ == "__main__":
    sys.exit(main())
