"""Pseudo-label diagnosis of one mean-teacher run on the prepared Clothing Co-Parsing folder (prepare.py).

    python benchmarks/accuracy/diagnose.py --run runs/accuracy/1_8/imas/seed0 --data data/ccp_prepared

The unlabeled list of a split holds annotated photos (their masks exist but training never reads them) besides the
tag-only ones, so the pseudo-labels of a run can be scored. For the EMA teacher of every checkpoint kept in
`<run>/state/` (one per epoch when the run keeps them: `--set run.keep_checkpoints=10`) and the final
`teacher.safetensors`, on the annotated unlabeled photos at full prepared size:

* conf_ratio: share of pixels whose teacher confidence is >= tau (the pixels the unsupervised loss trains on)
* conf_acc: pixel accuracy of those confident pseudo-labels against the ground truth
* conf_bg / gt_bg: share of background among the confident pixels, and in the ground truth
* recall_fg: share of the foreground ground-truth pixels that get a confident and correct pseudo-label
* precision_fg: share of the confident foreground pseudo-labels (any class but background) that are correct
* pl_miou: mIoU of the argmax pseudo-labels (all pixels) against the ground truth
* rho_easy: Spearman correlation, over images, between the image's easiness in that epoch's CSV and the teacher's
  pixel accuracy on it (is "easy" the same as "right"?)

Prints a table and writes `<run>/diagnosis.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _easiness(run: Path, epoch: int) -> dict[int, float]:
    path = run / "easiness" / f"epoch_{epoch:03d}.csv"
    if not path.is_file():
        return {}
    with path.open() as f:
        return {int(r["index"]): float(r["easiness"]) for r in csv.DictReader(f)}


def diagnose(run: Path, data: Path, split: str, tau: float | None = None) -> list[dict]:
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from imas_train.config import load_config
    from imas_train.models import build_model

    cfg = load_config(run / "config.yaml")
    ipe = json.loads((run / "teacher.json").read_text())["training_summary"]["iters_per_epoch"]
    tau = tau if tau is not None else (cfg.imas.tau if cfg.imas is not None else 0.95)
    c = cfg.model.num_classes
    stems = [s for s in (data / "splits" / split / "unlabeled.txt").read_text().split()]
    items = [(i, s) for i, s in enumerate(stems) if (data / "masks" / f"{s}.png").is_file()]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images, masks = [], []
    for _, s in items:
        with Image.open(data / "images" / f"{s}.jpg") as im:
            images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255)
        masks.append(torch.from_numpy(np.asarray(Image.open(data / "masks" / f"{s}.png")).astype(np.int64)))
    sources = []
    for state in sorted((run / "state").glob("step-*")):
        progress = json.loads((state / "progress.json").read_text())
        sources.append((state.name, state / "method_state.safetensors", progress))
    rows = []
    for name, path, progress in sources + [("final", run / "teacher.safetensors", None)]:
        if not path.is_file():
            continue
        tensors = load_file(str(path))
        if name != "final":
            tensors = {k[len("ema_teacher.") :]: v for k, v in tensors.items() if k.startswith("ema_teacher.")}
            if not tensors:
                continue
        model = build_model(cfg.model)
        model.load_state_dict(tensors)
        model.eval()
        step = progress["step"] if progress else None
        inter, union = np.zeros(c), np.zeros(c)
        n_conf = n_pix = n_conf_ok = n_conf_bg = n_bg = n_fg = n_fg_ok = n_conf_fg = 0
        accs = []
        with torch.no_grad():
            for img, gt in zip(images, masks, strict=True):
                prob = model(((img.unsqueeze(0)) - mean) / std).softmax(1)[0]
                conf, pred = prob.max(0)
                valid = gt != 255
                sure = (conf >= tau) & valid
                ok = pred == gt
                n_pix += int(valid.sum())
                n_conf += int(sure.sum())
                n_conf_ok += int((sure & ok).sum())
                n_conf_bg += int((sure & (pred == 0)).sum())
                n_conf_fg += int((sure & (pred > 0)).sum())
                n_bg += int((valid & (gt == 0)).sum())
                fg = valid & (gt > 0)
                n_fg += int(fg.sum())
                n_fg_ok += int((fg & sure & ok).sum())
                accs.append(float((ok & valid).sum()) / max(1, int(valid.sum())))
                p, g = pred[valid].numpy(), gt[valid].numpy()
                cm = np.bincount(g * c + p, minlength=c * c).reshape(c, c)
                inter += np.diag(cm)
                union += cm.sum(0) + cm.sum(1) - np.diag(cm)
        seen = union > 0
        epoch = (step - 1) // ipe if step else None  # the epoch this checkpoint ends (or lies in)
        easy = _easiness(run, epoch) if epoch is not None else {}
        if name == "final":
            epochs = sorted(int(p.stem.split("_")[1]) for p in (run / "easiness").glob("epoch_*.csv"))
            easy = _easiness(run, epochs[-1]) if epochs else {}
        pairs = [(easy[i], a) for (i, _), a in zip(items, accs, strict=True) if i in easy]
        rho = _spearman(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])) if pairs else float("nan")
        rows.append({
            "checkpoint": name, "step": step, "tau": tau, "images": len(items),
            "conf_ratio": n_conf / max(1, n_pix), "conf_acc": n_conf_ok / max(1, n_conf),
            "conf_bg": n_conf_bg / max(1, n_conf), "gt_bg": n_bg / max(1, n_pix),
            "recall_fg": n_fg_ok / max(1, n_fg), "precision_fg": n_fg_ok / max(1, n_conf_fg),
            "pl_miou": float((inter[seen] / union[seen]).mean()),
            "rho_easy": rho, "easiness_mean": float(np.mean([p[0] for p in pairs])) if pairs else float("nan"),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder of a mean-teacher method")
    parser.add_argument("--data", type=Path, required=True, help="prepared folder (prepare.py --out)")
    parser.add_argument("--split", default="1_8")
    parser.add_argument("--tau", type=float, default=None, help="confidence threshold (default: the run's imas.tau)")
    parser.add_argument("--code", type=Path, default=None, help="toolkit checkout to import (default: installed)")
    args = parser.parse_args(argv)
    if args.code is not None:
        sys.path.insert(0, str(args.code.resolve()))
    import torch

    torch.set_num_threads(1)
    rows = diagnose(args.run, args.data, args.split, args.tau)
    keys = [
        "conf_ratio",
        "conf_acc",
        "conf_bg",
        "gt_bg",
        "recall_fg",
        "precision_fg",
        "pl_miou",
        "rho_easy",
        "easiness_mean",
    ]
    print("| checkpoint | step | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['checkpoint']} | {r['step']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    from imas_core.atomic import atomic_write_json

    atomic_write_json(args.run / "diagnosis.json", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
