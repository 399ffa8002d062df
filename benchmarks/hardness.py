"""Easiness (the reference's "hardness"): our batched `easiness` vs a reference-style per-image numpy loop.

The reference computes softmax/max/argmax on the device, copies the label maps to the host, then loops over the images
in Python: per image and direction a confusion matrix with np.bincount (behind a validity mask), class frequencies
counted class by class, and the class-weighted IoU with class 0 excluded (NaN weights + nansum), combined with the
confident ratios as docs/algorithm.md §2. That loop is written out below from the specification and the reference's
observable behaviour; it is the baseline, not code under test.

Two comparisons, both on the same synthetic logits:
  (a) full: easiness(logits_s, logits_t) vs softmax/max on the device + host copy + numpy loop. Both sides include
      the same two softmaxes (identical work), which dilutes the ratio.
  (b) post-softmax: easiness_from_predictions(labels, confs) vs host copy + numpy loop, from the same maps.
Values must agree to float32 precision (max abs difference reported; a mismatch exits with status 2).

Two extra columns put the numbers in context (neither is code under test):
  lean: the per-image numpy loop with its fat removed (one bincount per direction, frequencies from the histogram).
  proto: a faster batched post-softmax written here: one bincount per pair (the other direction's confusion matrix
      is the transpose), count_nonzero ratios; on the CPU in numpy on zero-copy views, on CUDA in torch.

    python benchmarks/hardness.py                       # CPU defaults: B 4 and 8, 19 classes, 769x769
    python benchmarks/hardness.py --smoke               # seconds: checks the script runs
    python benchmarks/hardness.py --device cuda         # GPU run (the default when CUDA is available)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from report import (
    add_common_flags,
    format_table,
    header_lines,
    median,
    set_threads,
    sync_fn,
    time_interleaved,
    write_json,
)
from torch import Tensor

from imas_train.imas import confidence_and_labels, easiness, easiness_from_predictions

NAME = "hardness"
TOLERANCE = 1e-6  # float32 precision of values in [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# The reference-style baseline: device softmax, host copy, per-image numpy loop


def _wiou_reference(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.float32:
    """Class-weighted IoU of one image as the reference behaves (docs/algorithm.md §2; weights from `ref`, class 0 out).

    Cost-relevant behaviour kept: a validity mask and boolean indexing before np.bincount, int64 conversion, float64
    histogram, the class frequencies counted with one `(ref == c).sum()` pass per class, and NaN weights + nansum
    for the all-excluded case.
    """
    pred, ref = pred.ravel(), ref.ravel()
    valid = (ref >= 0) & (ref < num_classes)
    hist = np.zeros((num_classes, num_classes))
    hist += np.bincount(num_classes * ref[valid].astype(int) + pred[valid], minlength=num_classes**2).reshape(
        num_classes, num_classes
    )  # rows = ref, cols = pred
    counts = np.array([(ref == c).sum() for c in range(num_classes)], dtype=np.float64)
    inter = np.diag(hist)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (hist.sum(axis=1) + hist.sum(axis=0) - inter)
        counts[0] = 0.0
        weights = counts / counts.sum()  # all-zero -> NaN -> nansum gives 0
        return np.float32(np.nansum(iou * weights))


def _wiou_lean(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.float32:
    """The same value with the loop's fat removed: one bincount, class frequencies from the histogram rows."""
    hist = np.bincount(num_classes * ref.ravel() + pred.ravel(), minlength=num_classes**2)
    hist = hist.reshape(num_classes, num_classes)
    inter = np.diag(hist)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (hist.sum(1) + hist.sum(0) - inter)
        weights = hist.sum(1).astype(np.float64)
        weights[0] = 0.0
        weights = weights / weights.sum()
        return np.float32(np.nansum(weights * iou))


_WIOU = {"reference": _wiou_reference, "lean": _wiou_lean}


def reference_from_predictions(
    labels_s: Tensor,
    conf_s: Tensor,
    labels_t: Tensor,
    conf_t: Tensor,
    tau: float,
    num_classes: int,
    variant: str = "reference",
) -> np.ndarray:
    """Host copy, then one Python iteration per image: ratios and the two wIoUs in numpy on the CPU."""
    wiou = _WIOU[variant]
    labels_s_np, conf_s_np = labels_s.cpu().numpy(), conf_s.cpu().numpy()
    labels_t_np, conf_t_np = labels_t.cpu().numpy(), conf_t.cpu().numpy()
    out = np.zeros(labels_s_np.shape[0], dtype=np.float32)
    for i in range(labels_s_np.shape[0]):
        ratio_s = np.float32((conf_s_np[i] >= tau).mean())
        ratio_t = np.float32((conf_t_np[i] >= tau).mean())
        wiou_ref_t = wiou(labels_s_np[i], labels_t_np[i], num_classes)
        wiou_ref_s = wiou(labels_t_np[i], labels_s_np[i], num_classes)
        out[i] = np.float32(0.5) * (wiou_ref_t * ratio_t + wiou_ref_s * ratio_s)
    return out


def reference_easiness(logits_s: Tensor, logits_t: Tensor, tau: float) -> np.ndarray:
    """Softmax, max and argmax on the device (as the reference does), then the per-image loop."""
    with torch.no_grad():
        conf_s, labels_s = torch.max(torch.softmax(logits_s.float(), dim=1), dim=1)
        conf_t, labels_t = torch.max(torch.softmax(logits_t.float(), dim=1), dim=1)
    return reference_from_predictions(labels_s, conf_s, labels_t, conf_t, tau, logits_s.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Prototype of a faster batched version (for the suggestions in the README; not the code under test)


def _wiou_from_cm(cm: np.ndarray) -> np.ndarray:
    """(B, K, K) float64 confusion matrices, rows = reference -> (B,) float32 class-weighted IoU, class 0 out."""
    inter = np.diagonal(cm, axis1=1, axis2=2)
    n_ref, n_pred = cm.sum(2), cm.sum(1)
    union = n_ref + n_pred - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    n_ref = n_ref.copy()
    n_ref[:, 0] = 0.0
    total = n_ref.sum(1, keepdims=True)
    weights = np.divide(n_ref, total, out=np.zeros_like(n_ref), where=total > 0)
    return (weights * iou).sum(1).astype(np.float32)


@torch.no_grad()
def proto_from_predictions(
    labels_s: Tensor, conf_s: Tensor, labels_t: Tensor, conf_t: Tensor, tau: float, k: int
) -> Tensor:
    """Same values as easiness_from_predictions, CPU-tuned: ONE bincount per pair (the other direction's confusion
    matrix is its transpose), numpy kernels on zero-copy views (torch's int64 CPU kernels and bincount are several
    times slower than numpy's), in-place index arithmetic, and count_nonzero for the ratios instead of a float mean.
    On a CUDA tensor the same plan would use torch ops on the device; it is only timed on the CPU here."""
    b = labels_s.shape[0]
    ys, yt = labels_s.cpu().numpy().reshape(b, -1), labels_t.cpu().numpy().reshape(b, -1)
    index = yt * k  # rows = teacher
    index += ys
    index += (np.arange(b) * (k * k)).reshape(b, 1)
    cm = np.bincount(index.ravel(), minlength=b * k * k).reshape(b, k, k).astype(np.float64)
    wiou_ref_t, wiou_ref_s = _wiou_from_cm(cm), _wiou_from_cm(cm.transpose(0, 2, 1))
    n = np.float32(ys.shape[1])
    ratio_s = np.count_nonzero(conf_s.cpu().numpy().reshape(b, -1) >= tau, axis=1).astype(np.float32) / n
    ratio_t = np.count_nonzero(conf_t.cpu().numpy().reshape(b, -1) >= tau, axis=1).astype(np.float32) / n
    out = np.float32(0.5) * (wiou_ref_t * ratio_t + wiou_ref_s * ratio_s)
    return torch.from_numpy(out).to(labels_s.device)


@torch.no_grad()
def proto_from_predictions_torch(
    labels_s: Tensor, conf_s: Tensor, labels_t: Tensor, conf_t: Tensor, tau: float, k: int
) -> Tensor:
    """The device version of the proto: one bincount per pair and count_nonzero ratios, all in torch."""
    b = labels_s.shape[0]
    index = labels_t.flatten(1) * k
    index += labels_s.flatten(1)
    index += torch.arange(b, device=index.device).view(b, 1) * (k * k)
    cm = torch.bincount(index.flatten(), minlength=b * k * k).view(b, k, k).double()
    out = []
    for m in (cm, cm.transpose(1, 2)):  # rows = teacher, then rows = student
        inter = m.diagonal(dim1=1, dim2=2)
        n_ref = m.sum(2)
        union = n_ref + m.sum(1) - inter
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
        n_ref = torch.cat([torch.zeros_like(n_ref[:, :1]), n_ref[:, 1:]], dim=1)
        total = n_ref.sum(1, keepdim=True)
        weights = torch.where(total > 0, n_ref / total.clamp_min(1), torch.zeros_like(n_ref))
        out.append((weights * iou).sum(1).float())
    n = labels_s[0].numel()
    ratio_s = torch.count_nonzero(conf_s >= tau, dim=(1, 2)).float() / n
    ratio_t = torch.count_nonzero(conf_t >= tau, dim=(1, 2)).float() / n
    return 0.5 * (out[0] * ratio_t + out[1] * ratio_s)


# ---------------------------------------------------------------------------------------------------------------
# Inputs and the measurement


def synthetic_logits(b: int, k: int, h: int, w: int, seed: int, device: str) -> tuple[Tensor, Tensor]:
    """Student and teacher logits with blob-shaped regions that mostly agree (easiness about 0.3-0.4 at the defaults).

    The last image's teacher predicts class 0 everywhere (if b > 1), exercising the all-excluded wIoU = 0 rule.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(b, k, max(2, h // 32), max(2, w // 32), generator=g) * 8.0
    fine_s = torch.randn(b, k, max(2, h // 8), max(2, w // 8), generator=g)
    fine_t = torch.randn(b, k, max(2, h // 8), max(2, w // 8), generator=g)

    def up(x: Tensor) -> Tensor:
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)

    base = up(coarse)
    logits_s, logits_t = base + up(fine_s), base + up(fine_t)
    if b > 1:
        logits_t[-1, 0] += 100.0
    return logits_s.to(device), logits_t.to(device)


def _ratio(slow: float, fast: float) -> float:
    return slow / fast if fast > 0 else float("inf")


def measure(b: int, k: int, h: int, w: int, tau: float, device: str, warmup: int, repeats: int) -> dict[str, Any]:
    sync = sync_fn(device)
    logits_s, logits_t = synthetic_logits(b, k, h, w, seed=b, device=device)
    conf_s, labels_s = confidence_and_labels(logits_s)
    conf_t, labels_t = confidence_and_labels(logits_t)
    proto = proto_from_predictions if device == "cpu" else proto_from_predictions_torch
    maps = (labels_s, conf_s, labels_t, conf_t, tau, k)

    values = {
        "full_ours": easiness(logits_s, logits_t, tau).cpu().numpy(),
        "full_reference": reference_easiness(logits_s, logits_t, tau),
        "post_ours": easiness_from_predictions(*maps).cpu().numpy(),
        "post_reference": reference_from_predictions(*maps),
        "post_lean": reference_from_predictions(*maps, variant="lean"),
        "post_proto": proto(*maps).cpu().numpy(),
    }
    diffs = {name: float(np.abs(v - values["full_ours"]).max()) for name, v in values.items() if name != "full_ours"}
    fns: dict[str, Callable[[], Any]] = {
        "softmax_max_2x_s": lambda: (confidence_and_labels(logits_s), confidence_and_labels(logits_t)),
        "full_ours_s": lambda: easiness(logits_s, logits_t, tau),
        "full_reference_s": lambda: reference_easiness(logits_s, logits_t, tau),
        "post_ours_s": lambda: easiness_from_predictions(*maps),
        "post_reference_s": lambda: reference_from_predictions(*maps),
        "post_lean_s": lambda: reference_from_predictions(*maps, variant="lean"),
        "post_proto_s": lambda: proto(*maps),
    }
    times = time_interleaved(fns, warmup=warmup, repeats=repeats, sync=sync)
    t = {name: median(v) for name, v in times.items()}
    return {
        "batch": b,
        **t,
        "speedup_full": _ratio(t["full_reference_s"], t["full_ours_s"]),
        "speedup_post": _ratio(t["post_reference_s"], t["post_ours_s"]),
        "speedup_post_vs_lean": _ratio(t["post_lean_s"], t["post_ours_s"]),
        "speedup_post_proto": _ratio(t["post_reference_s"], t["post_proto_s"]),
        "max_abs_diff_vs_ours": diffs,
        "max_abs_diff": max(diffs.values()),
        "equal": max(diffs.values()) <= TOLERANCE,
        "easiness_mean": float(values["full_ours"].mean()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--height", type=int, default=769)
    parser.add_argument("--width", type=int, default=769)
    parser.add_argument("--tau", type=float, default=0.7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_common_flags(parser, NAME)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.classes, args.height, args.width = [2], 5, 65, 97
        args.threads = args.threads or 1
    warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 1)
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 5)
    set_threads(args.threads)
    settings = {
        "batch_sizes": args.batch_sizes,
        "classes": args.classes,
        "height": args.height,
        "width": args.width,
        "tau": args.tau,
        "ignore_class0": True,
        "device": args.device,
        "warmup": warmup,
        "repeats": repeats,
        "statistic": "median wall time, methods interleaved round-robin",
        "smoke": args.smoke,
        "threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
    }
    print(header_lines(NAME, settings), flush=True)
    rows = [
        measure(b, args.classes, args.height, args.width, args.tau, args.device, warmup, repeats)
        for b in args.batch_sizes
    ]
    table = format_table(
        [
            "B",
            "(a) full: ours ms",
            "reference ms",
            "speed-up",
            "(b) post-softmax: ours ms",
            "reference ms",
            "speed-up",
            "max abs diff",
            "equal",
        ],  # fmt: skip
        [
            [
                r["batch"],
                1e3 * r["full_ours_s"],
                1e3 * r["full_reference_s"],
                f"{r['speedup_full']:.2f}x",
                1e3 * r["post_ours_s"],
                1e3 * r["post_reference_s"],
                f"{r['speedup_post']:.2f}x",
                f"{r['max_abs_diff']:.2g}",
                "yes" if r["equal"] else "NO",
            ]  # fmt: skip
            for r in rows
        ],
    )
    context = format_table(
        [
            "B",
            "softmax+max x2 ms",
            "share of (a) ours",
            "lean loop ms",
            "ours vs lean",
            "proto ms",
            "proto vs reference",
        ],
        [
            [
                r["batch"],
                1e3 * r["softmax_max_2x_s"],
                f"{100 * r['softmax_max_2x_s'] / r['full_ours_s']:.0f}%",
                1e3 * r["post_lean_s"],
                f"{r['speedup_post_vs_lean']:.2f}x",
                1e3 * r["post_proto_s"],
                f"{r['speedup_post_proto']:.2f}x",
            ]  # fmt: skip
            for r in rows
        ],
    )
    print(table)
    print()
    print(context, flush=True)
    notes = [
        "(a) includes two softmax+max passes, identical work on both sides; (b) starts from the same label/conf maps",
        "reference: device softmax/max, .cpu().numpy() copies, a per-image Python loop: masked np.bincount, class"
        " frequencies counted class by class, NaN weights + nansum (written from docs/algorithm.md §2, not copied)",
        "lean: the per-image numpy loop with one bincount per direction and frequencies from the histogram rows",
        "proto: one bincount per pair (the other direction is the transpose), count_nonzero ratios; numpy on CPU",
        "ratios are medians of wall time within one run; CPU timings depend on the load (machine.load_average_1_5_15)",
    ]
    path = write_json(args.json, NAME, settings, rows, notes)
    print(f"wrote {path}")
    if not all(r["equal"] for r in rows):
        print(f"error: values differ by more than {TOLERANCE}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
