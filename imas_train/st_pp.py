"""The ST / ST++ pipeline (``method: st_pp``; shared/methods/STPlusPlus.md §2.A): a sequence of stages in one run
folder, each stage a sub-folder with its own ``stage.json`` sidecar, the pipeline's progress in ``st_pp.json``.

ST++ (``st_pp.plus: true``)::

    RUN/stage1_supervised/   training on the labeled list (doubled when N_l < 200); K checkpoints in snapshots/
    RUN/reliability/         stability of every unlabeled image across the K checkpoints; reliable/unreliable lists
    RUN/pseudo_labels_1/     the reliable part labelled by stage 1's best-on-val model (multi-scale + flip TTA)
    RUN/stage2_retrain/      a fresh model on labeled x ceil(R/N_l) + the reliable part (SDA on pseudo-labeled)
    RUN/pseudo_labels_2/     the unreliable part labelled by stage 2's best-on-val model
    RUN/stage3_retrain/      a fresh model on labeled x ceil(N_u/N_l) + every unlabeled image

ST (``plus: false``): stage1_supervised, pseudo_labels_1 (every unlabeled image), stage2_retrain. Trainings run
through the generic loop (`imas_train.train.train`) with ``st_pp.stage`` set (`imas_train.methods.st_pp`);
labelling reuses the project's sliding-window inference (`imas_train.pseudo_label`). The last stage's final model
is copied to ``RUN/teacher.safetensors`` (its best-on-val model to ``RUN/best.safetensors``), so ``imas-export``
and ``imas-infer`` take it as from any run.

``--resume auto`` skips every finished stage (its ``stage.json`` says ``complete``), resumes a training stage from
its newest checkpoint (`train(resume="auto")`) and a labelling from the PNGs already written; the reliability
scores are recomputed when they were not finished (they are cheap: K single-scale forwards per image). A
SIGTERM / SIGUSR1 stops a training stage after a checkpoint, a labelling after the current image
(`TrainingStopped`). Iterations are counted over the training stages only (labelling forwards are not iterations).

One process only: every stage training is a whole `train` call, and Accelerate releases its process group at the
end of each, so a multi-process launch is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from imas_core.artifacts import read_teacher_meta, write_teacher_meta
from imas_core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from imas_core.errors import ConfigError, TrainingError
from imas_train.config import StPpConfig, TrainConfig, dump_config
from imas_train.run_folder import (
    RunLock,
    check_writable,
    clear_previous_run,
    previous_run,
    remove_stale_temporaries,
)
from imas_train.stop_signals import StopSignals
from imas_train.threads import apply_cpu_threads

__all__ = ["PIPELINE_FILE", "Stage", "plan_stages", "run_pipeline", "stage_config"]

log = logging.getLogger(__name__)
PIPELINE_FILE = "st_pp.json"
SIDECAR = "stage.json"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: its folder name under the run folder and what it does.

    Attributes:
        name: the folder (``stage1_supervised``, ``reliability``, ``pseudo_labels_1``, ...).
        kind: ``train``, ``reliability`` or ``labels``.
        epochs: training stages: their epoch count.
        role: training stages: ``supervised`` or ``retrain``; labelling stages: which unlabeled images
            (``all``, ``reliable``, ``unreliable``).
        model_from: labelling stages: the training stage whose best-on-val model labels.
        reads: re-training stages: the pseudo-label folders they train on.
    """

    name: str
    kind: str
    epochs: int = 0
    role: str = ""
    model_from: str = ""
    reads: tuple[str, ...] = ()


def plan_stages(cfg: TrainConfig) -> list[Stage]:
    """The stages of `cfg`'s pipeline, in order (module docstring)."""
    st = cfg.st_pp or StPpConfig()
    n = 3 if st.plus else 2
    epochs = list(st.stage_epochs) if st.stage_epochs is not None else [cfg.optim.epochs] * n
    if st.plus:
        return [
            Stage("stage1_supervised", "train", epochs[0], "supervised"),
            Stage("reliability", "reliability", model_from="stage1_supervised"),
            Stage("pseudo_labels_1", "labels", role="reliable", model_from="stage1_supervised"),
            Stage("stage2_retrain", "train", epochs[1], "retrain", reads=("pseudo_labels_1",)),
            Stage("pseudo_labels_2", "labels", role="unreliable", model_from="stage2_retrain"),
            Stage("stage3_retrain", "train", epochs[2], "retrain", reads=("pseudo_labels_1", "pseudo_labels_2")),
        ]
    return [
        Stage("stage1_supervised", "train", epochs[0], "supervised"),
        Stage("pseudo_labels_1", "labels", role="all", model_from="stage1_supervised"),
        Stage("stage2_retrain", "train", epochs[1], "retrain", reads=("pseudo_labels_1",)),
    ]


def stage_config(cfg: TrainConfig, stage: Stage) -> TrainConfig:
    """The config of a training stage: its folder, its epochs, ``st_pp.stage`` and the pseudo-label folders."""
    run_dir = Path(cfg.run.output_dir)
    st = dataclasses.replace(cfg.st_pp or StPpConfig(), stage=stage.role,
                             pseudo_labels=tuple(run_dir / r for r in stage.reads))  # fmt: skip
    return dataclasses.replace(
        cfg,
        optim=dataclasses.replace(cfg.optim, epochs=stage.epochs),
        run=dataclasses.replace(cfg.run, output_dir=run_dir / stage.name),
        st_pp=st,
    )


def _complete(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("complete") is True else None


def run_pipeline(
    cfg: TrainConfig, *, resume: str | None = None, allow_config_change: bool = False, overwrite: bool = False
) -> Any:
    """Run (or with `resume` continue) the ST / ST++ pipeline of `cfg`; `imas_train.train.train` calls this for
    ``method: st_pp``. Arguments and result as `train` (``TrainResult`` of the final stage, iterations and wall time
    summed over the training stages).

    Raises:
        TrainingError: a multi-process launch, the run folder in use / not writable / holding another run (without
            `overwrite`), a resume with another config (without `allow_config_change`), or a stage's error.
        TrainingStopped: SIGTERM / SIGUSR1 (resume with ``--resume auto``).
    """
    from imas_train.train import TrainResult

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError("method 'st_pp' runs as one process (its stages are separate trainings); launch it with "
                            "python -m imas_train or accelerate launch --num_processes 1")  # fmt: skip
    run_dir = Path(cfg.run.output_dir)
    if resume is not None and resume != "auto" and Path(resume).resolve() != run_dir.resolve():
        raise ConfigError(f"--resume for method 'st_pp' takes 'auto' or the run folder {run_dir}, got {resume!r}")
    stages = plan_stages(cfg)
    st = cfg.st_pp or StPpConfig()
    if st.plus:  # enough supervised epochs for the K checkpoints: checked before anything is written
        from imas_train.methods.st_pp import snapshot_epochs

        snapshot_epochs(stages[0].epochs, st.checkpoints)
    check_writable(run_dir)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        remove_stale_temporaries(run_dir)
        _claim(cfg, run_dir, stages, resume, overwrite, allow_config_change)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        results: dict[str, dict[str, Any]] = {}
        for stage in stages:
            folder = run_dir / stage.name
            done = _complete(folder)
            if done is not None:
                log.info(f"st_pp: {stage.name} already complete, skipped")
            else:
                _write_state(run_dir, stages, stage.name)
                log.info(f"st_pp: stage {stage.name} ({stage.kind}{', ' + stage.role if stage.role else ''})")
                done = _run_stage(cfg, stage, run_dir, allow_config_change)
            results[stage.name] = done
        final = stages[-1]
        teacher_path = _final_artifacts(run_dir, final, stages, results)
        _write_state(run_dir, stages, None)
        trained = [results[s.name] for s in stages if s.kind == "train"]
        last = results[final.name]
        log.info(f"st_pp: final mIoU {100 * last['miou_final']:.2f}% (best {100 * (last['miou_best'] or 0):.2f}%), "
                 f"{sum(r['iterations'] for r in trained)} iterations over {len(trained)} trainings")  # fmt: skip
        log.info(f"artifact: {teacher_path} + teacher.json (stage {final.name})")
        log.info(f"next: imas-export onnx --teacher {teacher_path} --output {run_dir / 'model.onnx'}")
        return TrainResult(run_dir, teacher_path, last["miou_final"], last["miou_best"], last["best_epoch"],
                           sum(r["iterations"] for r in trained), sum(r["wall_time_s"] for r in trained))  # fmt: skip
    finally:
        lock.release()


def _claim(
    cfg: TrainConfig, run_dir: Path, stages: list[Stage], resume: str | None, overwrite: bool, allow: bool
) -> None:
    """Refuse (or with `overwrite` clear) a previous run for a new pipeline; refuse a resume with another config."""
    ours = [s.name for s in stages if (run_dir / s.name).exists()] + (
        [PIPELINE_FILE] if (run_dir / PIPELINE_FILE).exists() else []
    )
    if resume is None:
        found = previous_run(run_dir) + ours
        if found and not overwrite:
            raise TrainingError(
                f"run folder {run_dir} already holds a run ({', '.join(found)}); continue it with --resume auto, "
                "train into another folder with --output-dir DIR, or start over with --overwrite (deletes the "
                "stage folders, st_pp.json and what a run writes)"
            )
        if found:
            for name in ours:
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            clear_previous_run(run_dir)
            log.info(f"--overwrite: deleted the previous run's {', '.join(found)} in {run_dir}")
        return
    saved = run_dir / "config.yaml"
    if saved.is_file():
        from imas_train.checkpoint import config_changes

        changes = config_changes(run_dir, dump_config(cfg), {})
        if changes and not allow:
            listed = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in list(changes.items())[:8])
            raise TrainingError(f"--resume: {run_dir} was started with another config ({listed}); resume with the "
                                "run's own config or pass --allow-config-change")  # fmt: skip


def _write_state(run_dir: Path, stages: list[Stage], current: str | None) -> None:
    state = {
        "method": "st_pp",
        "current": current,
        "complete": current is None,
        "stages": [
            {
                "name": s.name,
                "kind": s.kind,
                "role": s.role,
                "epochs": s.epochs,
                "complete": _complete(run_dir / s.name) is not None,
            }
            for s in stages
        ],  # fmt: skip
    }
    atomic_write_json(run_dir / PIPELINE_FILE, state)


def _run_stage(cfg: TrainConfig, stage: Stage, run_dir: Path, allow: bool) -> dict[str, Any]:
    folder = run_dir / stage.name
    if stage.kind == "train":
        from imas_train.train import train

        start = time.time()
        result = train(stage_config(cfg, stage), resume="auto", allow_config_change=allow)
        meta = {"kind": "train", "complete": True, "role": stage.role, "epochs": stage.epochs,
                "reads": list(stage.reads), "iterations": result.iterations, "miou_final": result.miou_final,
                "miou_best": result.miou_best, "best_epoch": result.best_epoch,
                "wall_time_s": round(result.wall_time, 1), "session_s": round(time.time() - start, 1),
                "teacher": "teacher.safetensors", "best": "best.safetensors"}  # fmt: skip
        atomic_write_json(folder / SIDECAR, meta)
        return meta
    threads_before = torch.get_num_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        apply_cpu_threads(cfg.run.cpu_threads, 1)
    try:
        with StopSignals() as stop:
            if stage.kind == "reliability":
                return _reliability(cfg, stage, run_dir, device, lambda: stop.received)
            return _labels(cfg, stage, run_dir, device, lambda: stop.received)
    finally:
        torch.set_num_threads(threads_before)


def _settings(cfg: TrainConfig, tta: bool) -> dict[str, Any]:
    st = cfg.st_pp or StPpConfig()
    return {"num_classes": cfg.model.num_classes, "window": cfg.eval.window, "stride": cfg.eval.stride,
            "protocol": cfg.eval.protocol, "scales": list(st.tta_scales) if tta else None,
            "flip": st.tta_flip if tta else False}  # fmt: skip


def _unlabeled(cfg: TrainConfig) -> Any:
    from imas_train.data import build_datasets

    data = build_datasets(cfg.data, cfg.model.num_classes)
    if data.unlabeled is None:
        raise TrainingError("method 'st_pp' needs unlabeled images (data.unlabeled_list)")
    return data


def _reliability(
    cfg: TrainConfig, stage: Stage, run_dir: Path, device: torch.device, stop: Callable[[], str | None]
) -> dict[str, Any]:
    from safetensors.torch import load_file

    from imas_train.methods import build_method
    from imas_train.methods.st_pp import snapshot_epochs, snapshot_path
    from imas_train.models import build_model
    from imas_train.pseudo_label import file_names, reliability_scores, split_reliable

    st = cfg.st_pp or StPpConfig()
    source_stage = next(s for s in plan_stages(cfg) if s.name == stage.model_from)
    scfg = stage_config(cfg, source_stage)
    model_cfg = dataclasses.replace(build_method(scfg).model_config(cfg.model), pretrained=None)
    models = []
    for epoch in snapshot_epochs(source_stage.epochs, st.checkpoints):
        path = snapshot_path(run_dir / source_stage.name, epoch)
        if not path.is_file():
            raise TrainingError(f"{path} is missing: the supervised stage saves it after epoch {epoch} (a run stopped "
                                "early by optim.max_iters has none); start the pipeline again")  # fmt: skip
        model = build_model(model_cfg)
        model.load_state_dict(load_file(str(path)), strict=True)
        models.append(model.to(device).eval())
    data = _unlabeled(cfg)
    source = data.unlabeled.source
    ids = list(range(len(source)))
    with tqdm(total=len(ids), desc="reliability", leave=False) as bar:
        scores = reliability_scores(models, source, ids, _settings(cfg, False), device, progress=bar.update, stop=stop)
    reliable, unreliable = split_reliable(ids, scores, st.reliable_fraction)
    names = file_names(source, ids)
    folder = run_dir / stage.name
    atomic_write_text(folder / "reliable_ids.txt", "".join(names[i][:-4] + "\n" for i in reliable))
    atomic_write_text(folder / "unreliable_ids.txt", "".join(names[i][:-4] + "\n" for i in unreliable))
    meta = {"kind": "reliability", "complete": True, "checkpoints": [str(snapshot_path(Path(source_stage.name), e))
            for e in snapshot_epochs(source_stage.epochs, st.checkpoints)],
            "reliable_fraction": st.reliable_fraction, "reliable": reliable, "unreliable": unreliable,
            "scores": [[i, names[i][:-4], s] for i, s in zip(ids, scores, strict=True)]}  # fmt: skip
    atomic_write_json(folder / SIDECAR, meta)
    log.info(f"st_pp: reliability: {len(reliable)} reliable, {len(unreliable)} unreliable of {len(ids)} images "
             f"(mean stability {sum(scores) / max(1, len(scores)):.3f})")  # fmt: skip
    return meta


def _labels(
    cfg: TrainConfig, stage: Stage, run_dir: Path, device: torch.device, stop: Callable[[], str | None]
) -> dict[str, Any]:
    from imas_train.pseudo_label import write_pseudo_labels
    from imas_train.teacher_artifact import load_teacher

    data = _unlabeled(cfg)
    source = data.unlabeled.source
    if stage.role == "all":
        ids = list(range(len(source)))
    else:
        rel = _complete(run_dir / "reliability")
        if rel is None:
            raise TrainingError(f"{run_dir / 'reliability'} is unfinished; resume the pipeline (--resume auto)")
        ids = [int(i) for i in rel[stage.role]]
    best = run_dir / stage.model_from / "best.safetensors"
    model, meta = load_teacher(best, device)
    folder = run_dir / stage.name
    with tqdm(total=len(ids), desc=stage.name, leave=False) as bar:
        out = write_pseudo_labels(model, source, ids, folder, settings=_settings(cfg, True), palette=data.palette,
                                  model_sha256=meta.weights_sha256, device=device, progress=bar.update,
                                  stop=stop)  # fmt: skip
    log.info(f"st_pp: {len(ids)} {stage.role} images pseudo-labelled into {folder} by {best} "
             f"(epoch {meta.epoch}, val mIoU {100 * meta.miou_final:.2f}%)")  # fmt: skip
    return out


def _final_artifacts(run_dir: Path, final: Stage, stages: list[Stage], results: dict[str, dict[str, Any]]) -> Path:
    """Copy the last stage's teacher and best model to the run folder, with the pipeline in their sidecars."""
    trained = [s for s in stages if s.kind == "train"]
    pipeline = {
        "stages": [s.name for s in stages],
        "final_stage": final.name,
        "iterations": {s.name: results[s.name]["iterations"] for s in trained},
        "total_iterations": sum(results[s.name]["iterations"] for s in trained),
        "miou": {s.name: [results[s.name]["miou_final"], results[s.name]["miou_best"]] for s in trained},
    }
    out = run_dir / "teacher.safetensors"
    for name in ("teacher.safetensors", "best.safetensors"):
        src = run_dir / final.name / name
        meta = read_teacher_meta(src)
        dst = run_dir / name
        atomic_write_bytes(dst, src.read_bytes())
        summary = {**meta.training_summary, "method": "st_pp", "st_pp": pipeline,
                   "wall_time_s": round(sum(results[s.name]["wall_time_s"] for s in trained), 1),
                   "iterations": pipeline["total_iterations"]}  # fmt: skip
        write_teacher_meta(dst, dataclasses.replace(meta, training_summary=summary))
    return out
