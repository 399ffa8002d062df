"""What to label next (``imas-train label-next``): rank a run's unlabeled images by how hard they stayed.

iMAS measures, for every unlabeled image and every epoch, how much the student and the EMA teacher agree: the
easiness e (`imas_train.imas.easiness_from_predictions`; the loop writes ``<run>/easiness/epoch_XXX.csv``, columns
``index,easiness``, where ``index`` is the image's position in the unlabeled list, i.e. its line among the list's
entries, or the demo's unlabeled scene number). This module turns that record into a labelling order:

* `read_easiness`: the per-image, per-epoch matrix (NaN where an image was not seen in an epoch; an image seen
  twice in one epoch, e.g. padding duplicates of a multi-process run, gets its mean).
* `summarise`: over the last ``window`` epochs, the mean easiness, its trend (least-squares slope per epoch) and the
  latest value seen ("easiness now").
* `scores` / `rank`: the ranking rules; lower score = label first. ``last`` (the default): the latest epoch's
  easiness; ``mean``: the mean over the last `window` epochs (5), so an image that stayed hard ranks before one
  that was hard once; ``projected``: the fitted line's value one epoch ahead (mean plus trend), which ranks an image
  that is still getting easier after one that is not. Chosen on the demo (benchmarks/label_next.py, README "What
  to label next"): labelling the top 16 and training again, ``mean`` fell below 16 random images at all three seeds
  (-2.03 ± 1.59 mIoU points against the mean of three random draws), ``last`` and ``projected`` tied with random
  (-0.24 ± 1.17, -0.34 ± 1.46); ``mean`` matches the base teacher's true per-image mIoU best (Spearman 0.32-0.51),
  so it is the rule for seeing where the model stays wrong, ``last`` the default for picking what to label.
* `model_agreement`: the same easiness, now from the saved artifacts (the teacher and the student on each whole
  unlabeled image, sliding-window as the teacher was validated), plus the share of pixels where their labels differ,
  the teacher's confident share and its predicted class mix. This is how runs of methods that write no easiness
  record (any two models: a CPS pair, a supervised run's best and final model) are ranked: one snapshot, no trend.
* `move_to_labeled` / `write_split_lists`: new ``labeled.txt`` / ``unlabeled.txt`` that move the chosen entries,
  verbatim, from the unlabeled to the labeled list (the formats `data.lists.read_list` reads).

The math is pure (numpy in, numpy out); `build_report` loads the run and the models, and `cli` prints.

Decisions where the requirement was silent: the per-epoch value is measured on a random weak crop, the model columns
on the whole image (the teacher's validation window, stride and protocol), so the two need not agree; the default
student is the newest checkpoint's (`state/latest`), taken at the same iteration as ``teacher.safetensors`` in a
finished run; the threshold is the run's ``imas.tau`` (``--tau`` otherwise, no guessed default); a run of the
built-in demo dataset is ranked, but has no lists to rewrite.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imas_core.atomic import atomic_write_bytes, atomic_write_text
from imas_core.errors import ArtifactError, ConfigError, DataError

__all__ = [
    "RULES",
    "DEFAULT_RULE",
    "DEFAULT_WINDOW",
    "EasinessHistory",
    "Summary",
    "Agreement",
    "Report",
    "read_easiness",
    "summarise",
    "scores",
    "rank",
    "model_agreement",
    "load_student",
    "student_file",
    "move_to_labeled",
    "write_split_lists",
    "report_csv",
    "build_report",
    "sheet_rows",
    "write_report_files",
    "chosen_split_lists",
    "add_arguments",
    "run_command",
]

RULES = ("mean", "last", "projected")
DEFAULT_RULE = "last"  # chosen on the demo: see the module docstring
DEFAULT_WINDOW = 5  # epochs: a third of the demo's 15, long enough to average the per-epoch crop noise
_CSV_NAME = re.compile(r"^epoch_(\d+)\.csv$")
_DEMO_HAS_NO_LISTS = (
    "--write-splits: the run's dataset 'demo' renders its scenes and reads no split lists, so there is nothing to "
    'move; write the scenes as a folder dataset with split lists and train on it (README "What to label next"), '
    "then --write-splits works"
)


# ---------------------------------------------------------------------------------------------------------------
# The easiness record and the ranking rules (pure)


@dataclass(frozen=True)
class EasinessHistory:
    """Per-image easiness per recorded epoch: ``values[i, j]`` is image i's easiness in epoch ``epochs[j]``."""

    epochs: np.ndarray  # (E,) int64, ascending
    values: np.ndarray  # (N, E) float64, NaN where the image was not seen that epoch


def read_easiness(folder: Path, num_images: int | None = None) -> EasinessHistory:
    """Read ``<run>/easiness/epoch_XXX.csv`` into an `EasinessHistory`.

    Args:
        folder: the ``easiness`` folder of a run.
        num_images: N, the length of the unlabeled list; None = 1 + the largest index recorded.

    Raises:
        DataError: no CSV in the folder, a malformed row, or an index outside 0..N-1 (the run's unlabeled list
            changed since it was trained).
    """
    files = sorted((int(m.group(1)), p) for p in Path(folder).glob("epoch_*.csv") if (m := _CSV_NAME.match(p.name)))
    if not files:
        raise DataError(f"{folder}: no easiness/epoch_XXX.csv; the run recorded no easiness (method without an EMA "
                        "teacher, or run.easiness_csv false): rank from the models instead (--no-history)")  # fmt: skip
    columns: list[tuple[np.ndarray, np.ndarray]] = []
    for _, path in files:
        index, value = _read_csv(path)
        columns.append((index, value))
    n = num_images if num_images is not None else 1 + max(int(c[0].max(initial=-1)) for c in columns)
    values = np.full((n, len(files)), np.nan)
    for j, ((_, path), (index, value)) in enumerate(zip(files, columns, strict=True)):
        if index.size and (index.min() < 0 or index.max() >= n):
            raise DataError(f"{path}: image index {int(index.max())} outside the unlabeled list's 0..{n - 1}; was "
                            "the run trained on another unlabeled list?")  # fmt: skip
        total = np.bincount(index, weights=value, minlength=n)
        count = np.bincount(index, minlength=n)
        values[:, j] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return EasinessHistory(np.array([e for e, _ in files], dtype=np.int64), values)


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    if not rows or [c.strip() for c in rows[0]] != ["index", "easiness"]:
        raise DataError(f"{path}: expected the header 'index,easiness'")
    try:
        index = np.array([int(r[0]) for r in rows[1:] if r], dtype=np.int64)
        value = np.array([float(r[1]) for r in rows[1:] if r], dtype=np.float64)
    except (ValueError, IndexError) as err:
        raise DataError(f"{path}: malformed row ({err})") from err
    return index, value


@dataclass(frozen=True)
class Summary:
    """Per image, over the last `window` recorded epochs (NaN where an image has no value there)."""

    now: np.ndarray  # (N,) the latest easiness seen in the window
    mean: np.ndarray  # (N,) mean easiness
    trend: np.ndarray  # (N,) least-squares slope, easiness per epoch (NaN with fewer than 2 values)
    seen: np.ndarray  # (N,) int64, epochs of the window in which the image was seen
    epochs: np.ndarray  # (W,) the epochs of the window
    projected: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))  # (N,) fitted value one epoch on


def summarise(history: EasinessHistory, window: int = DEFAULT_WINDOW) -> Summary:
    """Mean, trend and latest easiness of each image over the last `window` recorded epochs."""
    if window < 1:
        raise ConfigError(f"--window must be >= 1 epoch, got {window}")
    x = history.epochs[-window:].astype(np.float64)
    y = history.values[:, -window:]
    seen = np.isfinite(y)
    count = seen.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.where(seen, y, 0.0).sum(1) / np.maximum(count, 1), np.nan)
        xm = np.where(seen, x, 0.0).sum(1) / np.maximum(count, 1)
        dx = np.where(seen, x[None, :] - xm[:, None], 0.0)
        dy = np.where(seen, y - mean[:, None], 0.0)
        sxx = (dx * dx).sum(1)
        trend = np.where((count >= 2) & (sxx > 0), (dx * dy).sum(1) / np.where(sxx > 0, sxx, 1.0), np.nan)
    last_seen = np.where(seen.any(1), seen.shape[1] - 1 - np.argmax(seen[:, ::-1], axis=1), 0)
    now = np.where(count > 0, y[np.arange(y.shape[0]), last_seen], np.nan)
    next_epoch = (x[-1] + 1.0) if x.size else 0.0
    projected = mean + np.nan_to_num(trend) * (next_epoch - xm)
    return Summary(now, mean, trend, count.astype(np.int64), history.epochs[-window:], projected)


def scores(summary: Summary, rule: str) -> np.ndarray:
    """The ranking score of each image under `rule` (lower = label first; NaN = never seen, ranked last)."""
    if rule == "mean":
        return summary.mean
    if rule == "last":
        return summary.now
    if rule == "projected":
        return summary.projected
    raise ConfigError(f"--rule must be one of {', '.join(RULES)}, got {rule!r}")


def rank(score: np.ndarray) -> np.ndarray:
    """Image indices, lowest score first (ties by index; NaN last)."""
    key = np.where(np.isfinite(score), score, np.inf)
    return np.lexsort((np.arange(score.size), key))


# ---------------------------------------------------------------------------------------------------------------
# Split lists


def move_to_labeled(
    labeled: Sequence[str], unlabeled: Sequence[str], chosen: Sequence[int]
) -> tuple[list[str], list[str]]:
    """The labeled list plus the chosen unlabeled entries (in the order chosen), and the unlabeled list without them.

    Raises:
        DataError: an index outside the unlabeled list, or chosen twice.
    """
    picked = list(chosen)
    if len(set(picked)) != len(picked):
        raise DataError(f"the chosen images repeat an index: {picked}")
    bad = [i for i in picked if not 0 <= i < len(unlabeled)]
    if bad:
        raise DataError(f"chosen index {bad[0]} outside the unlabeled list (0..{len(unlabeled) - 1})")
    gone = set(picked)
    return [*labeled, *(unlabeled[i] for i in picked)], [line for i, line in enumerate(unlabeled) if i not in gone]


def write_split_lists(out_dir: Path, labeled: Sequence[str], unlabeled: Sequence[str]) -> tuple[Path, Path]:
    """Write ``<out_dir>/labeled.txt`` and ``unlabeled.txt`` (one entry a line), atomically."""
    out_dir = Path(out_dir)
    paths = out_dir / "labeled.txt", out_dir / "unlabeled.txt"
    for path, lines in zip(paths, (labeled, unlabeled), strict=True):
        atomic_write_text(path, "".join(f"{line}\n" for line in lines))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Agreement of two saved models, on device, batched


@dataclass(frozen=True)
class Agreement:
    """Per image: the easiness of the two models (the training function), the share of pixels whose labels differ,
    the teacher's confident share and its predicted class mix; label maps only when asked for."""

    easiness: np.ndarray  # (N,)
    disagreement: np.ndarray  # (N,)
    teacher_confident: np.ndarray  # (N,)
    class_mix: np.ndarray  # (N, C) teacher's predicted class shares
    labels_t: list[np.ndarray] | None = None  # (H, W) uint8 per image
    labels_s: list[np.ndarray] | None = None


def _same_size_batches(images: Iterator[np.ndarray], batch: int) -> Iterator[list[np.ndarray]]:
    """Consecutive images grouped into batches of at most `batch` images of one size."""
    group: list[np.ndarray] = []
    for image in images:
        if group and (len(group) == batch or image.shape != group[0].shape):
            yield group
            group = []
        group.append(image)
    if group:
        yield group


@torch.no_grad()
def model_agreement(
    teacher: nn.Module,
    student: nn.Module,
    images: Iterator[np.ndarray],
    *,
    num_classes: int,
    tau: float,
    ignore_class0: bool,
    window: int | tuple[int, int],
    stride: int | tuple[int, int] | None,
    protocol: str,
    device: torch.device | str = "cpu",
    batch: int = 16,
    keep_labels: bool = False,
) -> Agreement:
    """Easiness and disagreement of `student` against `teacher` on each RGB uint8 (H, W, 3) image, in order.

    Both models predict whole images as the teacher was validated (`predict_sliding` with its window, stride and
    protocol); e is `imas.easiness_from_predictions` on their argmax and max-probability maps, batched on
    `device`, as in training (there on the weak crop, here on the whole image).
    """
    from imas_train.augment import normalise_images
    from imas_train.imas import easiness_from_predictions
    from imas_train.sliding_window import predict_sliding

    out: dict[str, list[np.ndarray]] = {"e": [], "d": [], "c": [], "mix": []}
    labels_t: list[np.ndarray] = []
    labels_s: list[np.ndarray] = []
    teacher.eval()
    student.eval()
    for group in _same_size_batches(images, batch):
        x = torch.from_numpy(np.stack([g.transpose(2, 0, 1) for g in group])).to(device)
        x = normalise_images(x)
        probs_t = predict_sliding(teacher, x, num_classes, window, stride, protocol)  # type: ignore[arg-type]
        probs_s = predict_sliding(student, x, num_classes, window, stride, protocol)  # type: ignore[arg-type]
        if protocol == "imas":  # summed over windows: the per-pixel mean probability is what tau compares with
            from imas_train.sliding_window import window_count_map

            count = window_count_map(x.shape[2], x.shape[3], window, stride, "imas").to(x.device)
            probs_t, probs_s = probs_t / count, probs_s / count
        conf_t, lab_t = probs_t.max(1)
        conf_s, lab_s = probs_s.max(1)
        e = easiness_from_predictions(lab_s, conf_s, lab_t, conf_t, tau, num_classes, ignore_class0)
        out["e"].append(e.cpu().numpy())
        out["d"].append((lab_t != lab_s).float().mean((1, 2)).cpu().numpy())
        out["c"].append((conf_t >= tau).float().mean((1, 2)).cpu().numpy())
        hist = torch.stack([torch.bincount(m.flatten(), minlength=num_classes) for m in lab_t]).double()
        out["mix"].append((hist / hist.sum(1, keepdim=True)).cpu().numpy())
        if keep_labels:
            labels_t += list(lab_t.to(torch.uint8).cpu().numpy())
            labels_s += list(lab_s.to(torch.uint8).cpu().numpy())
    if not out["e"]:
        raise DataError("no unlabeled image to score")
    return Agreement(
        np.concatenate(out["e"]).astype(np.float64),
        np.concatenate(out["d"]).astype(np.float64),
        np.concatenate(out["c"]).astype(np.float64),
        np.concatenate(out["mix"]),
        labels_t if keep_labels else None,
        labels_s if keep_labels else None,
    )


def student_file(path: Path, method: str | None = None) -> Path:
    """The weights file `load_student` reads for `path` (a run folder or checkpoint directory resolved to its
    ``model.safetensors``, ``model_1.safetensors`` for CPS; a file as it is)."""
    path = Path(path)
    if not path.is_dir():
        return path
    latest = path / "state" / "latest"
    if latest.is_file():
        path = path / "state" / latest.read_text().strip()
    name = "model_1.safetensors" if method == "cps" else "model.safetensors"
    if not (path / name).is_file():
        raise ArtifactError(f"{path}: no {name}; pass --student a checkpoint directory (state/step-*), its "
                            "model*.safetensors or a teacher-style artifact")  # fmt: skip
    return path / name


def load_student(path: Path, like: nn.Module, method: str | None = None) -> nn.Module:
    """A second model for `model_agreement`, with `like`'s architecture.

    `path` is a teacher-style artifact (``X.safetensors`` with ``X.json`` beside it), a bare state dict (keys
    optionally prefixed ``model.``, as in a checkpoint's ``model.safetensors``), a checkpoint directory
    (``state/step-*``) or a run folder (its newest checkpoint, ``state/latest``). In a checkpoint the student is
    ``model.safetensors``; for method ``cps`` the second network, ``model_1.safetensors``.

    Raises:
        ArtifactError: nothing loadable at `path`, or weights that do not fit the architecture.
    """
    import copy

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = student_file(path, method)
    if path.with_suffix(".json").is_file() and path.name != "model.safetensors":
        from imas_train.teacher_artifact import load_teacher

        model, _ = load_teacher(path)
        return model
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{path}: not a readable safetensors file ({err})") from err
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    model = copy.deepcopy(like).cpu()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"{path}: the weights do not fit the teacher's architecture ({str(err)[:400]})") from err
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    """A ranked run: one row per unlabeled image, in rank order, and what was used."""

    rows: list[dict[str, object]]
    order: np.ndarray  # dataset indices, rank order
    rule: str
    window: int
    epochs: np.ndarray  # the epochs the summary covers (empty without a history)
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    source: object  # the unlabeled Source (images for the contact sheet)
    list_entries: list[str] | None  # the unlabeled list's lines (None for the demo dataset)
    labeled_entries: list[str] | None
    agreement_settings: dict[str, object] = field(default_factory=dict)


def _fmt(value: float, digits: int = 4) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def report_csv(report: Report) -> str:
    """The ranked CSV: rank, index, name, image, label_path, easiness_now, easiness_mean, trend, epochs_seen,
    score, easiness_models, disagreement, teacher_confident, then one ``mix_<class>`` column per class."""
    mix = [f"mix_{name.replace(' ', '_')}" for name in report.class_names]
    header = ["rank", "index", "name", "image", "label_path", "easiness_now", "easiness_mean", "trend",
              "epochs_seen", "score", "easiness_models", "disagreement", "teacher_confident", *mix]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in report.rows:
        writer.writerow([
            row["rank"], row["index"], row["name"], row["image"], row["label_path"],
            _fmt(row["easiness_now"]), _fmt(row["easiness_mean"]), _fmt(row["trend"], 5), row["epochs_seen"],
            _fmt(row["score"]), _fmt(row["easiness_models"]), _fmt(row["disagreement"]),
            _fmt(row["teacher_confident"]), *(_fmt(v, 3) for v in row["class_mix"]),  # type: ignore[attr-defined]
        ])  # fmt: skip
    return buffer.getvalue()


def _entry_lines(path: Path | None) -> list[str] | None:
    from imas_train.data.lists import read_list

    return None if path is None else [" ".join(e.tokens) for e in read_list(path)]


def build_report(
    run_dir: Path,
    *,
    rule: str = DEFAULT_RULE,
    window: int = DEFAULT_WINDOW,
    teacher_path: Path | None = None,
    student_path: Path | None = None,
    use_history: bool = True,
    tau: float | None = None,
    device: str = "cpu",
    batch: int = 16,
) -> Report:
    """Rank the unlabeled images of the run in `run_dir` (its ``config.yaml`` names the data).

    With `use_history` and a recorded ``easiness/`` folder, `rule` ranks the record over the last `window` epochs;
    otherwise (or for a run without a record) the models' easiness on the whole images is the score. The model
    columns always come from `teacher_path` (default ``<run>/teacher.safetensors``) and `student_path` (default:
    the run's newest checkpoint).

    Raises:
        ConfigError: unknown rule, no tau (``imas.tau`` absent from the run's config and none given).
        DataError, ArtifactError: the run's data, record or models cannot be read.
    """
    from imas_train.config import load_config
    from imas_train.data import build_datasets
    from imas_train.teacher_artifact import load_teacher

    if rule not in RULES:
        raise ConfigError(f"--rule must be one of {', '.join(RULES)}, got {rule!r}")
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise DataError(f"{run_dir}: no config.yaml; --run must be a training run's folder (run.output_dir)")
    cfg = load_config(config_path)
    data = build_datasets(cfg.data, cfg.model.num_classes)
    if data.unlabeled is None:
        raise DataError(f"{config_path}: the run has no unlabeled list (data.unlabeled_list): nothing to rank")
    source = data.unlabeled.source
    n = len(source)
    if tau is None:
        if cfg.imas is None:
            raise ConfigError(f"{config_path}: no imas.tau in the run's config; give the confidence threshold with "
                              "--tau (0.95 VOC-like, 0.7 Cityscapes-like)")  # fmt: skip
        tau = cfg.imas.tau
    ignore_class0 = cfg.imas.ignore_class0 if cfg.imas is not None else True

    teacher_path = Path(teacher_path) if teacher_path is not None else run_dir / "teacher.safetensors"
    if not teacher_path.is_file():
        raise ArtifactError(f"{teacher_path}: no teacher artifact; is the run finished? (or pass --teacher)")
    teacher, meta = load_teacher(teacher_path)
    student_path = student_file(Path(student_path) if student_path is not None else run_dir, cfg.method)
    student = load_student(student_path, teacher)
    teacher, student = teacher.to(device), student.to(device)
    window_hw = tuple(meta.window) if isinstance(meta.window, list) else meta.window
    settings = {"num_classes": cfg.model.num_classes, "tau": tau, "ignore_class0": ignore_class0,
                "window": window_hw, "stride": meta.stride, "protocol": meta.eval_protocol,
                "device": device, "batch": batch}  # fmt: skip
    agree = model_agreement(teacher, student, (source.load(i, with_label=False)[0] for i in range(n)),
                            **settings)  # type: ignore[arg-type]  # fmt: skip

    easiness_dir = run_dir / "easiness"
    history = read_easiness(easiness_dir, n) if use_history and any(easiness_dir.glob("epoch_*.csv")) else None
    if history is not None:
        summary = summarise(history, window)
        score = scores(summary, rule)
        now, mean, trend, seen, epochs = summary.now, summary.mean, summary.trend, summary.seen, summary.epochs
    else:  # one snapshot from the models: no trend
        now = mean = score = agree.easiness
        trend, seen, epochs = np.full(n, np.nan), np.zeros(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    order = rank(score)

    entries = labeled = None
    resolve = None
    if cfg.data.dataset != "demo":
        from imas_train.data.lists import read_list
        from imas_train.data.sources import Resolver

        parsed = read_list(cfg.data.unlabeled_list)  # the entries the unlabeled dataset was built from, in order
        entries = [" ".join(e.tokens) for e in parsed]
        labeled = _entry_lines(cfg.data.labeled_list)
        resolver = Resolver(cfg.data, cfg.model.num_classes)

        def resolve(i: int) -> tuple[str, str]:  # the image, and the label path the toolkit reads once it exists
            sample = resolver(parsed[i], with_label=True)
            return str(sample.image), str(sample.label)

    rows = []
    for position, i in enumerate(order.tolist(), start=1):
        image, label = resolve(i) if resolve is not None else (source.name(i), "")
        rows.append({
            "rank": position, "index": i, "name": source.name(i), "image": image, "label_path": label,
            "easiness_now": float(now[i]), "easiness_mean": float(mean[i]), "trend": float(trend[i]),
            "epochs_seen": int(seen[i]), "score": float(score[i]), "easiness_models": float(agree.easiness[i]),
            "disagreement": float(agree.disagreement[i]), "teacher_confident": float(agree.teacher_confident[i]),
            "class_mix": agree.class_mix[i].tolist(),
        })  # fmt: skip
    return Report(rows, order, rule if history is not None else "models", window, epochs, data.class_names,
                  data.palette, source, entries, labeled,
                  settings | {"teacher": str(teacher_path), "student": str(student_path),
                              "teacher_model": teacher, "student_model": student})  # fmt: skip


def sheet_rows(report: Report, top: int) -> list[dict[str, object]]:
    """The top `top` rows with their image and both models' label maps, for the contact sheet."""
    picked = report.order[:top].tolist()
    s = report.agreement_settings
    images = [report.source.load(i, with_label=False)[0] for i in picked]  # type: ignore[attr-defined]
    agree = model_agreement(
        s["teacher_model"], s["student_model"], iter(images), num_classes=s["num_classes"], tau=s["tau"],
        ignore_class0=s["ignore_class0"], window=s["window"], stride=s["stride"], protocol=s["protocol"],
        device=s["device"], batch=s["batch"], keep_labels=True,
    )  # type: ignore[arg-type]  # fmt: skip
    assert agree.labels_t is not None and agree.labels_s is not None
    rows = []
    for k, row in enumerate(report.rows[:top]):
        rows.append(row | {"rgb": images[k], "labels_t": agree.labels_t[k], "labels_s": agree.labels_s[k]})
    return rows


def write_report_files(report: Report, out_dir: Path, top: int) -> tuple[Path, Path]:
    """``<out_dir>/label_next.csv`` (every image, ranked) and ``contact_sheet.png`` (the top `top`)."""
    from imas_train.contact_sheet import render_contact_sheet

    out_dir = Path(out_dir)
    csv_path = out_dir / "label_next.csv"
    atomic_write_text(csv_path, report_csv(report))
    sheet = out_dir / "contact_sheet.png"
    atomic_write_bytes(sheet, render_contact_sheet(sheet_rows(report, top), report.class_names, report.palette,
                                                   rule=report.rule, window=report.window))  # fmt: skip
    return csv_path, sheet


def chosen_split_lists(report: Report, top: int) -> tuple[list[str], list[str]]:
    """The new labeled and unlabeled lists that move the top `top` images.

    Raises:
        DataError: the run reads no split lists (the demo dataset renders its scenes).
    """
    if report.list_entries is None or report.labeled_entries is None:
        raise DataError(_DEMO_HAS_NO_LISTS)
    return move_to_labeled(report.labeled_entries, report.list_entries, report.order[:top].tolist())


# ---------------------------------------------------------------------------------------------------------------
# Command line (`imas-train label-next`; `cli` prints the lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``imas-train label-next``."""
    parser.add_argument("--run", type=Path, required=True, help="a finished training run's folder")
    parser.add_argument("--top", type=int, default=16, help="K images to label next (default 16)")
    parser.add_argument("--output", type=Path, default=None, help="report folder (default <run>/label_next)")
    parser.add_argument("--rule", choices=RULES, default=DEFAULT_RULE,
                        help="last (default): the latest epoch's easiness; mean: the mean over the last --window "
                        "epochs (the images that stayed hard); projected: the fitted trend's value one epoch "
                        "ahead")  # fmt: skip
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"epochs the rule looks back over (default {DEFAULT_WINDOW})")  # fmt: skip
    parser.add_argument(
        "--teacher", type=Path, default=None, help="teacher artifact (default <run>/teacher.safetensors)"
    )
    parser.add_argument("--student", type=Path, default=None,
                        help="second model: a teacher-style artifact, a checkpoint directory or its model*.safetensors "
                        "(default: the run's newest checkpoint's student; CPS: its second network)")  # fmt: skip
    parser.add_argument("--no-history", action="store_true",
                        help="rank by the two models' easiness on the whole images, ignoring <run>/easiness/ (runs of "
                        "methods that record no easiness are ranked so anyway)")  # fmt: skip
    parser.add_argument("--tau", type=float, default=None, help="confidence threshold (default: the run's imas.tau)")
    parser.add_argument(
        "--write-splits",
        type=Path,
        default=None,
        metavar="DIR",
        help="write DIR/labeled.txt and DIR/unlabeled.txt with the top K moved to the labeled list",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=16, help="images per forward (default 16)")


def run_command(args: argparse.Namespace) -> Iterator[str]:
    """``imas-train label-next``: rank, write the CSV and the contact sheet, optionally the split lists; yields the
    lines to print (one per stage, then the next command)."""
    import time

    if args.top < 1 or args.batch < 1:
        raise ConfigError(f"--top and --batch must be >= 1, got {args.top} and {args.batch}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_dir: Path = args.run
    if args.write_splits is not None and (run_dir / "config.yaml").is_file():  # refuse before scoring anything
        from imas_train.config import load_config

        if load_config(run_dir / "config.yaml").data.dataset == "demo":
            raise DataError(_DEMO_HAS_NO_LISTS)
    out_dir: Path = args.output or run_dir / "label_next"
    t0 = time.perf_counter()
    report = build_report(run_dir, rule=args.rule, window=args.window, teacher_path=args.teacher,
                          student_path=args.student, use_history=not args.no_history, tau=args.tau, device=device,
                          batch=args.batch)  # fmt: skip
    n, top = len(report.rows), min(args.top, len(report.rows))
    s = report.agreement_settings
    yield (f"label-next: {run_dir}: {n} unlabeled images scored by teacher {s['teacher']} and student {s['student']} "
           f"on {device} in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    if report.rule == "models":
        yield "ranked by the two models' easiness on the whole images (no easiness record used): no trend"
    else:
        yield (f"ranked by rule '{report.rule}' over epochs {report.epochs[0]}-{report.epochs[-1]} of the run's "
               "easiness record (lowest first: hardest)")  # fmt: skip
    csv_path, sheet = write_report_files(report, out_dir, top)
    from PIL import Image

    with Image.open(sheet) as picture:
        width, height = picture.size
    yield f"csv: {csv_path} ({n} rows, hardest first)"
    yield f"contact sheet: {sheet} (top {top}, {width}x{height} px)"
    for row in report.rows[: min(top, 5)]:
        yield (f"  #{row['rank']} {row['name']}: easiness mean {_fmt(row['easiness_mean'], 3)}, now "
               f"{_fmt(row['easiness_now'], 3)}, trend {_fmt(row['trend'], 4)}, disagreement "
               f"{_fmt(100 * float(row['disagreement']), 1)}%")  # type: ignore[arg-type]  # fmt: skip
    if args.write_splits is None:
        yield f"next: label them, then imas-train label-next --run {run_dir} --top {top} --write-splits DIR"
        return
    labeled, unlabeled = chosen_split_lists(report, top)
    paths = write_split_lists(args.write_splits, labeled, unlabeled)
    yield f"splits: {paths[0]} ({len(labeled)} entries), {paths[1]} ({len(unlabeled)} entries)"
    missing = [row["label_path"] for row in report.rows[:top] if not Path(str(row["label_path"])).is_file()]
    if missing:
        yield (f"label: {len(missing)} of the {top} moved images have no label yet; write them where the toolkit "
               f"reads them (label_path column of the csv), e.g. {missing[0]}")  # fmt: skip
    yield (f"next: imas-train --config {run_dir / 'config.yaml'} --set data.labeled_list={paths[0]} "
           f"data.unlabeled_list={paths[1]} --output-dir {run_dir}_next")  # fmt: skip
