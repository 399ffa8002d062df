"""Resumable training state: the Progress record, atomic Accelerate checkpoints under ``<run>/state/``, and the
run folder's lock.

Layout::

    <run>/.lock                  the run lock: holder's PID, host and start time (`imas_train.run_folder.RunLock`)
    <run>/state/step-00000420/   model*.safetensors, optimizer*.bin, random_states_<rank>.pkl (Accelerate),
                                 method_state.safetensors, method_state.json, progress.json, config.yaml (ours),
                                 manifest.json (size and sha256 of every other file, the checkpoint's health and
                                 the split lists' sha256; written last)
    <run>/state/latest           text file naming the newest complete checkpoint directory
    <run>/state/.tmp-<step>-<pid>/   a save in progress (pid of the main process); never read
    <run>/state/damaged-step-*/  a checkpoint that failed its manifest check on resume, set aside for inspection

A save goes into ``.tmp-<step>-<pid>``, every file is fsynced, the manifest is written, and the directory is renamed
to ``step-<step:08d>`` in one atomic step; only then is ``latest`` rewritten (atomically). A crash, a kill or a full
disk during a save leaves the previous checkpoint and ``latest`` untouched, and resuming ignores every ``.tmp-*``
directory. A save that fails with an OS error (a full disk) removes its partial directory on every process and
raises `TrainingError` saying so.

Resuming checks the manifest first (a truncated, missing or modified file is named), then loads. With ``--resume
auto`` a checkpoint that does not load is skipped, with its reason logged, for the next newest one; a failed
manifest check also moves it aside to ``damaged-step-*`` so that pruning never keeps it in place of a good one.

Health: each manifest records whether every weight (the trained networks and the method's state, e.g. the EMA
teacher) was finite at save time, the largest absolute weight, the last logged loss and the lowest loss logged so
far in the run. A checkpoint is *healthy* when its weights are finite and its loss was not exploding (finite and at
most `EXPLODING_FACTOR` times the run's lowest logged loss, floored at `LOSS_FLOOR`). Pruning never deletes the
newest healthy checkpoint, so after a divergence the last good state survives however many diverged checkpoints
followed it; `health_report` names it (the non-finite-loss error of the loop quotes it).

Resuming with another experiment is refused: each checkpoint holds the resolved ``config.yaml`` of its run, and
`config_changes` compares it (and the split lists' sha256) with the new run's, ignoring `RESUMABLE_KEYS`; the loop
raises with the differing keys unless ``--allow-config-change`` is given (then they are recorded in ``run.json``).

One run per folder: the main process holds an exclusive ``fcntl.flock`` on ``<run>/.lock`` for the whole run
(`RunLock`). The kernel drops it when the process exits, however it exits, so a crashed run leaves no stale lock.

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

import dataclasses
import errno
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from imas_core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_tree, sha256_file
from imas_core.errors import ConfigError, TrainingError
from imas_core.typed import from_dict, to_dict
from imas_train.config import TrainConfig
from imas_train.methods.base import Method
from imas_train.run_folder import any_process

__all__ = [
    "IMAGE_COLUMNS",
    "RESUMABLE_KEYS",
    "Progress",
    "SaveRecord",
    "config_changes",
    "find_checkpoint",
    "health_report",
    "load_checkpoint",
    "resume_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]

log = get_logger(__name__)

IMAGE_COLUMNS = ("easiness", "index", "ratio_s", "cutmix_fired")  # the per-image records of `StepResult.per_image`

_METHOD_TENSORS = "method_state.safetensors"
_METHOD_JSON = "method_state.json"
_PROGRESS_FILE = "progress.json"
_MANIFEST = "manifest.json"
_CONFIG = "config.yaml"
EXPLODING_FACTOR = 1000.0  # a logged loss this many times the run's lowest so far is exploding, not noise
LOSS_FLOOR = 0.01  # ... where the lowest is taken as at least this (a loss near 0 would make any rise "exploding")
RESUMABLE_KEYS = frozenset({
    "run.log_every", "run.checkpoint_every", "run.keep_checkpoints", "run.tensorboard", "run.easiness_csv",
    "eval.every_epochs", "optim.max_iters", "data.num_workers",  # when and how much, not what, is computed
    "run.output_dir",  # a run folder may be moved or spelled differently
    "model.pretrained",  # read only at initialisation: the checkpoint holds every weight
    "run.cpu_threads",  # the machine's share, not the experiment (the float summation order may change with it)
})  # fmt: skip
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
        epoch_end_pending: the run stopped on a signal right after the last iteration of epoch `epoch`, before its
            end (easiness CSV, evaluation, best model): a resume does that first. False in every other checkpoint.
        last_loss, last_loss_step: the last logged loss (mean over the logging window and the processes) and the
            iteration it was logged at; lowest_loss: the lowest logged loss of the run (checkpoint health).
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
    epoch_end_pending: bool = False
    last_loss: float | None = None
    last_loss_step: int = 0
    lowest_loss: float | None = None

    def note_loss(self, loss: float, step: int) -> None:
        """Record a logged loss (for the health record of the next checkpoints)."""
        self.last_loss, self.last_loss_step = loss, step
        if math.isfinite(loss) and (self.lowest_loss is None or loss < self.lowest_loss):
            self.lowest_loss = loss

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


@dataclass(frozen=True)
class SaveRecord:
    """What a checkpoint records about its run besides the state (main process): the resolved config and the split
    lists' sha256 (compared on resume), and whether the weights were finite (health)."""

    config_yaml: str  # `imas_train.config.dump_config` of the run
    split_sha256: dict[str, str]
    weights_finite: bool
    max_abs_weight: float | None  # None when a weight is not finite


def _is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".tmp") and (path / _PROGRESS_FILE).is_file()


def _recorded_step(path: Path) -> int:
    """The step in `path`'s progress record; -1 when it cannot be read (so a damaged record sorts oldest)."""
    try:
        return int(json.loads((path / _PROGRESS_FILE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _prune(state_dir: Path, keep: int, current: Path) -> None:
    """Delete stale ``.tmp-*`` saves and all but the newest `keep` complete checkpoints (by recorded step), except
    the newest healthy checkpoint (see the module docstring), which is kept as well.

    Every ``.tmp-*`` directory is stale here: the run lock keeps other runs out of this folder.
    """
    for tmp in state_dir.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    done = sorted((p for p in state_dir.glob("step-*") if _is_complete(p)), key=_recorded_step)
    healthy = [p for p in done if _health(p)[0] is True]
    for old in done[: max(0, len(done) - max(keep, 1))]:
        if old != current and (not healthy or old != healthy[-1]):  # the newest healthy one always survives
            shutil.rmtree(old, ignore_errors=True)


def _write_state(
    accelerator: Accelerator, tmp: Path, method: Method, progress: Progress, record: SaveRecord | None
) -> None:
    accelerator.save_state(str(tmp))  # every rank writes its random_states_<rank>.pkl
    if accelerator.is_main_process:
        tensors = {k: v.detach().cpu().contiguous() for k, v in method.state_tensors().items()}
        atomic_write_bytes(tmp / _METHOD_TENSORS, save(tensors))
        atomic_write_json(tmp / _METHOD_JSON, method.state())
        atomic_write_json(tmp / _PROGRESS_FILE, progress.state_dict())
        if record is not None:
            atomic_write_text(tmp / _CONFIG, record.config_yaml)


def _manifest_extra(progress: Progress, record: SaveRecord | None) -> dict[str, Any]:
    """The manifest's entries besides the files: health (see the module docstring) and the split digests."""
    if record is None:
        return {}
    health = {
        "weights_finite": record.weights_finite,
        "max_abs_weight": record.max_abs_weight,
        "loss": progress.last_loss,
        "loss_step": progress.last_loss_step,
        "lowest_loss": progress.lowest_loss,
    }
    return {"health": health, "split_sha256": dict(record.split_sha256)}


def _commit(tmp: Path, final: Path, extra: dict[str, Any]) -> None:
    """Flush `tmp`, write its manifest, rename it to `final` (the commit point) and point ``latest`` at it."""
    fsync_tree(tmp)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    atomic_write_json(tmp / _MANIFEST, {"files": manifest, **extra})
    replaced = None
    if final.exists():  # the same step saved twice (an epoch end completed after a stop): keep it until the rename
        replaced = final.with_name(f".tmp-replaced-{final.name}-{os.getpid()}")
        os.replace(final, replaced)
    try:
        os.replace(tmp, final)  # the commit point
    except BaseException:
        if replaced is not None:
            os.replace(replaced, final)
        raise
    atomic_write_text(final.parent / "latest", final.name + "\n")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _save_failure(err: BaseException | None, final: Path) -> str:
    """Why a save failed and what is left, in one line."""
    state_dir = final.parent
    if err is None:
        reason = "another process could not write its part"
    elif isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = f"no space left on {err.filename or state_dir} ({err.strerror})"
    elif "No space left" in str(err) or "StorageFull" in str(err):  # wrapped by torch.save or safetensors
        reason = f"no space left on {state_dir} ({type(err).__name__}: {err})"
    elif isinstance(err, OSError):
        reason = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    else:
        reason = f"{type(err).__name__}: {err}"
    try:
        reason += f"; {shutil.disk_usage(state_dir).free / 2**20:.0f} MiB free on {state_dir}"
    except OSError:
        pass
    latest = state_dir / "latest"
    previous = latest.read_text(encoding="utf-8").strip() if latest.is_file() else None
    kept = f"the previous checkpoint {state_dir / previous} is intact" if previous else "no earlier checkpoint exists"
    return f"cannot save checkpoint {final}: {reason}; {kept} and the partial save was removed"


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    method: Method,
    progress: Progress,
    keep: int,
    record: SaveRecord | None = None,
) -> Path:
    """Save the full resumable state at `progress.step`, atomically (every process must call this).

    `record` (main process; None on the others) adds ``config.yaml`` and the manifest's health and split digests.

    Returns:
        The complete checkpoint directory ``<run>/state/step-<step:08d>``.

    Raises:
        TrainingError: a process could not write (a full disk, an OS error); on every process, after the partial
            directory was removed. The previous checkpoint and ``latest`` are untouched.
    """
    state_dir = run_dir / "state"
    final = state_dir / f"step-{progress.step:08d}"
    name = [f".tmp-{progress.step}-{os.getpid()}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(name)  # the main process's name: every rank writes into the same folder
    tmp = state_dir / name[0]
    main = accelerator.is_main_process

    def fresh() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    phases: list[Callable[[], None]] = [
        fresh if main else lambda: None,
        lambda: _write_state(accelerator, tmp, method, progress, record),
        (lambda: _commit(tmp, final, _manifest_extra(progress, record))) if main else lambda: None,
    ]
    for phase in phases:
        error: BaseException | None = None
        try:
            phase()
        except (OSError, RuntimeError, SafetensorError) as err:  # torch.save and safetensors wrap OS errors
            error = err
        if any_process(accelerator, error is not None):  # also the barrier between the phases
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(_save_failure(error, final)) from error
    if main:
        _prune(state_dir, keep, final)
    accelerator.wait_for_everyone()
    return final


def _candidates(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, newest first: ``latest``'s target, then the others by recorded step."""
    state_dir = run_dir / "state"
    done = sorted((p for p in state_dir.glob("step-*") if _is_complete(p)), key=_recorded_step, reverse=True)
    latest = state_dir / "latest"
    if latest.is_file():
        named = state_dir / latest.read_text(encoding="utf-8").strip()
        if named in done:
            done.remove(named)
            done.insert(0, named)
    return done


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
    done = _candidates(run_dir)
    return done[0] if done else None


def verify_checkpoint(path: Path) -> None:
    """Check every file of checkpoint `path` against its manifest (size, then sha256).

    Checkpoints written before manifests existed have none and pass.

    Raises:
        TrainingError: naming the missing, truncated or modified file.
    """
    manifest = path / _MANIFEST
    if not manifest.is_file():
        return
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise TrainingError(f"{manifest}: unreadable manifest ({err})") from err
    for name, (size, digest) in expected.items():
        file = path / name
        if not file.is_file():
            raise TrainingError(f"{file}: missing from the checkpoint")
        actual = file.stat().st_size
        if actual != size:
            raise TrainingError(f"{file}: {actual} bytes, but {size} were saved (truncated or replaced)")
        if sha256_file(file) != digest:
            raise TrainingError(f"{file}: contents differ from what was saved (sha256 mismatch: damaged or modified)")


def load_checkpoint(accelerator: Accelerator, path: Path, method: Method, progress: Progress) -> None:
    """Restore the prepared networks and optimizers (Accelerate), the method's state and `progress` from `path`.

    Raises:
        TrainingError: naming the checkpoint (and our own files by name) and the reason.
    """
    stage = f"{path} (Accelerate state: model, optimizer and random-state files)"
    try:
        accelerator.load_state(str(path), load_kwargs={"weights_only": True})
        stage = str(path / _METHOD_TENSORS)
        method.load_state_tensors(load_file(str(path / _METHOD_TENSORS), device="cpu"))
        stage = str(path / _METHOD_JSON)
        method.load_state(json.loads((path / _METHOD_JSON).read_text(encoding="utf-8")))
        stage = str(path / _PROGRESS_FILE)
        loaded = Progress()  # filled completely before `progress` changes
        loaded.load_state_dict(json.loads((path / _PROGRESS_FILE).read_text(encoding="utf-8")))
    except TrainingError as err:
        raise TrainingError(f"cannot resume from {stage}: {err}") from err
    except Exception as err:  # safetensors, torch and json raise many kinds for a damaged file
        raise TrainingError(f"cannot resume from {stage}: {type(err).__name__}: {err}") from err
    for f in dataclasses.fields(Progress):
        setattr(progress, f.name, getattr(loaded, f.name))


def resume_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    resume: str,
    method: Method,
    progress: Progress,
    check: Callable[[Path], None] | None = None,
) -> Path | None:
    """Resolve ``--resume`` (see `find_checkpoint`), verify and load it; every process must call this.

    With "auto" (or a run directory), a checkpoint that fails to verify or load is skipped for the next newest,
    and a warning names it and the reason; one that failed its manifest check is moved aside to
    ``state/damaged-<name>``. A checkpoint directory given explicitly is never skipped. `check` is called with a
    verified checkpoint before it is loaded; its TrainingError (another experiment's config) stops the resume at
    once instead of skipping to an older checkpoint.

    Returns:
        The checkpoint loaded, or None when "auto" finds none (a fresh start).

    Raises:
        TrainingError: the explicit checkpoint does not load, or no checkpoint of the run loads (each reason listed).
    """
    explicit = resume != "auto" and not (Path(resume).expanduser() / "state").is_dir()
    if explicit:
        candidates = [find_checkpoint(run_dir, resume)]
    else:
        candidates = _candidates(run_dir if resume == "auto" else Path(resume).expanduser())
        if not candidates and resume != "auto":
            raise TrainingError(f"--resume {resume}: no complete checkpoint under {Path(resume) / 'state'}")
    skipped = []
    for path in candidates:
        assert path is not None
        error: TrainingError | None = None
        damaged = False
        try:
            verify_checkpoint(path)
        except TrainingError as err:
            error, damaged = err, True
        if error is None and check is not None:
            check(path)
        if error is None:
            try:
                load_checkpoint(accelerator, path, method, progress)
            except TrainingError as err:
                error = err
        if not any_process(accelerator, error is not None):
            return path
        reason = str(error) if error is not None else "another process could not load it"
        if explicit:
            raise TrainingError(reason) from error
        damaged = any_process(accelerator, damaged)
        aside = path.with_name(f"damaged-{path.name}")
        if damaged and accelerator.is_main_process:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
        log.warning(f"resume: skipped {path}: {reason}" + (f"; moved aside to {aside}" if damaged else ""))
        skipped.append(f"{path.name}: {reason}")
    if skipped:
        raise TrainingError("--resume: no checkpoint loads; " + "; ".join(skipped))
    return None


# ---------------------------------------------------------------------------------------------------------------
# Health (divergence) and the config a checkpoint was saved with


def _manifest(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads((path / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _health(path: Path) -> tuple[bool | None, str]:
    """(healthy, why) of a checkpoint from its manifest; healthy is None when it has no health record."""
    health = _manifest(path).get("health")
    if not isinstance(health, dict):
        return None, "no health record"
    loss, step, lowest = health.get("loss"), health.get("loss_step"), health.get("lowest_loss")
    peak = health.get("max_abs_weight")
    if not health.get("weights_finite", False):
        return False, "non-finite weights"
    weights = f"max |weight| {peak:.3g}" if isinstance(peak, (int, float)) else "weights finite"
    if loss is None:
        return True, f"{weights}, no loss logged yet"
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return False, f"{weights}, logged loss {loss} at iteration {step}"
    limit = EXPLODING_FACTOR * max(lowest if isinstance(lowest, (int, float)) else loss, LOSS_FLOOR)
    if loss > limit:
        return False, f"{weights}, loss {loss:.3g} at iteration {step} > {EXPLODING_FACTOR:g} x the run's lowest " \
                      f"{lowest:.3g}: exploding"  # fmt: skip
    return True, f"{weights}, loss {loss:.3g} at iteration {step}"


def health_report(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest healthy checkpoint of a run (None if none is), and one line per checkpoint present, newest first
    (its name, then whether it is healthy and why)."""
    good: Path | None = None
    lines = []
    for path in _candidates(run_dir):
        healthy, why = _health(path)
        if healthy is True and good is None:
            good = path
        verdict = {True: "healthy", False: "diverged", None: "unknown"}[healthy]
        lines.append(f"{path.name} ({verdict}: {why})")
    return good, lines


def _flatten(raw: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(raw, dict) and raw:
        out: dict[str, Any] = {}
        for key, value in raw.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: raw}


def _normalised(text: str, where: str) -> dict[str, Any]:
    """A resolved config YAML as dotted keys, with the defaults of this version filled in where it still loads."""
    raw = yaml.safe_load(text)
    try:
        raw = to_dict(from_dict(TrainConfig, raw, where))
    except ConfigError:  # written by another version: compare what is there
        pass
    return _flatten(raw)


def config_changes(path: Path, config_yaml: str, split_sha256: dict[str, str]) -> dict[str, tuple[Any, Any]]:
    """The keys whose value differs between the config checkpoint `path` was saved with and `config_yaml`, apart
    from `RESUMABLE_KEYS`, as {dotted key: (saved, new)}; the split lists' contents count as ``split_sha256.<name>``.

    A checkpoint without its own ``config.yaml`` (saved before they were kept) is compared with its run folder's.
    """
    saved_file = path / _CONFIG if (path / _CONFIG).is_file() else path.parent.parent / _CONFIG
    if not saved_file.is_file():
        log.warning(f"resume: {path} records no config; cannot check that the experiment is unchanged")
        return {}
    try:
        old = _normalised(saved_file.read_text(encoding="utf-8"), str(saved_file))
    except (OSError, yaml.YAMLError) as err:
        raise TrainingError(f"{saved_file}: unreadable ({err}); cannot check the experiment is unchanged") from err
    new = _normalised(config_yaml, "the new config")
    saved_splits = _manifest(path).get("split_sha256")
    if isinstance(saved_splits, dict):
        old.update({f"split_sha256.{k}": v for k, v in saved_splits.items()})
        new.update({f"split_sha256.{k}": v for k, v in split_sha256.items()})
    absent = "(absent)"
    return {
        key: (old.get(key, absent), new.get(key, absent))
        for key in sorted(old.keys() | new.keys())
        if key not in RESUMABLE_KEYS and old.get(key, absent) != new.get(key, absent)
    }
