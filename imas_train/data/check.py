"""Validate a configured dataset before training and report EVERY problem at once (pure library: no printing).

Checks: the split lists (missing, unparsable lines, empty, duplicate entries, labeled/unlabeled/val overlaps),
then every listed file: presence, full decoding (`Image.load()` catches truncated files), label mode (colour
label images are refused), image/label size, and label values against the dataset's label rule.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from imas_core.errors import DataError, ImasError
from imas_train.config import DataConfig
from imas_train.data.build import class_info
from imas_train.data.labels import LABEL_MODES, label_mode_message
from imas_train.data.lists import read_list
from imas_train.data.sources import Resolver, Sample

KINDS = (
    "config", "list", "empty", "duplicate", "overlap", "missing", "unreadable", "label_mode", "size_mismatch",
    "label_values",
)  # fmt: skip
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class Problem(NamedTuple):
    """One problem: the file (or `list:line`) it concerns, its kind (one of KINDS) and a readable message."""

    path: str
    kind: str
    message: str


@dataclass
class DataReport:
    """Result of `check_data`: `problems` (empty when the data is usable) and per-split entry counts."""

    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """A readable report, grouped by kind."""
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        if self.ok:
            return f"data check passed ({counts})"
        lines = [f"data check found {len(self.problems)} problem(s) ({counts})"]
        for kind in KINDS:
            group = [p for p in self.problems if p.kind == kind]
            if group:
                lines.append(f"{kind} ({len(group)}):")
                lines += [f"  {p.path}: {p.message}" for p in sorted(group)]
        return "\n".join(lines)


def _check_image(path: Path, where: str, out: list[Problem]) -> tuple[int, int] | None:
    if not path.is_file():
        out.append(Problem(str(path), "missing", f"image not found (listed at {where})"))
        return None
    try:
        with Image.open(path) as img:
            img.load()  # decode fully: a truncated file fails here, not in the middle of training
            return img.size
    except _DECODE_ERRORS as err:
        out.append(Problem(str(path), "unreadable", f"cannot decode image: {err}"))
        return None


def _check_label(sample: Sample, image_size: tuple[int, int] | None, out: list[Problem]) -> None:
    path, rule = sample.label, sample.rule
    assert path is not None and rule is not None
    if not path.is_file():
        out.append(Problem(str(path), "missing", f"label not found for {sample.image} (listed at {sample.where})"))
        return
    try:
        with Image.open(path) as img:
            if img.mode not in LABEL_MODES:
                out.append(Problem(str(path), "label_mode", label_mode_message(img.mode)))
                return
            raw = np.array(img, dtype=np.uint8)
            size = img.size
    except _DECODE_ERRORS as err:
        out.append(Problem(str(path), "unreadable", f"cannot decode label: {err}"))
        return
    if image_size is not None and size != image_size:
        message = f"label is {size[0]}x{size[1]} but image {sample.image} is {image_size[0]}x{image_size[1]}"
        out.append(Problem(str(path), "size_mismatch", message))
    bad = rule.invalid_values(raw)
    if bad:
        out.append(Problem(str(path), "label_values", f"values {bad[:10]} are not allowed; {rule.hint}"))


def _check_sample(sample: Sample) -> list[Problem]:
    out: list[Problem] = []
    size = _check_image(sample.image, sample.where, out)
    if sample.label is not None:
        _check_label(sample, size, out)
    return out


def _read_split(
    resolver: Resolver, key: str, path: Path | None, with_label: bool, problems: list[Problem]
) -> list[Sample]:
    if path is None:
        if key != "unlabeled":
            problems.append(Problem(f"data.{key}_list", "config", "not set"))
        return []
    line_problems: list[tuple[str, str]] = []
    try:
        entries = read_list(path, line_problems)
    except DataError as err:
        problems.append(Problem(str(path), "list", str(err)))
        return []
    problems += [Problem(where, "list", msg) for where, msg in line_problems]
    if not entries:
        problems.append(Problem(str(path), "empty", f"the {key} list has no entries"))
    samples, first_seen = [], {}
    for entry in entries:
        try:
            sample = resolver(entry, with_label=with_label)
        except DataError as err:
            problems.append(Problem(entry.where, "list", str(err)))
            continue
        if sample.image in first_seen:
            message = f"{sample.image} already listed at {first_seen[sample.image]}"
            problems.append(Problem(entry.where, "duplicate", message))
            continue
        first_seen[sample.image] = entry.where
        samples.append(sample)
    return samples


def check_data(
    cfg: DataConfig, num_classes: int, *, pretrained: Path | None = None, max_workers: int = 4
) -> DataReport:
    """Validate the configured dataset; returns every problem found (an empty list means ready to train).

    Args:
        cfg: the data section of the experiment.
        num_classes: model.num_classes.
        pretrained: model.pretrained, the backbone file training will read (None: trained from scratch).
        max_workers: threads decoding files (Pillow releases the GIL while decoding).
    """
    report = DataReport()
    if pretrained is not None and not Path(pretrained).is_file():
        report.problems.append(
            Problem(
                str(pretrained),
                "missing",
                "model.pretrained: backbone weight file not found (nothing is downloaded: put an ImageNet file "
                "there, or set model.pretrained to null to train from scratch)",
            )
        )
    try:
        class_info(cfg, num_classes)
        resolver = Resolver(cfg, num_classes) if cfg.dataset != "demo" else None
    except ImasError as err:
        report.problems.append(Problem("config", "config", str(err)))
        return report
    if resolver is None:  # the demo dataset is rendered: only its sizes can be wrong
        d = cfg.demo
        report.counts = {"labeled": d.num_labeled, "unlabeled": d.num_unlabeled, "val": d.num_val}
        if min(d.num_labeled, d.num_unlabeled, d.num_val, d.height, d.width) < 1:
            report.problems.append(Problem("data.demo", "config", "counts and sizes must be >= 1"))
        return report
    splits = {
        "labeled": _read_split(resolver, "labeled", cfg.labeled_list, True, report.problems),
        "unlabeled": _read_split(resolver, "unlabeled", cfg.unlabeled_list, False, report.problems),
        "val": _read_split(resolver, "val", cfg.val_list, True, report.problems),
    }
    report.counts = {key: len(samples) for key, samples in splits.items()}
    images = {key: {s.image for s in samples} for key, samples in splits.items()}
    for a, b in (("labeled", "unlabeled"), ("labeled", "val"), ("unlabeled", "val")):
        for image in sorted(images[a] & images[b]):
            report.problems.append(Problem(str(image), "overlap", f"listed in both the {a} and the {b} list"))
    todo = {(s.image, s.label): s for samples in splits.values() for s in samples}  # an image checked once
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        for found in pool.map(_check_sample, todo.values()):
            report.problems += found
    report.counts["files"] = sum(1 + (s.label is not None) for s in todo.values())
    return report
