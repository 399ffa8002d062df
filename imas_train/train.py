"""The iMAS training loop under Hugging Face Accelerate: one visible loop, phases commented (STYLE.md rule 5).

The same code path runs 1 CPU process, 1 GPU, N GPUs and multi-node jobs (``accelerate launch`` or ``torchrun``).
Choices that matter:

* The student is prepared (DDP when distributed) through `StudentForward`, so the one train-mode forward of each
  iteration goes through DDP. The teacher is a deepcopy made BEFORE SyncBN conversion and ``prepare``: a plain
  BatchNorm2d module in eval mode, never prepared, updated on every rank from the unwrapped student.
* SyncBatchNorm only with several processes on CUDA; CPU (gloo) multi-process runs keep per-process BN statistics.
* The train loaders are NOT prepared: `data.make_train_loader` already shards each epoch's stream by rank and seeds
  every sample from (seed, stream, epoch, position), which Accelerate's sampler wrapping would break. Batches are
  moved to the device here. The val loader IS prepared, so ``gather_for_metrics`` drops its padded duplicates.
* The LR is written into the param groups every iteration (no prepared scheduler). With gradient accumulation the
  optimizer and the EMA move on sync steps only, and mid-epoch checkpoints are taken on sync steps.
* The CutMix generator is seeded from (seed, rank, iteration): a resumed run repeats every draw (see `state`).
* ``method: supervised`` trains L_x on the labeled stream (epoch = one pass over it) without an EMA teacher; its
  "teacher" artifact is the student itself (``training_summary.artifact_model = "student"``).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accelerate
import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

import imas_core
from imas_core.atomic import atomic_write_json, atomic_write_text
from imas_core.errors import TrainingError
from imas_core.scores import format_iou_table
from imas_train.config import TrainConfig, dump_config
from imas_train.data import Datasets, build_datasets, iters_per_epoch, make_train_loader, make_val_loader
from imas_train.ema import EmaTeacher, ema_decay
from imas_train.evaluate import EvalResult, save_artifact, validate
from imas_train.models import build_model
from imas_train.optim import param_groups, scaled_lr, set_lrs
from imas_train.state import Progress, find_checkpoint, load_checkpoint, save_checkpoint
from imas_train.step import LOSS_KEYS, LossMeter, StudentForward, imas_step, step_generator, supervised_step

__all__ = ["TrainResult", "train"]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    teacher_path: Path
    miou_final: float
    miou_best: float | None
    best_epoch: int | None
    iterations: int
    wall_time: float


@dataclass
class _Parts:
    """Everything `_setup` builds once per session."""

    data: Datasets
    student: nn.Module  # the prepared StudentForward (DDP-wrapped when distributed)
    ema: EmaTeacher | None  # None for method 'supervised'
    optimizer: torch.optim.Optimizer
    val_loader: Any  # prepared: padded duplicates are dropped by gather_for_metrics
    stream_len: int  # global length of each training stream per epoch (N_u, or N_l for 'supervised')
    iters: int  # L, iterations per epoch
    total: int  # E * L: the span of the poly schedule
    stop: int  # the iteration this run ends at (optim.max_iters)


def train(cfg: TrainConfig, *, resume: str | None = None) -> TrainResult:
    """Train, evaluate and write the teacher artifact; every process of a launch calls this.

    Args:
        cfg: the experiment; ``cfg.run.output_dir`` is the run folder.
        resume: None = start fresh; "auto" = continue from ``<run>/state/latest`` when it exists (else start fresh);
            a path = that checkpoint directory (or a run folder, then as "auto" inside it).

    Returns:
        The final teacher's path and scores. Files: ``<run>/{teacher,best}.safetensors`` + ``.json``,
        ``config.yaml``, ``run.json``, ``state/``, ``easiness/epoch_XXX.csv``, ``easiness.png``, ``miou.png``,
        ``tensorboard/``.

    Raises:
        TrainingError: a non-finite loss (nothing is saved for that iteration), an unusable checkpoint, or a
            launch whose processes Accelerate cannot see.
        ConfigError, DataError, WeightsError: bad settings or data.
    """
    run_dir = Path(cfg.run.output_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and `accelerate launch`
    accelerator = Accelerator(
        cpu=launched > 1 and not torch.cuda.is_available(),  # Accelerate needs this for gloo multi-CPU runs
        mixed_precision=cfg.run.mixed_precision,  # None: the `accelerate launch` setting
        gradient_accumulation_steps=cfg.optim.grad_accum_steps,
        log_with="tensorboard" if cfg.run.tensorboard else None,
        project_dir=str(run_dir),
    )
    if accelerator.num_processes != launched:  # each process would otherwise train alone into the same folder
        raise TrainingError(f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}")
    say(accelerator, f"config: method {cfg.method}, dataset {cfg.data.dataset}, run {run_dir}")
    p = _setup(cfg, accelerator)
    rank, semi = accelerator.process_index, p.ema is not None

    # ---- resume: Accelerate state + EMA teacher + progress (see imas_train.state)
    progress = Progress()
    ckpt = find_checkpoint(run_dir, resume) if resume else None
    if ckpt is not None:
        load_checkpoint(accelerator, ckpt, p.ema, progress)
        say(accelerator, f"resume: {ckpt} (iteration {progress.step}, epoch {progress.step // p.iters})")
    elif resume:
        say(accelerator, "resume: no checkpoint found, starting from scratch")
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        atomic_write_json(run_dir / "run.json", _run_info(accelerator, ckpt))
    accelerator.init_trackers("tensorboard")
    accelerator.log({"config": dump_config(cfg)}, step=progress.step)

    last_eval: EvalResult | None = None
    meter, session_start = LossMeter(), time.time()
    bar = tqdm(total=p.stop, initial=progress.step, disable=not accelerator.is_main_process)
    try:
        for epoch in range(progress.step // p.iters, cfg.optim.epochs):
            if progress.step >= p.stop:
                break
            if progress.step == epoch * p.iters:
                progress.start_epoch(epoch)
            warmup = not semi or epoch < cfg.imas.sup_only_epochs  # L_x only
            loaders = _epoch_loaders(cfg, p, accelerator, epoch, start_batch=progress.step - epoch * p.iters,
                                     with_unlabeled=not warmup)  # fmt: skip
            epoch_end = min((epoch + 1) * p.iters, p.stop)
            for it in range(progress.step, epoch_end):
                # 0. schedule: poly LR over E * L, written into both param groups before the step
                set_lrs(p.optimizer, it, p.total, cfg.optim.poly_power)
                # 1. batches (train loaders are not prepared: already sharded per rank)
                batch_l = _to_device(next(loaders["labeled"]), accelerator.device, cfg.run.channels_last)
                with accelerator.accumulate(p.student):
                    # 2-8. forward and losses: L_x only in warm-up and 'supervised', else the iMAS iteration
                    if warmup:
                        out = supervised_step(p.student, batch_l, loss=cfg.loss,
                                              aux_labeled_only=cfg.model.aux_labeled_only,
                                              autocast=accelerator.autocast)  # fmt: skip
                    else:
                        batch_u = _to_device(next(loaders["unlabeled"]), accelerator.device, cfg.run.channels_last)
                        out = imas_step(p.student, p.ema.module, batch_l, batch_u,  # type: ignore[union-attr]
                                        imas=cfg.imas, loss=cfg.loss, generator=step_generator(cfg.run.seed, rank, it),
                                        aux_labeled_only=cfg.model.aux_labeled_only,
                                        autocast=accelerator.autocast)  # fmt: skip
                    _check_finite(out, it, accelerator, run_dir)
                    # 9. backward and SGD step (skipped by Accelerate on accumulation micro-batches)
                    accelerator.backward(out["loss"])
                    p.optimizer.step()
                    p.optimizer.zero_grad(set_to_none=True)
                # 10. EMA teacher from the UNWRAPPED student, after the optimizer step
                if semi and accelerator.sync_gradients:
                    decay = ema_decay(it, p.iters, cfg.imas.sup_only_epochs, cfg.imas.ema_decay)
                    p.ema.update(_plain(accelerator, p.student), decay)  # type: ignore[union-attr]
                    if accelerator.num_processes > 1 and accelerator.device.type != "cuda":
                        _broadcast_buffers(p.ema.module)  # type: ignore[union-attr]  # per-process BN: use rank 0's
                progress.step = it + 1
                # 11. log: per-image easiness gathered over processes; loss terms averaged over a window
                if "easiness" in out:
                    _gather_easiness(accelerator, progress, out)
                meter.add(out)
                bar.update(1)
                if progress.step % cfg.run.log_every == 0 or progress.step == epoch_end:
                    scalars = meter.flush(lambda t: accelerator.reduce(t.to(accelerator.device), "sum"))
                    scalars.update({f"lr_{g['name']}": g["lr"] for g in p.optimizer.param_groups})
                    accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=progress.step)
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", e=f"{scalars.get('easiness_mean', math.nan):.2f}")
                # checkpoint mid-epoch (the epoch end saves below)
                if accelerator.sync_gradients and progress.step % cfg.run.checkpoint_every == 0 and it + 1 < epoch_end:
                    _checkpoint(accelerator, run_dir, p.ema, progress, cfg, time.time() - session_start)
            # ---- epoch end: easiness records, evaluation (+ best teacher, plots), checkpoint
            csv = progress.close_epoch(epoch) if semi and not warmup else None
            if csv is not None and cfg.run.easiness_csv and accelerator.is_main_process:
                atomic_write_text(run_dir / "easiness" / f"epoch_{epoch:03d}.csv", csv)
            if (epoch + 1) % cfg.eval.every_epochs == 0 or progress.step >= p.stop:
                last_eval = _evaluate(accelerator, cfg, p, progress, epoch)
            if progress.step == (epoch + 1) * p.iters:
                progress.start_epoch(epoch + 1)
            _checkpoint(accelerator, run_dir, p.ema, progress, cfg, time.time() - session_start)
        bar.close()
        # ---- final artifact: the EMA teacher (the student itself for method 'supervised')
        if last_eval is None:  # resumed after the last checkpoint of a finished run
            last_eval = _evaluate(accelerator, cfg, p, progress, (progress.step - 1) // p.iters)
        progress.wall_time += time.time() - session_start
        teacher_path = run_dir / "teacher.safetensors"
        if accelerator.is_main_process:
            final = p.ema.module if semi else _plain(accelerator, p.student)  # type: ignore[union-attr]
            save_artifact(final, teacher_path, cfg, p.data, progress, accelerator, iters=p.iters, miou=last_eval.miou)
            best = (
                "n/a"
                if progress.best_miou is None
                else f"{100 * progress.best_miou:.2f}% at epoch {progress.best_epoch}"
            )
            say(accelerator, f"final teacher mIoU {100 * last_eval.miou:.2f}% (best {best})\n"
                f"{format_iou_table(last_eval.per_class, p.data.class_names)}")  # fmt: skip
            say(accelerator, f"artifact: {teacher_path} + teacher.json (best epoch: {run_dir / 'best.safetensors'})")
            say(accelerator, f"next: imas-export onnx --teacher {teacher_path} --output {run_dir / 'model.onnx'}")
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        for tracker in accelerator.trackers:
            tracker.finish()
    return TrainResult(run_dir, teacher_path, last_eval.miou, progress.best_miou, progress.best_epoch,
                       progress.step, progress.wall_time)  # fmt: skip


def say(accelerator: Accelerator, message: str) -> None:
    """One status line per stage, printed by the main process only (above the progress bar)."""
    if accelerator.is_main_process:
        tqdm.write(f"imas-train: {message}")


def _setup(cfg: TrainConfig, accelerator: Accelerator) -> _Parts:
    """Data, student, teacher, optimizer and val loader, in the order STYLE.md §4.4 prescribes."""
    world, b, semi = accelerator.num_processes, cfg.data.batch_size, cfg.method == "imas"
    # data: per-epoch streams sharded by rank; one epoch = one pass over N_u (N_l for 'supervised')
    data = build_datasets(cfg.data, cfg.model.num_classes)
    if semi and data.unlabeled is None:
        raise TrainingError("method 'imas' needs unlabeled data (data.unlabeled_list)")
    stream_len = len(data.unlabeled) if semi and data.unlabeled is not None else len(data.labeled)
    iters = iters_per_epoch(stream_len, world, b)
    if iters < 1:
        raise TrainingError(f"{stream_len} training images < {world} process(es) x batch {b}: no full iteration")
    total = cfg.optim.epochs * iters
    stop = min(total, cfg.optim.max_iters) if cfg.optim.max_iters is not None else total
    n_u = len(data.unlabeled) if data.unlabeled is not None else 0
    say(accelerator, f"data: {len(data.labeled)} labeled, {n_u} unlabeled, {len(data.val)} val images; "
        f"{iters} iterations/epoch x {cfg.optim.epochs} epochs = {total} iterations (running {stop})")  # fmt: skip
    # models: the same init on every rank, then per-rank seeds; the teacher is copied before SyncBN and prepare
    _seed(cfg.run.seed, cfg.run.deterministic)
    model = build_model(cfg.model)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    ema = EmaTeacher(copy.deepcopy(model).to(accelerator.device)) if semi else None
    _seed(cfg.run.seed + accelerator.process_index, cfg.run.deterministic)
    student: nn.Module = StudentForward(model)
    if world > 1 and accelerator.device.type == "cuda":  # gloo/CPU runs keep per-process BN statistics
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    global_batch = b * world * cfg.optim.grad_accum_steps
    lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.reference_global_batch, cfg.optim.lr_scaling)
    groups = param_groups(model, lr, cfg.optim.head_lr_mult, cfg.optim.weight_decay)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, nesterov=False)
    if cfg.run.compile:
        student = torch.compile(student)  # type: ignore[assignment]
    val_loader = make_val_loader(data.val, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers)
    student, optimizer, val_loader = accelerator.prepare(student, optimizer, val_loader)
    say(accelerator, f"devices: {world} process(es) on {accelerator.device.type}, precision "
        f"{accelerator.mixed_precision}; batch {b}+{b} per process, {global_batch} labeled per step; "
        f"lr backbone {lr:g}, head {lr * cfg.optim.head_lr_mult:g} ({cfg.optim.lr_scaling} scaling)")  # fmt: skip
    return _Parts(data, student, ema, optimizer, val_loader, stream_len, iters, total, stop)


def _epoch_loaders(
    cfg: TrainConfig, p: _Parts, accelerator: Accelerator, epoch: int, *, start_batch: int, with_unlabeled: bool
) -> dict[str, Iterator[dict[str, Tensor]]]:
    """This rank's iterators over the epoch's labeled (and unlabeled) stream, from batch `start_batch` on."""
    streams = {"labeled": p.data.labeled, "unlabeled": p.data.unlabeled if with_unlabeled else None}
    return {
        name: iter(make_train_loader(
            dataset, batch_size=cfg.data.batch_size, seed=cfg.run.seed, stream=name, epoch=epoch,
            rank=accelerator.process_index, world_size=accelerator.num_processes, length=p.stream_len,
            start_batch=start_batch, num_workers=cfg.data.num_workers,
        ))
        for name, dataset in streams.items()
        if dataset is not None
    }  # fmt: skip


def _plain(accelerator: Accelerator, student: nn.Module) -> nn.Module:
    """The segmentation model inside the prepared (DDP / compiled / autocast-wrapped) `StudentForward`."""
    return accelerator.unwrap_model(student, keep_torch_compile=False).model  # type: ignore[no-any-return]


def _broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's floating buffers (BN running statistics) to every rank, in one collective.

    Without SyncBN (multi-process CPU runs) each rank's student has its own BN statistics after its train-mode
    forward, so each rank's EMA teacher would drift apart; the teacher that is evaluated, checkpointed and exported
    must be the same everywhere.
    """
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    flat = torch.cat([b.flatten() for b in buffers])
    torch.distributed.broadcast(flat, src=0)
    for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        buffer.copy_(value.view_as(buffer))


def _seed(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _to_device(batch: dict[str, Tensor], device: torch.device, channels_last: bool) -> dict[str, Tensor]:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if channels_last:
        out = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in out.items()}
    return out


def _check_finite(out: dict[str, Tensor], it: int, accelerator: Accelerator, run_dir: Path) -> None:
    """Stop every process with TrainingError if any process has a non-finite loss term (before backward)."""
    terms = {k: out[k].detach().float() for k in LOSS_KEYS if k in out}
    bad = (~torch.isfinite(torch.stack(list(terms.values())))).any().float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        values = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        latest = run_dir / "state" / "latest"
        last = latest.read_text().strip() if latest.is_file() else "none"
        raise TrainingError(f"non-finite loss at iteration {it}: {values} (this process); stopped without saving. "
                            f"Last good checkpoint: {last}; lower optim.lr or check the data")  # fmt: skip


def _gather_easiness(accelerator: Accelerator, progress: Progress, out: dict[str, Tensor]) -> None:
    """Gather (easiness, dataset index, student ratio, CutMix fired) of every process's images to the main one."""
    e = out["easiness"].double()
    fired = out["cutmix_fired"].to(e).expand_as(e)
    rows = accelerator.gather(torch.stack([e, out["index"].to(e), out["ratio_s"].to(e), fired], 1))
    if accelerator.is_main_process:
        progress.add_images(rows.cpu().tolist())


def _evaluate(accelerator: Accelerator, cfg: TrainConfig, p: _Parts, progress: Progress, epoch: int) -> EvalResult:
    """Validate the teacher (the student too with ``eval.student``), keep the best teacher, print one line."""
    student = _plain(accelerator, p.student)
    teacher = p.ema.module if p.ema is not None else student
    extra = student if cfg.eval.student and p.ema is not None else None
    result, result_s = validate(accelerator, cfg, teacher, extra, p.val_loader, p.data, progress, epoch, p.iters)
    student_text = f", student {100 * result_s.miou:.2f}%" if result_s is not None else ""
    best = f"best {100 * (progress.best_miou or 0):.2f}% at epoch {progress.best_epoch}"
    say(accelerator, f"eval epoch {epoch}: teacher mIoU {100 * result.miou:.2f}%{student_text} on "
        f"{result.num_images} images ({best})")  # fmt: skip
    return result


def _checkpoint(
    accelerator: Accelerator, run_dir: Path, ema: EmaTeacher | None, progress: Progress, cfg: TrainConfig, dt: float
) -> None:
    wall, progress.wall_time = progress.wall_time, progress.wall_time + dt  # saved with the session's time so far
    path = save_checkpoint(accelerator, run_dir, ema, progress, cfg.run.keep_checkpoints)
    progress.wall_time = wall
    say(accelerator, f"checkpoint: {path} (iteration {progress.step})")


def _run_info(accelerator: Accelerator, resumed_from: Path | None) -> dict[str, Any]:
    return {
        "imas": imas_core.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "argv": sys.argv,
        "world_size": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
