"""The training loop under Hugging Face Accelerate: one visible loop, phases commented (docs/style.md rule 5).

The loop is generic: everything method-specific (networks, teachers, the step's math, teacher updates, extra resume
state, the exported model) comes from the `Method` chosen by ``cfg.method`` (`imas_train.methods`, docs/design.md
"Methods"). The same code path runs 1 CPU process, 1 GPU, N GPUs and multi-node jobs (``accelerate launch`` or
``torchrun``). Choices that matter:

* Every trained network is prepared (DDP when distributed) through `StudentForward`, so its train-mode forwards
  go through DDP, and gets its own SGD optimizer. No-grad models (EMA teachers) are made by the method from the
  freshly built networks, BEFORE SyncBN conversion and ``prepare``: plain BatchNorm modules, never prepared.
* SyncBatchNorm only with several processes on CUDA; CPU (gloo) multi-process runs keep per-process BN statistics.
* The train loaders are NOT prepared: `data.make_train_loader` already shards each epoch's stream by rank and seeds
  every sample from (seed, stream, epoch, position), which Accelerate's sampler wrapping would break. Workers
  return uint8 images; batches are copied to the device (pinned memory on CUDA) and normalised there. The val
  loader IS prepared, so ``gather_for_metrics`` drops its padded duplicates.
* The LR is written into the param groups every iteration (no prepared scheduler). With gradient accumulation the
  optimizers and the teachers move on sync steps only, and mid-epoch checkpoints are taken on sync steps.
* A step's random draws come from a generator seeded from (seed, rank, iteration): a resumed run repeats them.
* One run per folder: the main process locks ``<run>/.lock`` (after checking the folder is writable) before
  anything is written, and holds the lock until `train` returns (`run_folder.RunLock`); then it removes the
  temporaries that a killed atomic write left in the folder. A new run (no resume) into a folder that holds a run
  is refused, or with ``overwrite`` first deletes that run's files (`run_folder.clear_previous_run`).
* On the CPU, torch's intra-op threads per process are set before anything runs: ``run.cpu_threads``, else the
  toolkit's policy (`threads.default_cpu_threads`); the ``devices:`` line says which.
* Each checkpoint records the run's config and its health (finite weights, logged loss; `checkpoint`): a resume
  with another experiment is refused before anything is loaded unless ``allow_config_change``, and a non-finite
  loss names the newest healthy checkpoint, not merely the latest.
* SIGTERM and SIGUSR1 (Slurm preemption, ``docker stop``, Kubernetes) only set a flag (`StopSignals`). After each
  iteration that ends an optimizer step, the processes agree on it (a gather), so every rank stops after the same
  iteration: a checkpoint is written and `TrainingStopped` raised (exit 143 or 138). A stop right after an
  epoch's last iteration defers that epoch's end (CSV, evaluation) to the resume, so it costs one iteration only.
"""

from __future__ import annotations

import dataclasses
import os
import platform
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
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

import imas_core
from imas_core.atomic import atomic_write_json, atomic_write_text
from imas_core.errors import ConfigError, TrainingError, TrainingStopped
from imas_core.scores import format_iou_table
from imas_train.augment import normalise_images
from imas_train.checkpoint import (
    IMAGE_COLUMNS,
    RESUMABLE_KEYS,
    Progress,
    SaveRecord,
    config_changes,
    health_report,
    resume_checkpoint,
    save_checkpoint,
)
from imas_train.config import TrainConfig, dump_config
from imas_train.data import Datasets, build_datasets, iters_per_epoch, make_train_loader, make_val_loader
from imas_train.evaluate import EvalResult, evaluate
from imas_train.meters import Meters
from imas_train.methods import Method, StepContext, StepResult, build_method, step_generator
from imas_train.models import build_model
from imas_train.optim import scaled_lr, set_lrs
from imas_train.plots import plot_easiness, plot_miou
from imas_train.run_folder import claim_run_folder
from imas_train.stop_signals import StopSignals
from imas_train.teacher_artifact import save_teacher, teacher_meta
from imas_train.threads import apply_cpu_threads

__all__ = ["TrainResult", "train"]

log = get_logger(__name__)  # one line per stage, main process only (the CLI prints it above the progress bar)
IMAGE_KEYS = ("image", "image_w", "image_s")  # uint8 batch entries normalised on the device


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
class TrainingSetup:
    """What `_setup` builds once per session: data, the method's networks and optimizers, the schedule's span."""

    data: Datasets
    forwards: dict[str, nn.Module]  # the prepared StudentForward of every trained network (DDP-wrapped if distributed)
    networks: dict[str, nn.Module]  # the same networks unwrapped: teacher updates, evaluation, the artifact
    optimizers: list[torch.optim.Optimizer]
    val_loader: Any  # prepared: padded duplicates are dropped by gather_for_metrics
    stream_len: int  # global length of each training stream per epoch (N_u, or N_l for labeled-only methods)
    iters: int  # L, iterations per epoch
    total: int  # E * L: the span of the poly schedule
    stop: int  # the iteration this run ends at (optim.max_iters)


def train(
    cfg: TrainConfig, *, resume: str | None = None, allow_config_change: bool = False, overwrite: bool = False
) -> TrainResult:
    """Train, evaluate and write the artifact; every process of a launch calls this.

    Args:
        cfg: the experiment; ``cfg.method`` chooses the method, ``cfg.run.output_dir`` is the run folder.
        resume: None = start fresh; "auto" = continue from ``<run>/state/latest`` when it exists (else start fresh),
            falling back to the newest checkpoint that loads when it is damaged (`checkpoint.resume_checkpoint`);
            a path = that checkpoint directory (or a run folder, then as "auto" inside it).
        allow_config_change: resume even though `cfg` differs from the checkpoint's config in keys that change the
            experiment (batch size, seed, method, split lists, model, ...); the differences go to ``run.json``.
            Without it such a resume is refused (`checkpoint.config_changes`; `checkpoint.RESUMABLE_KEYS` may
            always change).
        overwrite: a new run (`resume` None) into a folder that holds a run first deletes that run's files
            (`run_folder.clear_previous_run`, once the run lock is held; other files stay). Without it such a run
            is refused.

    Returns:
        The final artifact's path and scores. Files: ``<run>/{teacher,best}.safetensors`` + ``.json``,
        ``config.yaml``, ``run.json``, ``state/``, ``easiness/epoch_XXX.csv``, ``easiness.png``, ``miou.png``,
        ``tensorboard/``.

    Raises:
        TrainingError: a non-finite loss (nothing is saved for that iteration; the message names the newest
            healthy checkpoint and lists the others), an unusable checkpoint, a resume with another experiment's
            config, a run folder that is not writable, in use by another run, or holding a previous run (a new run
            without `overwrite`), a checkpoint that cannot be saved, or a launch whose processes Accelerate cannot
            see.
        TrainingStopped: SIGTERM or SIGUSR1 arrived; the run stopped after a checkpoint (resume it).
        ConfigError, DataError, WeightsError: bad settings or data (also `overwrite` with `resume`).
    """
    if overwrite and resume is not None:
        raise ConfigError("--overwrite starts a new run and deletes the previous one; it cannot go with --resume")
    if cfg.method == "st_pp" and (cfg.st_pp is None or cfg.st_pp.stage == "pipeline"):  # a pipeline of trainings
        from imas_train.st_pp import run_pipeline

        return run_pipeline(cfg, resume=resume, allow_config_change=allow_config_change, overwrite=overwrite)
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
    threads_before = torch.get_num_threads()
    if accelerator.device.type == "cpu":  # intra-op threads per process (imas_train.threads); restored on return
        apply_cpu_threads(cfg.run.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    try:
        lock = claim_run_folder(accelerator, run_dir, new_run=resume is None, overwrite=overwrite)
        try:
            with StopSignals() as stop:
                return _run(cfg, accelerator, run_dir, resume, stop, allow_config_change)
        finally:
            lock.release()
    finally:
        torch.set_num_threads(threads_before)


def _run(
    cfg: TrainConfig,
    accelerator: Accelerator,
    run_dir: Path,
    resume: str | None,
    stop: StopSignals,
    allow_config_change: bool,
) -> TrainResult:
    """The body of `train`, in a run folder this process holds (main process) and with the stop signals installed."""
    log.info(f"config: method {cfg.method}, dataset {cfg.data.dataset}, run {run_dir}")
    method = build_method(cfg)
    setup = _setup(cfg, accelerator, method)
    rank = accelerator.process_index

    # ---- resume: Accelerate state (networks, optimizers) + the method's state + progress (imas_train.checkpoint)
    progress = Progress()
    changes: dict[str, tuple[Any, Any]] = {}

    def same_experiment(path: Path) -> None:  # before a checkpoint is loaded
        changes.update(_config_changes(path, cfg, setup, allow_config_change))

    ckpt = resume_checkpoint(accelerator, run_dir, resume, method, progress, same_experiment) if resume else None
    if ckpt is not None:
        log.info(f"resume: {ckpt} (iteration {progress.step}, epoch {progress.step // setup.iters})")
    elif resume:
        log.info("resume: no checkpoint found, starting from scratch")
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        atomic_write_json(run_dir / "run.json", _run_info(accelerator, ckpt, changes))
    accelerator.init_trackers("tensorboard")
    accelerator.log({"config": dump_config(cfg)}, step=progress.step)

    last_eval: EvalResult | None = None
    meters, session_start = Meters(method.log_keys), time.time()
    bar = tqdm(total=setup.stop, initial=progress.step, disable=not accelerator.is_main_process)
    try:
        first = progress.epoch if progress.epoch_end_pending else progress.step // setup.iters
        for epoch in range(first, cfg.optim.epochs):
            if progress.step >= setup.stop and not progress.epoch_end_pending:
                break
            if progress.step == epoch * setup.iters:
                progress.start_epoch(epoch)
            epoch_end = min((epoch + 1) * setup.iters, setup.stop)
            loaders = {}  # none when only the epoch's end is left (a stop deferred it)
            if progress.step < epoch_end:
                loaders = _epoch_loaders(cfg, setup, accelerator, epoch, method.streams(epoch),
                                         start_batch=progress.step - epoch * setup.iters)  # fmt: skip
            for it in range(progress.step, epoch_end):
                # 0. schedule: poly LR over E * L, written into every optimizer's param groups before the step
                for optimizer in setup.optimizers:
                    set_lrs(optimizer, it, setup.total, cfg.optim.poly_power)
                # 1. batches (train loaders are not prepared: already sharded per rank), normalised on the device
                batches = {name: _to_device(next(loader), accelerator.device, cfg.run.channels_last)
                           for name, loader in loaders.items()}  # fmt: skip
                ctx = StepContext(step=it, epoch=epoch, iters_per_epoch=setup.iters, rank=rank,
                                  world_size=accelerator.num_processes, device=accelerator.device,
                                  generator=step_generator(cfg.run.seed, rank, it),
                                  autocast=accelerator.autocast,
                                  gather_rows=lambda rows: _gather_rows(accelerator, rows))  # fmt: skip
                with accelerator.accumulate(*setup.forwards.values()):
                    # 2. forward and losses: the method's step
                    result = method.step(setup.forwards, batches, ctx)
                    _check_finite(result, it, accelerator, run_dir)
                    # 3. backward and SGD steps (skipped by Accelerate on accumulation micro-batches)
                    accelerator.backward(result.loss)
                    for optimizer in setup.optimizers:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                # 4. no-grad models (EMA teachers) from the UNWRAPPED networks, after the optimizer steps
                if accelerator.sync_gradients:
                    method.after_optimizer_step(setup.networks, ctx)
                progress.step = it + 1
                # 5. log: per-image records gathered over processes; named values averaged over a window
                if result.per_image:
                    _gather_images(accelerator, progress, result)
                meters.add(result.logs)
                bar.update(1)
                if progress.step % cfg.run.log_every == 0 or progress.step == epoch_end:
                    scalars = meters.flush(lambda t: accelerator.reduce(t.to(accelerator.device), "sum"))
                    if "loss" in scalars:  # the checkpoints' health record (the same on every process)
                        progress.note_loss(scalars["loss"], progress.step)
                    for i, optimizer in enumerate(setup.optimizers):
                        suffix = f"_{i}" if len(setup.optimizers) > 1 else ""
                        scalars.update({f"lr_{g['name']}{suffix}": g["lr"] for g in optimizer.param_groups})
                    accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=progress.step)
                    postfix = {"loss": f"{scalars.get('loss', float('nan')):.3f}"}
                    if "easiness_mean" in scalars:
                        postfix["e"] = f"{scalars['easiness_mean']:.2f}"
                    bar.set_postfix(postfix)
                # checkpoint mid-epoch (the epoch end saves below)
                saved = None
                if accelerator.sync_gradients and progress.step % cfg.run.checkpoint_every == 0 and it + 1 < epoch_end:
                    saved = _checkpoint(accelerator, run_dir, method, progress, cfg, setup, time.time() - session_start)
                # stop on SIGTERM / SIGUSR1: every process after the same optimizer step, with a checkpoint
                if accelerator.sync_gradients and (signal_name := stop.agreed(accelerator)) is not None:
                    progress.epoch_end_pending = progress.step == epoch_end
                    saved = saved or _checkpoint(accelerator, run_dir, method, progress, cfg, setup,
                                                 time.time() - session_start)  # fmt: skip
                    raise TrainingStopped(f"stopped by {signal_name} after iteration {progress.step}; checkpoint "
                                          f"{saved}; continue with --resume auto", signal_name)  # fmt: skip
            progress.epoch_end_pending = False
            # ---- epoch end: easiness records, evaluation (+ best model, plots), checkpoint
            csv = progress.close_epoch(epoch)
            if csv is not None and cfg.run.easiness_csv and accelerator.is_main_process:
                atomic_write_text(run_dir / "easiness" / f"epoch_{epoch:03d}.csv", csv)
            if (epoch + 1) % cfg.eval.every_epochs == 0 or progress.step >= setup.stop:
                last_eval = _evaluate_and_record(accelerator, cfg, method, setup, progress, epoch,
                                                 session_start=session_start)  # fmt: skip
            if progress.step == (epoch + 1) * setup.iters:
                progress.start_epoch(epoch + 1)
            _checkpoint(accelerator, run_dir, method, progress, cfg, setup, time.time() - session_start)
        bar.close()
        # ---- final artifact: what the method exports (the EMA teacher for iMAS, the student for 'supervised')
        if last_eval is None:  # resumed after the last checkpoint of a finished run
            last_eval = _evaluate_and_record(accelerator, cfg, method, setup, progress,
                                             (progress.step - 1) // setup.iters, session_start=session_start,
                                             record=False)  # fmt: skip
        progress.wall_time += time.time() - session_start
        teacher_path = run_dir / "teacher.safetensors"
        if accelerator.is_main_process:
            _save_artifact(teacher_path, accelerator, cfg, method, setup, progress, miou=last_eval.miou,
                           wall_time=progress.wall_time)  # fmt: skip
            best = (
                "n/a"
                if progress.best_miou is None
                else f"{100 * progress.best_miou:.2f}% at epoch {progress.best_epoch}"
            )
            log.info(f"final mIoU {100 * last_eval.miou:.2f}% (best {best})\n"
                     f"{format_iou_table(last_eval.per_class, setup.data.class_names)}")  # fmt: skip
            log.info(f"artifact: {teacher_path} + teacher.json (best epoch: {run_dir / 'best.safetensors'})")
            log.info(f"next: imas-export onnx --teacher {teacher_path} --output {run_dir / 'model.onnx'}")
        accelerator.wait_for_everyone()
    finally:
        bar.close()
        accelerator.end_training()  # trackers finish; the process group (if any) is released
    return TrainResult(run_dir, teacher_path, last_eval.miou, progress.best_miou, progress.best_epoch,
                       progress.step, progress.wall_time)  # fmt: skip


def _setup(cfg: TrainConfig, accelerator: Accelerator, method: Method) -> TrainingSetup:
    """Data, networks, teachers, optimizers and val loader, in the order docs/style.md §4.4 prescribes."""
    world, b = accelerator.num_processes, cfg.data.batch_size
    # data: per-epoch streams sharded by rank; one epoch = one pass over N_u (N_l for labeled-only methods)
    data = method.training_data(build_datasets(cfg.data, cfg.model.num_classes, label_pad=method.label_pad))
    if method.uses_unlabeled and data.unlabeled is None:
        raise TrainingError(f"method {cfg.method!r} needs unlabeled data (data.unlabeled_list)")
    stream_len = len(data.unlabeled) if method.uses_unlabeled and data.unlabeled is not None else len(data.labeled)
    iters = iters_per_epoch(stream_len, world, b)
    if iters < 1:
        raise TrainingError(f"{stream_len} training images < {world} process(es) x batch {b}: no full iteration")
    total = cfg.optim.epochs * iters
    stop = min(total, cfg.optim.max_iters) if cfg.optim.max_iters is not None else total
    n_u = len(data.unlabeled) if data.unlabeled is not None else 0
    log.info(f"data: {len(data.labeled)} labeled, {n_u} unlabeled, {len(data.val)} val images; "
             f"{iters} iterations/epoch x {cfg.optim.epochs} epochs = {total} iterations (running {stop})")  # fmt: skip
    # networks: the same init on every rank, teachers copied before SyncBN and prepare, then per-rank seeds
    set_seed(cfg.run.seed)
    torch.backends.cudnn.benchmark = not cfg.run.deterministic
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    networks = method.build_networks(lambda: _new_model(cfg, method))
    method.setup_teachers(networks, accelerator.device)
    set_seed(cfg.run.seed, device_specific=True)
    global_batch = b * world * cfg.optim.grad_accum_steps
    lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.reference_global_batch, cfg.optim.lr_scaling)
    forwards: list[nn.Module] = []
    optimizers: list[torch.optim.Optimizer] = []
    for model in networks.values():
        forward: nn.Module = method.forward_adaptor(model)
        if world > 1 and accelerator.device.type == "cuda":  # gloo/CPU runs keep per-process BN statistics
            forward = nn.SyncBatchNorm.convert_sync_batchnorm(forward)
        groups = method.param_groups(model, lr)
        optimizers.append(torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, nesterov=False))
        forwards.append(torch.compile(forward) if cfg.run.compile else forward)
    val_loader = make_val_loader(data.val, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
                                 pin_memory=accelerator.device.type == "cuda")  # fmt: skip
    *prepared, val_loader = accelerator.prepare(*forwards, *optimizers, val_loader)
    n = len(networks)
    prepared_forwards = dict(zip(networks, prepared[:n], strict=True))
    plain = {name: accelerator.unwrap_model(f, keep_torch_compile=False).model for name, f in prepared_forwards.items()}
    threads = ""
    if accelerator.device.type == "cpu":
        how = "run.cpu_threads" if cfg.run.cpu_threads is not None else "default policy"
        threads = f" ({torch.get_num_threads()} torch thread(s) per process, {how})"
    log.info(f"devices: {world} process(es) on {accelerator.device.type}{threads}, precision "
             f"{accelerator.mixed_precision}; batch {b}+{b} per process, {global_batch} labeled per step; "
             f"lr backbone {lr:g}, head {lr * cfg.optim.head_lr_mult:g} ({cfg.optim.lr_scaling} scaling); "
             f"networks trained: {', '.join(networks)}")  # fmt: skip
    return TrainingSetup(data, prepared_forwards, plain, list(prepared[n:]), val_loader, stream_len, iters, total,
                         stop)  # fmt: skip


def _new_model(cfg: TrainConfig, method: Method) -> nn.Module:
    model = build_model(method.model_config(cfg.model))
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def _epoch_loaders(
    cfg: TrainConfig,
    setup: TrainingSetup,
    accelerator: Accelerator,
    epoch: int,
    streams: tuple[str, ...],
    *,
    start_batch: int,
) -> dict[str, Iterator[dict[str, Tensor]]]:
    """This rank's iterators over the epoch's streams, from batch `start_batch` on."""
    datasets = {"labeled": setup.data.labeled, "unlabeled": setup.data.unlabeled,
                "unlabeled_mix": setup.data.unlabeled}  # fmt: skip
    return {
        name: iter(make_train_loader(
            datasets[name], batch_size=cfg.data.batch_size, seed=cfg.run.seed, stream=name, epoch=epoch,
            rank=accelerator.process_index, world_size=accelerator.num_processes, length=setup.stream_len,
            start_batch=start_batch, num_workers=cfg.data.num_workers,
            pin_memory=accelerator.device.type == "cuda",
        ))
        for name in streams
    }  # fmt: skip


def _to_device(batch: dict[str, Tensor], device: torch.device, channels_last: bool) -> dict[str, Tensor]:
    """Copy a batch to the device (asynchronously from pinned memory) and normalise its uint8 images there."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    for key in IMAGE_KEYS:
        if key in out:
            out[key] = normalise_images(out[key])
    if channels_last:
        out = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in out.items()}
    return out


def _gather_rows(accelerator: Accelerator, rows: Tensor) -> Tensor:
    """Every process's rows, concatenated in rank order; the row counts may differ between processes."""
    if accelerator.num_processes == 1:
        return rows
    counts = accelerator.gather(torch.tensor([rows.shape[0]], device=accelerator.device)).tolist()
    padded = accelerator.pad_across_processes(rows.to(accelerator.device).contiguous(), dim=0)
    gathered = accelerator.gather(padded)
    size = padded.shape[0]
    return torch.cat([gathered[r * size : r * size + n] for r, n in enumerate(counts)]).to(rows.device)


def _check_finite(result: StepResult, it: int, accelerator: Accelerator, run_dir: Path) -> None:
    """Stop every process with TrainingError if any process has a non-finite loss term (before backward).

    The error names the newest healthy checkpoint (finite weights, loss not exploding: `checkpoint.health_report`),
    not merely the latest, whose weights may already have diverged, and lists every checkpoint with its state.
    """
    terms = {"loss": result.loss.detach().float()}
    terms.update({k: v.detach().float() for k, v in result.logs.items() if k.startswith("loss") and k != "loss"})
    bad = (~torch.isfinite(torch.stack(list(terms.values())))).any().float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        values = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        good, checkpoints = health_report(run_dir)
        if good is None:
            advice = "no checkpoint is healthy; lower optim.lr and start again, or check the data"
        else:
            advice = (f"last good checkpoint: {good}; resume from it with --resume {good} (a lower optim.lr also "
                      "needs --allow-config-change), or check the data")  # fmt: skip
        present = "; ".join(checkpoints) if checkpoints else "none"
        raise TrainingError(f"non-finite loss at iteration {it}: {values} (this process); stopped without saving; "
                            f"{advice}. Checkpoints, newest first: {present}")  # fmt: skip


def _gather_images(accelerator: Accelerator, progress: Progress, result: StepResult) -> None:
    """Gather every process's per-image records (`IMAGE_COLUMNS`) to the main process's `progress`."""
    columns = [result.per_image[name].to(result.loss.device).double() for name in IMAGE_COLUMNS]
    rows = accelerator.gather(torch.stack(columns, 1))
    if accelerator.is_main_process:
        progress.add_images(rows.cpu().tolist())


def _evaluate_and_record(
    accelerator: Accelerator,
    cfg: TrainConfig,
    method: Method,
    setup: TrainingSetup,
    progress: Progress,
    epoch: int,
    *,
    session_start: float,
    record: bool = True,
) -> EvalResult:
    """Score the method's eval models; record, log and keep the best model (main process writes); one line."""
    settings = {"num_classes": cfg.model.num_classes, "window": cfg.eval.window, "stride": cfg.eval.stride,
                "protocol": cfg.eval.protocol}  # fmt: skip
    models = method.eval_models(setup.networks)
    results = {name: evaluate(model, setup.val_loader, accelerator, **settings) for name, model in models.items()}
    (name, result), *others = results.items()
    if not record:
        return result
    improved = progress.record_eval(epoch, result.miou, others[0][1].miou if others else None)
    logs = {f"val/miou_{n}": r.miou for n, r in results.items()}
    for class_name, iou in zip(setup.data.class_names, result.per_class.tolist(), strict=True):
        if not np.isnan(iou):
            logs[f"val/iou_{name}/{class_name.replace(' ', '_')}"] = iou
    accelerator.log(logs, step=progress.step)
    if accelerator.is_main_process:
        run_dir = Path(cfg.run.output_dir)
        if improved:
            elapsed = progress.wall_time + time.time() - session_start  # the run's training time so far
            _save_artifact(run_dir / "best.safetensors", accelerator, cfg, method, setup, progress, miou=result.miou,
                           wall_time=elapsed, epoch=epoch)  # fmt: skip
        plot_miou(progress.history, run_dir / "miou.png")
        if progress.history["epoch"]:
            plot_easiness(progress.history, run_dir / "easiness.png")
    second = "".join(f", {n} {100 * r.miou:.2f}%" for n, r in others)
    log.info(f"eval epoch {epoch}: {name} mIoU {100 * result.miou:.2f}%{second} on {result.num_images} images "
             f"(best {100 * (progress.best_miou or 0):.2f}% at epoch {progress.best_epoch})")  # fmt: skip
    return result


def _save_artifact(
    path: Path,
    accelerator: Accelerator,
    cfg: TrainConfig,
    method: Method,
    setup: TrainingSetup,
    progress: Progress,
    *,
    miou: float,
    wall_time: float,
    epoch: int | None = None,
) -> None:
    """Write the method's artifact model to `path` (+ sidecar); main process only. `wall_time`: the run's training
    seconds up to now, over every session."""
    what, model = method.artifact(setup.networks)
    h = progress.history
    summary = {
        "method": cfg.method,
        "artifact_model": what,
        "iterations": progress.step,
        "iters_per_epoch": setup.iters,
        "wall_time_s": round(wall_time, 1),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": accelerator.device.type,
        "easiness_mean_last_epoch": h["easiness_mean"][-1] if h["easiness_mean"] else None,
        "cutmix_rate_last_epoch": h["cutmix_rate"][-1] if h["cutmix_rate"] else None,
        "miou_history": [list(pair) for pair in zip(h["eval_epoch"], h["miou_teacher"], strict=True)],
    }
    meta = teacher_meta(
        dataclasses.replace(cfg, model=method.model_config(cfg.model)),
        class_names=setup.data.class_names,
        palette=setup.data.palette,
        split_sha256=setup.data.split_sha256,
        epoch=epoch if epoch is not None else max(0, progress.step - 1) // setup.iters,
        step=progress.step,
        miou=miou,
        miou_best=progress.best_miou,
        best_epoch=progress.best_epoch,
        training_summary=summary,
    )
    save_teacher(model, path, meta)


def _checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    method: Method,
    progress: Progress,
    cfg: TrainConfig,
    setup: TrainingSetup,
    dt: float,
) -> Path:
    record = None
    if accelerator.is_main_process:
        finite, peak = _weights_health(setup.networks, method)
        record = SaveRecord(dump_config(cfg), setup.data.split_sha256, finite, peak)
    wall, progress.wall_time = progress.wall_time, progress.wall_time + dt  # saved with the session's time so far
    try:
        path = save_checkpoint(accelerator, run_dir, method, progress, cfg.run.keep_checkpoints, record)
    finally:
        progress.wall_time = wall
    log.info(f"checkpoint: {path} (iteration {progress.step})")
    return path


def _weights_health(networks: dict[str, nn.Module], method: Method) -> tuple[bool, float | None]:
    """(every floating-point weight and buffer of the networks and the method's state is finite, the largest
    absolute value or None when one is not); one device-to-host transfer."""
    tensors = [t for model in networks.values() for t in model.state_dict().values()]
    tensors += list(method.state_tensors().values())
    peaks = [  # max |t| as one reduction (no |t| copy of large buffers such as memory banks); NaN propagates
        torch.linalg.vector_norm(t.detach(), float("inf")).float()
        for t in tensors
        if t.is_floating_point() and t.numel()
    ]
    if not peaks:
        return True, None
    values = torch.stack([p.to(peaks[0].device) for p in peaks])
    finite = bool(torch.isfinite(values).all())
    return finite, (float(values.max()) if finite else None)


def _config_changes(path: Path, cfg: TrainConfig, setup: TrainingSetup, allow: bool) -> dict[str, tuple[Any, Any]]:
    """The experiment keys that differ from checkpoint `path`'s; TrainingError naming them unless `allow`."""
    changes = config_changes(path, dump_config(cfg), setup.data.split_sha256)
    if not changes:
        return changes
    listed = ", ".join(f"{key}: {_short(old)} -> {_short(new)}" for key, (old, new) in changes.items())
    if not allow:
        raise TrainingError(
            f"--resume: {path} was saved with another experiment ({listed}); resume with the run's own config "
            f"(keys that may change: {', '.join(sorted(RESUMABLE_KEYS))}), or pass --allow-config-change to "
            "resume anyway (the differences are recorded in run.json)"
        )
    log.warning(f"resume: config changed with --allow-config-change ({listed}); recorded in run.json")
    return changes


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _run_info(
    accelerator: Accelerator, resumed_from: Path | None, config_changes: dict[str, tuple[Any, Any]]
) -> dict[str, Any]:
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
        "config_changes_on_resume": {key: list(pair) for key, pair in config_changes.items()},  # {key: [saved, new]}
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
