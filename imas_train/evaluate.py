"""Validation during training: sliding-window prediction, per-image counts gathered across processes, mIoU, the
best-teacher selection, and the teacher artifacts (sidecar `TeacherMeta`) for the best and the final model.

Every val image is scored exactly once on any number of processes (ALGORITHM.md §10, "Val sampling"): the val
loader is prepared by Accelerate, which pads the last round of batches with duplicates so all processes take part;
``gather_for_metrics`` drops those duplicates again. Counts are gathered per image as (B, C) rows and summed only
afterwards, which is what makes the duplicate removal possible.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from imas_core.artifacts import TeacherMeta
from imas_core.constants import IMAGENET_MEAN, IMAGENET_STD
from imas_core.scores import miou as reduce_miou
from imas_core.tiling import default_stride
from imas_core.typed import to_dict
from imas_train.checkpoint import save_teacher
from imas_train.config import TrainConfig
from imas_train.data import Datasets
from imas_train.metrics import intersection_union
from imas_train.plots import plot_easiness, plot_miou
from imas_train.sliding_window import EvalProtocol, predict_sliding
from imas_train.state import Progress

__all__ = ["EvalResult", "evaluate", "save_artifact", "validate"]


@dataclass(frozen=True)
class EvalResult:
    """Scores of one evaluation, identical on every process.

    Attributes:
        miou: mean IoU over the classes with a non-empty union, in [0, 1].
        per_class: (C,) float64 IoU, NaN for classes absent from both prediction and ground truth.
        inter, union: (C,) int64 counts summed over the val set.
        indices: dataset index of every scored image, sorted (each exactly once).
    """

    miou: float
    per_class: np.ndarray
    inter: np.ndarray
    union: np.ndarray
    indices: list[int]

    @property
    def num_images(self) -> int:
        return len(self.indices)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    accelerator: Accelerator,
    *,
    num_classes: int,
    window: int,
    stride: int | None,
    protocol: EvalProtocol,
) -> EvalResult:
    """Score `model` on the (prepared) val loader; every process must call this.

    Args:
        model: an unwrapped segmentation model (logits at input size); put in eval mode for the call and restored.
        loader: the val loader prepared by `accelerator` (batches on the device, padded duplicates marked).
        accelerator: gathers the per-image counts and supplies autocast.
        num_classes: C.
        window, stride, protocol: the sliding-window settings (``eval.*``).

    Returns:
        The scores, reduced over all processes.
    """
    was_training = model.training
    model.eval()
    inter_sum = torch.zeros(num_classes, dtype=torch.int64)
    union_sum = torch.zeros(num_classes, dtype=torch.int64)
    indices: list[int] = []
    try:
        for batch in loader:
            with accelerator.autocast():
                probs = predict_sliding(model, batch["image"], num_classes, window, stride, protocol)
            inter, union = intersection_union(probs.argmax(dim=1), batch["label"], num_classes)
            inter, union, index = accelerator.gather_for_metrics((inter, union, batch["index"]))
            inter_sum += inter.sum(dim=0).cpu()
            union_sum += union.sum(dim=0).cpu()
            indices.extend(int(i) for i in index.cpu())
    finally:
        model.train(was_training)
    miou, per_class = reduce_miou(inter_sum.numpy(), union_sum.numpy())
    return EvalResult(miou, per_class, inter_sum.numpy(), union_sum.numpy(), sorted(indices))


def validate(
    accelerator: Accelerator,
    cfg: TrainConfig,
    teacher: nn.Module,
    student: nn.Module | None,
    val_loader: Iterable[dict[str, Tensor]],
    data: Datasets,
    progress: Progress,
    epoch: int,
    iters: int,
) -> tuple[EvalResult, EvalResult | None]:
    """The training-time validation: score, record, log, keep the best teacher, redraw the plots.

    Every process calls this; only the main process writes ``best.safetensors`` (when the teacher mIoU improved),
    ``miou.png`` and ``easiness.png``.

    Args:
        accelerator: the run's accelerator (gathers counts, logs to TensorBoard).
        cfg: the experiment (``eval.*`` settings and the run folder).
        teacher: the model that is exported (the EMA teacher; the student for method 'supervised').
        student: also scored when given (``eval.student``).
        val_loader: the prepared val loader.
        data: class names, palette and split checksums for the artifact.
        progress: receives the scores (history, best mIoU and epoch).
        epoch: the epoch just finished.
        iters: L, iterations per epoch.

    Returns:
        The teacher's and the student's (or None) scores.
    """
    settings = {"num_classes": cfg.model.num_classes, "window": cfg.eval.window, "stride": cfg.eval.stride}
    result = evaluate(teacher, val_loader, accelerator, protocol=cfg.eval.protocol, **settings)
    result_s = None
    if student is not None:
        result_s = evaluate(student, val_loader, accelerator, protocol=cfg.eval.protocol, **settings)
    h = progress.history
    h["eval_epoch"].append(epoch)
    h["miou_teacher"].append(result.miou)
    h["miou_student"].append(result_s.miou if result_s is not None else None)  # type: ignore[arg-type]
    logs = {"val/miou_teacher": result.miou, "val/miou_student": result_s.miou if result_s else None}
    for name, iou in zip(data.class_names, result.per_class.tolist(), strict=True):
        logs[f"val/iou_teacher/{name.replace(' ', '_')}"] = None if math.isnan(iou) else iou
    accelerator.log({k: v for k, v in logs.items() if v is not None}, step=progress.step)
    improved = progress.best_miou is None or result.miou > progress.best_miou
    if improved:
        progress.best_miou, progress.best_epoch = result.miou, epoch
    if accelerator.is_main_process:
        run_dir = Path(cfg.run.output_dir)
        if improved:
            save_artifact(teacher, run_dir / "best.safetensors", cfg, data, progress, accelerator, iters=iters,
                          miou=result.miou, epoch=epoch)  # fmt: skip
        plot_miou(h, run_dir / "miou.png")
        if h["epoch"]:
            plot_easiness(h, run_dir / "easiness.png")
    return result, result_s


def save_artifact(
    model: nn.Module,
    path: Path,
    cfg: TrainConfig,
    data: Datasets,
    progress: Progress,
    accelerator: Accelerator,
    *,
    iters: int,
    miou: float,
    epoch: int | None = None,
) -> TeacherMeta:
    """Write a teacher artifact (safetensors + sidecar) with `checkpoint.save_teacher`; main process only.

    Args:
        model: the unwrapped model to save (the EMA teacher; the student for method 'supervised').
        path: ``<run>/teacher.safetensors`` (final) or ``<run>/best.safetensors`` (best epoch).
        cfg, data, progress, accelerator: where the sidecar's fields come from.
        iters: L, iterations per epoch.
        miou: this model's val mIoU (recorded as ``miou_final``).
        epoch: the evaluated epoch; None = the last trained epoch.

    Returns:
        The sidecar as written. Its ``model_config`` has ``pretrained`` None: the artifact holds every weight.
    """
    h = progress.history
    summary = {
        "method": cfg.method,
        "artifact_model": "ema_teacher" if cfg.method == "imas" else "student",
        "iterations": progress.step,
        "iters_per_epoch": iters,
        "wall_time_s": round(progress.wall_time, 1),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": accelerator.device.type,
        "easiness_mean_last_epoch": h["easiness_mean"][-1] if h["easiness_mean"] else None,
        "cutmix_rate_last_epoch": h["cutmix_rate"][-1] if h["cutmix_rate"] else None,
        "miou_history": [list(pair) for pair in zip(h["eval_epoch"], h["miou_teacher"], strict=True)],
    }
    meta = TeacherMeta(
        model_config=to_dict(dataclasses.replace(cfg.model, pretrained=None)),
        class_names=list(data.class_names),
        palette=[list(rgb) for rgb in data.palette],
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        weights_sha256="",  # filled in by save_teacher
        window=cfg.eval.window,
        stride=cfg.eval.stride or default_stride(cfg.eval.window),
        eval_protocol=cfg.eval.protocol,
        dataset=cfg.data.dataset,
        epoch=epoch if epoch is not None else max(0, progress.step - 1) // iters,
        step=progress.step,
        miou_final=miou,
        miou_best=progress.best_miou,
        best_epoch=progress.best_epoch,
        split_sha256=dict(data.split_sha256),
        training_summary=summary,
    )
    return save_teacher(model, path, meta)
