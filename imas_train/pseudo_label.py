"""Offline labelling of ST / ST++ (shared/methods/STPlusPlus.md §2.B-2.C): stability scores and TTA pseudo-masks.

* `reliability_score`: s = mean over the earlier checkpoints j < K of mIoU(M_j, M_K), the last checkpoint's argmax
  M_K as the reference; per-class IoU over all pixels, classes absent from both maps skipped (nanmean).
* `split_reliable`: sort by s descending (stable: ties keep their input order); the first ⌊fraction·N⌋ are reliable.
* `multiscale_flip_probs`: the sum of the softmax maps of every scale, with and without horizontal flip, each map
  predicted by the project's sliding-window inference (`sliding_window.predict_sliding`, the ``eval:`` protocol) on
  the bilinearly resized image (align_corners=True) and resized back to (H, W) the same way. The ``imas`` protocol
  sums overlapping windows; its sum is divided by the window count (`window_count_map`) so that every scale adds a
  probability map. No confidence threshold: every pixel gets a class.
* `write_pseudo_labels`: one palette PNG of class ids per image, each written atomically; a folder's ``stage.json``
  records the model (its sha256), the settings and, once every image is written, ``complete: true``. A labelling
  that stopped (crash, SIGTERM) resumes by writing only the missing PNGs, provided the model and settings are the
  same; otherwise the folder is relabelled from scratch.

Images are addressed by their index in the dataset's source (the unlabeled split list, or the demo's procedural
scenes, which exist only as indices); a PNG is named after the source's item name (``<name>.png``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from imas_core.atomic import atomic_write_bytes, atomic_write_json, stale_temporaries
from imas_core.errors import DataError, TrainingStopped
from imas_core.scores import miou
from imas_train.augment import normalise_images, to_chw_uint8
from imas_train.data.labels import label_png
from imas_train.data.sources import Source
from imas_train.metrics import intersection_union
from imas_train.sliding_window import EvalProtocol, predict_sliding, window_count_map

__all__ = [
    "file_names",
    "label_png",
    "multiscale_flip_probs",
    "predict_label",
    "read_label_png",
    "reliability_score",
    "reliability_scores",
    "split_reliable",
    "write_pseudo_labels",
]

log = logging.getLogger(__name__)
SIDECAR = "stage.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def reliability_score(preds: Sequence[Tensor], num_classes: int) -> float:
    """Stability of one image's predictions across K checkpoints (STPlusPlus.md §2.B, §7 oracle 1).

    Args:
        preds: K >= 2 label maps (H, W) of the checkpoints in training order; the last is the reference M_K.
        num_classes: C.

    Returns:
        mean over j < K of the mIoU of M_j against M_K (classes with an empty union skipped).
    """
    if len(preds) < 2:
        raise ValueError(f"need at least 2 checkpoint predictions, got {len(preds)}")
    ref = preds[-1].unsqueeze(0)
    scores = []
    for pred in preds[:-1]:
        inter, union = intersection_union(pred.unsqueeze(0), ref, num_classes)
        value, _ = miou(inter[0].cpu().numpy(), union[0].cpu().numpy())
        scores.append(value)
    return float(np.mean(scores))


def split_reliable(ids: Sequence[int], scores: Sequence[float], fraction: float) -> tuple[list[int], list[int]]:
    """(reliable, unreliable): `ids` by score descending, ties in input order; the first ⌊fraction·N⌋ are reliable
    (STPlusPlus.md §2.B, §7 oracle 2: N = 7, fraction 0.5 -> 3 and 4)."""
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} ids but {len(scores)} scores")
    order = sorted(range(len(ids)), key=lambda i: -scores[i])  # sorted() is stable
    ranked = [ids[i] for i in order]
    cut = int(len(ids) * fraction)
    return ranked[:cut], ranked[cut:]


def _probs(
    model: Callable[[Tensor], Tensor],
    image: Tensor,
    num_classes: int,
    window: int,
    stride: int | None,
    protocol: EvalProtocol,
) -> Tensor:
    """Per-pixel class probabilities of (1, 3, h, w) by sliding-window inference (summing protocols normalised)."""
    probs = predict_sliding(model, image, num_classes, window, stride, protocol)
    if protocol == "imas":
        count = window_count_map(image.shape[2], image.shape[3], window, stride, protocol).to(probs.device)
        probs = probs / count
    return probs


@torch.no_grad()
def multiscale_flip_probs(
    model: Callable[[Tensor], Tensor],
    image: Tensor,
    scales: Sequence[float],
    *,
    flip: bool = True,
    num_classes: int,
    window: int,
    stride: int | None = None,
    protocol: EvalProtocol = "whole",
) -> Tensor:
    """The ST++ test-time augmentation (STPlusPlus.md §2.C): the sum of 2·len(scales) (len(scales) without flip)
    probability maps of a normalised (1, 3, H, W) image, (1, C, H, W) float32; the model must be in eval mode.

    Scale s resizes to (⌊H·s⌋, ⌊W·s⌋), bilinear, align_corners=True; each map is resized back the same way.
    """
    _, _, h, w = image.shape
    total = torch.zeros((image.shape[0], num_classes, h, w), dtype=torch.float32, device=image.device)
    for s in scales:
        size = (max(1, int(h * s)), max(1, int(w * s)))
        x = F.interpolate(image, size=size, mode="bilinear", align_corners=True) if size != (h, w) else image
        views = [x, x.flip(3)] if flip else [x]
        for k, view in enumerate(views):
            p = _probs(model, view, num_classes, window, stride, protocol)
            if k == 1:
                p = p.flip(3)
            if size != (h, w):
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=True)
            total += p
    return total


def predict_label(model: nn.Module, rgb: np.ndarray, settings: dict[str, Any], device: torch.device) -> Tensor:
    """The label map (H, W) int64 of an RGB uint8 (H, W, 3) image: TTA when ``settings['scales']`` is set, else one
    single-scale sliding-window pass."""
    image = normalise_images(to_chw_uint8(rgb).unsqueeze(0).to(device))
    common = {"num_classes": settings["num_classes"], "window": settings["window"], "stride": settings["stride"],
              "protocol": settings["protocol"]}  # fmt: skip
    if settings.get("scales"):
        probs = multiscale_flip_probs(model, image, settings["scales"], flip=settings["flip"], **common)
    else:
        probs = _probs(model, image, **common)
    return probs[0].argmax(dim=0)


@torch.no_grad()
def reliability_scores(
    models: Sequence[nn.Module],
    source: Source,
    indices: Sequence[int],
    settings: dict[str, Any],
    device: torch.device,
    *,
    progress: Callable[[int], None] | None = None,
    stop: Callable[[], str | None] | None = None,
) -> list[float]:
    """`reliability_score` of every image in `indices` under the K checkpoint `models` (eval mode, single scale)."""
    scores = []
    for index in indices:
        image, _ = source.load(index, with_label=False)
        preds = [predict_label(m, image, {**settings, "scales": None}, device) for m in models]
        scores.append(reliability_score(preds, settings["num_classes"]))
        if progress is not None:
            progress(1)
        if stop is not None and (name := stop()) is not None:
            raise TrainingStopped(f"stopped by {name} while scoring reliability; continue with --resume auto", name)
    return scores


def read_label_png(path: Path) -> np.ndarray:
    """The class ids (H, W) uint8 of a pseudo-mask PNG."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise DataError(f"{path}: a pseudo-mask must be a palette or grayscale PNG, got mode {img.mode}")
            return np.array(img, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"{path}: cannot read the pseudo-mask ({err}); delete it and resume to relabel it") from err


def file_names(source: Source, indices: Sequence[int]) -> list[str]:
    """``<name>.png`` of every index (the source's item name, unsafe characters replaced); DataError on a clash."""
    names = [_UNSAFE.sub("_", source.name(i)) + ".png" for i in indices]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        twice = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise DataError(f"two unlabeled items share the pseudo-mask name {twice!r}; give them distinct names")
    return names


@torch.no_grad()
def write_pseudo_labels(
    model: nn.Module,
    source: Source,
    indices: Sequence[int],
    folder: Path,
    *,
    settings: dict[str, Any],
    palette: Sequence[Sequence[int]],
    model_sha256: str,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    stop: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """Pseudo-label `indices` of `source` with `model` (eval mode) into `folder`; resumable (module docstring).

    Args:
        model: the labelling model, in eval mode on `device`.
        source: the unlabeled images (`data.sources.Source`), addressed by index.
        indices: which of them to label.
        folder: the output folder: ``<name>.png`` per image and ``stage.json``.
        settings: num_classes, window, stride, protocol, scales, flip.
        palette: the classes' colours, stored in every PNG.
        model_sha256: identifies the model in the sidecar (a resume with another model relabels).
        progress: called with 1 after every image.
        stop: returns a signal name when the labelling must stop (then TrainingStopped after the current image).

    Returns:
        The sidecar as written (``complete: true``; ``items``: [[index, file name], ...]).
    """
    names = file_names(source, indices)
    for stale in stale_temporaries(folder):  # a write killed midway (the caller holds the run folder's lock)
        stale.unlink(missing_ok=True)
    plan = {"kind": "pseudo_labels", "complete": False, "model_sha256": model_sha256, "settings": dict(settings),
            "items": [[int(i), n] for i, n in zip(indices, names, strict=True)]}  # fmt: skip
    previous = _read_plan(folder)
    same = previous is not None and all(previous.get(k) == plan[k] for k in ("model_sha256", "settings", "items"))
    if not same:
        for old in folder.glob("*.png") if folder.is_dir() else []:
            old.unlink()
        atomic_write_json(folder / SIDECAR, plan)
    todo = [(i, n) for i, n in zip(indices, names, strict=True) if not (folder / n).is_file()]
    done = len(indices) - len(todo)
    if done:
        log.info(f"pseudo-labels: {done} of {len(indices)} already in {folder}; labelling the {len(todo)} missing")
        if progress is not None:
            progress(done)
    for index, name in todo:
        image, _ = source.load(index, with_label=False)
        label = predict_label(model, image, settings, device).to("cpu", torch.uint8).numpy()
        atomic_write_bytes(folder / name, label_png(label, palette))
        if progress is not None:
            progress(1)
        if stop is not None and (signal_name := stop()) is not None:
            raise TrainingStopped(f"stopped by {signal_name} while pseudo-labelling ({folder}); continue with "
                                  "--resume auto", signal_name)  # fmt: skip
    final = {**plan, "complete": True}
    atomic_write_json(folder / SIDECAR, final)
    return final


def _read_plan(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
