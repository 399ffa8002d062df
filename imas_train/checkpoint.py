"""Resumable training state: the Progress record and atomic Accelerate checkpoints under ``<run>/state/``.

Layout::

    <run>/state/step-00000420/   model*.safetensors, optimizer*.bin, random_states_<rank>.pkl (Accelerate),
                                 method_state.safetensors, method_state.json, progress.json (ours)
    <run>/state/latest           text file naming the newest complete checkpoint directory
    <run>/state/.tmp-<step>/     a save in progress; never read

A save goes into ``.tmp-<step>``, every file is fsynced, and the directory is renamed to ``step-<step:08d>`` in one
atomic step; only then is ``latest`` rewritten (atomically). A crash, a kill or a full disk during a save leaves
the previous checkpoint and ``latest`` untouched, and resuming ignores every ``.tmp-*`` directory.

No pickle is ever loaded without ``weights_only=True``. Accelerate 1.x loads the model from safetensors and the
optimizer, scaler and RNG files through ``accelerate.utils.load``, which defaults to ``weights_only=True`` (with a
numpy allowlist for the RNG states; we pass ``weights_only=True`` explicitly as well). Its custom-object path
(``register_for_checkpointing`` -> ``load_custom_state``) hard-codes ``weights_only=False``, so the method's own state
(EMA teachers, memory banks: `Method.state_tensors` / `Method.state`) and the Progress record are NOT registered:
they are written here as ``method_state.safetensors``, ``method_state.json`` and ``progress.json`` and read back
with safetensors and json. All randomness of a run is derived from (seed, rank, iteration), so the
saved RNG states are not needed for an exact resume.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from safetensors.torch import load_file, save

from imas_core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_tree
from imas_core.errors import TrainingError
from imas_train.methods.base import Method

__all__ = ["IMAGE_COLUMNS", "Progress", "save_checkpoint", "find_checkpoint", "load_checkpoint"]

IMAGE_COLUMNS = ("easiness", "index", "ratio_s", "cutmix_fired")  # the per-image records of `StepResult.per_image`

_METHOD_TENSORS = "method_state.safetensors"
_METHOD_JSON = "method_state.json"
_PROGRESS_FILE = "progress.json"
_HISTORY_KEYS = (
    "eval_epoch", "miou_teacher", "miou_student",  # one entry per evaluation
    "epoch", "easiness_mean", "easiness_std", "easiness_p10", "easiness_p90", "ratio_s_mean", "cutmix_rate",
)  # fmt: skip


@dataclass
class Progress:
    """Where training stands; JSON-serialisable (python scalars, lists and dicts only).

    Attributes:
        epoch: epoch in progress (or next to run).
        step: global iterations completed (= data position epoch * L + batch).
        best_miou, best_epoch: best evaluated (teacher) mIoU so far and its epoch.
        wall_time: training seconds summed over every session of the run.
        history: per-eval and per-epoch series for the plots and the sidecar (keys `_HISTORY_KEYS`).
        epoch_easiness, epoch_index: easiness and dataset index of every unlabeled image seen so far this epoch,
            gathered over processes (main process), so a mid-epoch resume still writes a complete CSV.
        epoch_ratio_s, epoch_fired: sums over those images of the student confident ratio and of the CutMix
            trigger of their iteration (so their means weight every process equally).
    """

    epoch: int = 0
    step: int = 0
    best_miou: float | None = None
    best_epoch: int | None = None
    wall_time: float = 0.0
    history: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in _HISTORY_KEYS})
    epoch_easiness: list[float] = field(default_factory=list)
    epoch_index: list[int] = field(default_factory=list)
    epoch_ratio_s: float = 0.0
    epoch_fired: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if not hasattr(self, key):
                raise TrainingError(f"progress record has an unknown field {key!r}; written by another version?")
            setattr(self, key, value)

    def record_eval(self, epoch: int, miou: float, miou_second: float | None) -> bool:
        """Record one evaluation (the selected model's mIoU and an optional second model's); True if it is the best
        so far (then `best_miou` / `best_epoch` are updated)."""
        self.history["eval_epoch"].append(epoch)
        self.history["miou_teacher"].append(miou)
        self.history["miou_student"].append(miou_second)  # type: ignore[arg-type]  # None: not evaluated
        improved = self.best_miou is None or miou > self.best_miou
        if improved:
            self.best_miou, self.best_epoch = miou, epoch
        return improved

    def start_epoch(self, epoch: int) -> None:
        """Reset the per-epoch accumulators."""
        self.epoch = epoch
        self.epoch_easiness, self.epoch_index = [], []
        self.epoch_ratio_s, self.epoch_fired = 0.0, 0.0

    def add_images(self, rows: list[list[float]]) -> None:
        """Record one iteration's gathered rows (`IMAGE_COLUMNS`: easiness, dataset index, student ratio, CutMix
        fired)."""
        for easiness, index, ratio_s, fired in rows:
            self.epoch_easiness.append(easiness)
            self.epoch_index.append(int(index))
            self.epoch_ratio_s += ratio_s
            self.epoch_fired += fired

    def close_epoch(self, epoch: int) -> str | None:
        """Append the epoch's easiness summary to the history; return its per-image CSV (None if no image)."""
        e = np.asarray(self.epoch_easiness, dtype=np.float64)
        if e.size == 0:
            return None
        summary = {
            "epoch": epoch, "easiness_mean": float(e.mean()), "easiness_std": float(e.std()),
            "easiness_p10": float(np.percentile(e, 10)), "easiness_p90": float(np.percentile(e, 90)),
            "ratio_s_mean": self.epoch_ratio_s / e.size, "cutmix_rate": self.epoch_fired / e.size,
        }  # fmt: skip
        for key, value in summary.items():
            self.history[key].append(value)
        rows = [f"{i},{v:.6f}" for i, v in zip(self.epoch_index, e.tolist(), strict=True)]
        return "\n".join(["index,easiness", *rows]) + "\n"


def _is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".tmp") and (path / _PROGRESS_FILE).is_file()


def _recorded_step(path: Path) -> int:
    return int(json.loads((path / _PROGRESS_FILE).read_text(encoding="utf-8"))["step"])


def _prune(state_dir: Path, keep: int, current: Path) -> None:
    """Delete stale ``.tmp-*`` saves and all but the newest `keep` complete checkpoints (by recorded step)."""
    for tmp in state_dir.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    done = sorted((p for p in state_dir.glob("step-*") if _is_complete(p)), key=_recorded_step)
    for old in done[: max(0, len(done) - max(keep, 1))]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    method: Method,
    progress: Progress,
    keep: int,
) -> Path:
    """Save the full resumable state at `progress.step`, atomically (every process must call this).

    Returns:
        The complete checkpoint directory ``<run>/state/step-<step:08d>``.
    """
    state_dir = run_dir / "state"
    final = state_dir / f"step-{progress.step:08d}"
    tmp = state_dir / f".tmp-{progress.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its random_states_<rank>.pkl
    if accelerator.is_main_process:
        tensors = {k: v.detach().cpu().contiguous() for k, v in method.state_tensors().items()}
        atomic_write_bytes(tmp / _METHOD_TENSORS, save(tensors))
        atomic_write_json(tmp / _METHOD_JSON, method.state())
        atomic_write_json(tmp / _PROGRESS_FILE, progress.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(tmp)
        if final.exists():  # the same step saved twice (e.g. a resumed run at an epoch end)
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit point
        atomic_write_text(state_dir / "latest", final.name + "\n")
        _prune(state_dir, keep, final)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """Resolve ``--resume``: "auto" = ``<run>/state/latest`` (else the newest complete checkpoint, else None);
    a path = that checkpoint directory, or a run directory (then as "auto" inside it).

    Raises:
        TrainingError: a given path holds no complete checkpoint.
    """
    if resume != "auto":
        path = Path(resume).expanduser()
        if (path / "state").is_dir():
            found = find_checkpoint(path, "auto")
            if found is None:
                raise TrainingError(f"--resume {path}: no complete checkpoint under {path / 'state'}")
            return found
        if not _is_complete(path):
            raise TrainingError(f"--resume {path}: not a complete checkpoint directory (no {_PROGRESS_FILE})")
        return path
    state_dir = run_dir / "state"
    latest = state_dir / "latest"
    if latest.is_file():
        named = state_dir / latest.read_text(encoding="utf-8").strip()
        if _is_complete(named):
            return named
    done = [p for p in state_dir.glob("step-*") if _is_complete(p)]
    return max(done, key=_recorded_step) if done else None


def load_checkpoint(accelerator: Accelerator, path: Path, method: Method, progress: Progress) -> None:
    """Restore the prepared networks and optimizers (Accelerate), the method's state and `progress` from `path`."""
    try:
        accelerator.load_state(str(path), load_kwargs={"weights_only": True})
        method.load_state_tensors(load_file(str(path / _METHOD_TENSORS), device="cpu"))
        method.load_state(json.loads((path / _METHOD_JSON).read_text(encoding="utf-8")))
        progress.load_state_dict(json.loads((path / _PROGRESS_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise TrainingError(f"cannot resume from {path}: {err}") from err
