"""`imas-infer --ray`: the single-machine pipeline scaled out on Ray Data (the `[ray]` extra, imported lazily).

    driver: list inputs (folder, glob, pyarrow URI: s3://, gs://, hdfs://, file://; .txt list of either), keep --shard,
            drop what the manifest records as finished (--resume), then stream:
    from_items --> map_batches(decode_batch)     Ray tasks: read bytes, decode (`imas_core.images.decode_rgb`)
               --> map_batches(Segmenter)        actor pool: one backend per actor for its lifetime; each call runs
                                                 `pipeline.run_pipeline` on its images (windows of several images
                                                 batched together, the same stitching), writes the outputs
                                                 atomically and journals each finished image (`manifest`)
               --> the driver                    one small row per image: status, reason, stage seconds

* The same model files, window protocols, output kinds and names as the single-machine pipeline: the actor calls it.
* Faults: an image that cannot be decoded or written is a row with its reason, never an exception. Ray Data restarts
  a dead actor and retries its call (its actor-pool defaults, `max_restarts=-1` and `max_task_retries=-1`; passing
  them to `map_batches` is deprecated since Ray 2.60); the retried call skips the images an
  earlier attempt already wrote and journaled (one cheap incremental read of this run's journals), so no image is
  written twice by one run.
* Sizing: one actor per GPU (`gpus_per_actor` 1), or one per `cpus_per_actor` CPUs for CPU backends; each CPU actor
  runs ONNX Runtime with `cpus_per_actor` intra-op threads unless --threads says otherwise.
* Outputs go to a folder every node sees (local disk for one node, NFS, Lustre, a FUSE mount of a bucket); a bucket
  URI as --output is refused with that advice. The report is written by the driver.

Module level: stdlib, numpy and imas_core/imas_infer only; ray and pyarrow are imported inside functions, and the ORT
path never imports torch or accelerate.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imas_core import errors
from imas_core.artifacts import read_exported_meta
from imas_core.atomic import sha256_file
from imas_core.errors import ImasError, InferError, RuntimeUnavailable
from imas_core.images import DecodedImage
from imas_core.runners import model_format
from imas_core.runners.base import ModelInfo, info_from_exported
from imas_infer.image_io import check_output_folder, output_path
from imas_infer.manifest import Journal, ManifestReader, new_run_id, outputs_verify, run_key, select_inputs
from imas_infer.options import InferOptions, resolve_settings
from imas_infer.ray_inputs import ListedInput, decode_batch, is_uri, list_inputs
from imas_infer.report import STAGES, RunSummary, Timings, write_report

RAY_ADVICE = "install the Ray extra: pip install 'imas[ray]' (ray[data] >= 2.10, < 3), on the driver and on every node"
GPU_BACKENDS = ("ort-cuda", "ort-trt", "tensorrt")


@dataclass(frozen=True)
class RayOptions:
    """How the Ray run is laid out; `None` fields are derived from the cluster's resources."""

    address: str | None = None  # None: ray.init()'s own rule (RAY_ADDRESS if set, else a new local cluster)
    actors: int | None = None  # segmentation actors; None: GPUs / gpus_per_actor, else (CPUs - 1) / cpus_per_actor
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs and the backend is not ort-cpu, else 0
    cpus_per_actor: float = 1.0
    images_per_call: int = 8  # images handed to one actor call (their windows are batched together)
    decode_cpus: float = 1.0  # CPUs reserved by each decoding task
    decode_mib_per_image: int = 64  # memory reserved per image of a decoding task (a 1024x2048 frame: 6 MiB + file)
    num_cpus: int | None = None  # CPUs of a local cluster started here (ignored when connecting to one)

    def validate(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise InferError(f"--ray-actors must be >= 1, got {self.actors}")
        if self.images_per_call < 1:
            raise InferError(f"--ray-images-per-call must be >= 1, got {self.images_per_call}")
        if self.cpus_per_actor <= 0 or self.decode_cpus <= 0 or (self.gpus_per_actor or 0) < 0:
            raise InferError("--ray-cpus-per-actor and --ray-decode-cpus must be > 0, --ray-gpus-per-actor >= 0")
        if self.decode_mib_per_image < 1:
            raise InferError(f"decode_mib_per_image must be >= 1, got {self.decode_mib_per_image}")


class Segmenter:
    """Ray actor: holds one backend for its lifetime and runs `pipeline.run_pipeline` on each call's images."""

    def __init__(self, options: InferOptions, key: dict[str, Any], run_id: str) -> None:
        from imas_core.runners import open_backend
        from imas_infer.outputs import OutputSpec

        assert options.output is not None
        self.options, self.root = options, options.output
        self.backend = open_backend(
            options.model, backend=options.backend, device=options.device, threads=options.threads
        )
        self.settings = resolve_settings(options, self.backend.info)
        self.outputs = OutputSpec(options.output, tuple(options.save), self.backend.info.palette, options.overlay_alpha)
        self.journal = Journal(options.output, key, run_id, options.save)
        self.finished = ManifestReader(self.journal.path.parent)  # this run's journals, all writers
        self.identity = f"{socket.gethostname()}:{os.getpid()} {self.backend.describe()}"

    def _written(self, item: Any) -> None:
        self.journal.record(item.rel, item.size)

    def _finished_earlier(self, rel: Path, size: int) -> bool:
        """True when an earlier attempt of this run (a call lost with its actor) wrote and journaled `rel`."""
        if not output_path(self.root, self.options.save[0], rel).exists():
            return False
        record = self.finished.refresh().get(rel.as_posix())
        return record is not None and outputs_verify(record, self.root, size)

    def _segment(self, items: list[Any]) -> list[tuple[Any, RunSummary | None, str]]:
        """Run `items` together; if the pipeline raises (an image the model cannot serve), run them one by one, so
        only the culprit fails. Returns (items, summary or None, reason) groups."""
        from imas_infer.pipeline import run_pipeline

        def run(group: list[Any]) -> RunSummary:
            return run_pipeline(
                self.backend,
                self.settings,
                group,
                self.outputs,
                readers=1,
                writers=self.options.writers,
                prefetch=len(group) + 1,
                exif_orientation=self.options.exif_orientation,
                on_written=self._written,
            )

        try:
            return [(items, run(items), "")]
        except Exception as err:
            if len(items) == 1:
                return [(items, None, str(err) if isinstance(err, InferError) else f"{type(err).__name__}: {err}")]
        groups = []
        for item in items:
            if self._finished_earlier(Path(item.rel), item.size):
                groups.append(([item], None, "earlier"))
            else:
                groups.extend(self._segment([item]))
        return groups

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from imas_infer.pipeline import DecodedItem

        n = len(batch["path"])
        status, reason = ["ok"] * n, [""] * n
        stages = {stage: np.zeros(n) for stage in STAGES if stage != "decode"}
        calls, windows = np.zeros(n, np.int64), np.zeros(n, np.int64)
        items, row_of = [], {}
        for i in range(n):
            rel, size = Path(str(batch["rel"][i])), int(batch["size"][i])
            if batch["error"][i]:
                status[i], reason[i] = "failed", str(batch["error"][i])
            elif self._finished_earlier(rel, size):
                status[i] = "earlier"
            else:
                h, w = int(batch["height"][i]), int(batch["width"][i])
                rgb = np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(h, w, 3).copy()
                stored = (int(batch["stored_h"][i]), int(batch["stored_w"][i]))
                decoded = DecodedImage(rgb, int(batch["bits"][i]), int(batch["orientation"][i]), stored)
                items.append(DecodedItem(Path(str(batch["path"][i])), rel, decoded, size))
                row_of[str(items[-1].path)] = i  # a URI's "//" collapses in a Path: key by the Path's text
        for group, summary, why in self._segment(items) if items else []:
            rows = [row_of[str(item.path)] for item in group]
            if summary is None:
                for i in rows:
                    status[i], reason[i] = ("earlier", "") if why == "earlier" else ("failed", why)
                continue
            for path, failure in summary.failures:
                status[row_of[path]], reason[row_of[path]] = "failed", failure
            for stage in stages:
                stages[stage][rows] += summary.timings.stages[stage] / len(rows)
            calls[rows[0]] += summary.timings.model_calls
            windows[rows[0]] += summary.timings.windows
        return {
            "path": np.asarray(batch["path"], dtype=object),
            "status": np.asarray(status, dtype=object),
            "reason": np.asarray(reason, dtype=object),
            "decode_s": np.asarray(batch["decode_s"], dtype=np.float64),
            **{f"{stage}_s": values for stage, values in stages.items()},
            "model_calls": calls,
            "windows": windows,
            "actor": np.asarray([self.identity] * n, dtype=object),
            "decoder": np.asarray(batch["decoder"], dtype=object),
        }


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] part of the extra)
    except ImportError as err:
        raise RuntimeUnavailable(f"Ray Data is not importable ({err}); {RAY_ADVICE}") from err
    return ray


def sidecar_info(model: Path) -> ModelInfo:
    """The model's `ModelInfo` from its sidecar alone (the driver loads no runtime; each actor checks the model)."""
    fmt = model_format(model)
    if fmt == "teacher":
        raise InferError(
            f"--ray runs exported models (.onnx, .engine/.plan); {model.name} is a teacher artifact: export it first "
            "(imas-export onnx), or run it without --ray"
        )
    if not model.is_file():
        raise InferError(f"--model {model}: no such file")
    return info_from_exported(model, read_exported_meta(model), fmt)


def _check(options: InferOptions) -> None:
    options.validate()
    if options.benchmark or options.synthetic is not None:
        raise InferError("--ray runs real inputs: drop --benchmark/--synthetic (benchmark one machine without --ray)")
    if options.gt is not None:
        raise InferError("--ray does not score --gt; score the written labels with a single-machine run")
    if options.output is None:
        raise InferError("--ray needs --output")
    if is_uri(str(options.output)) or str(options.output).startswith(("s3:", "gs:", "gcs:", "hdfs:", "abfs:")):
        raise InferError(
            f"--output {options.output}: write to a folder every node mounts (NFS, Lustre, a FUSE mount of the "
            "bucket such as mountpoint-s3 or gcsfuse); object-store URIs are read-only inputs here"
        )


def _layout(ray: Any, options: InferOptions, ray_options: RayOptions) -> tuple[int, float, float]:
    """(actors, gpus per actor, cpus per actor) from the options and the cluster's resources."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    gpu_per = ray_options.gpus_per_actor
    if gpu_per is None:
        gpu_per = 1.0 if gpus > 0 and options.backend != "ort-cpu" and options.device != "cpu" else 0.0
    if gpu_per == 0 and options.backend in GPU_BACKENDS:
        raise InferError(f"--backend {options.backend} needs GPUs: give --ray-gpus-per-actor (e.g. 1)")
    if gpu_per > 0 and gpus < gpu_per:
        raise InferError(f"--ray-gpus-per-actor {gpu_per}: the cluster has {gpus:g} GPU(s)")
    actors = ray_options.actors
    if actors is None:
        spare = max(cpus - ray_options.decode_cpus, ray_options.cpus_per_actor)
        actors = int(gpus // gpu_per) if gpu_per > 0 else int(spare // ray_options.cpus_per_actor)
    return max(actors, 1), gpu_per, ray_options.cpus_per_actor


def infer_ray(options: InferOptions, ray_options: RayOptions | None = None, events: Any | None = None) -> Any:
    """Run `imas-infer` on Ray Data; the same outputs, names and manifest as `imas_infer.infer`.

    Uses the running Ray instance when `ray.is_initialized()`, else connects (`ray_options.address`) or starts a
    local cluster, which it shuts down at the end.

    Returns:
        `imas_infer.InferResult` (no evaluation); the report adds `ray` (layout, versions, actors seen).

    Raises:
        InferError / ArtifactError: unusable options, inputs or model. RuntimeUnavailable: Ray is not installed.
    """
    from imas_infer import InferEvents, InferResult, _jsonable

    ray_options = ray_options or RayOptions()
    _check(options)
    ray_options.validate()
    assert options.output is not None and options.input is not None
    check_output_folder(options.output)
    if options.report is not None:
        check_output_folder(options.report.parent, "the folder of --report")
    ev = events or InferEvents()
    info = sidecar_info(options.model)
    settings = resolve_settings(options, info)
    model_sha = sha256_file(options.model)
    key = run_key(options, settings, model_sha)
    ev.stage(f"model: {options.model} ({info.format}, sha256 {model_sha[:12]}..., checked again by every actor)")
    listed = list_inputs(options.input)
    ev.stage(f"inputs: {len(listed)} images from {options.input}")
    items, selection = select_inputs(listed, options, key, ev.stage, ray=True)
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        local = ray_options.address in (None, "", "local")
        ray.init(
            address=None if local else ray_options.address,
            num_cpus=ray_options.num_cpus if local else None,
            include_dashboard=False,
        )
    try:
        actors, gpu_per, cpu_per = _layout(ray, options, ray_options)
        if gpu_per == 0 and options.threads is None:
            options = dataclasses.replace(options, threads=max(1, int(cpu_per)))
        per_call = ray_options.images_per_call
        resources = ray.cluster_resources()
        ev.stage(
            f"ray {ray.__version__}: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPU(s), "
            f"{resources.get('GPU', 0):g} GPU(s); {actors} actor(s) x ({cpu_per:g} CPU, {gpu_per:g} GPU), "
            f"{per_call} images per call"
        )
        ev.stage(settings.describe())
        timings = Timings()
        tally = _Tally()
        ev.start(len(items))
        if items:
            ds = _dataset(ray, items, options, key, new_run_id(), actors, gpu_per, cpu_per, ray_options)
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    tally.add(batch, timings, ev)
            except ray.exceptions.RayError as err:
                raise _driver_error(err, options.model) from err
        timings.stop()
        summary = RunSummary(len(items), tally.succeeded, sorted(tally.failures), timings)
        report: dict[str, Any] = {
            "model": {
                "path": str(options.model),
                "format": info.format,
                "sha256": model_sha,
                "sidecar": str(options.model) + ".json",
                "sidecar_sha256": sha256_file(str(options.model) + ".json"),
                "info": _jsonable(dataclasses.asdict(info)),
            },
            "settings": _jsonable(dataclasses.asdict(settings)),
            "options": _jsonable(dataclasses.asdict(options)),
            **selection,
            "ray": {
                "version": ray.__version__,
                "nodes": len(ray.nodes()),
                "cluster_resources": {k: resources[k] for k in ("CPU", "GPU") if k in resources},
                "layout": {**dataclasses.asdict(ray_options), "actors": actors, "gpus_per_actor": gpu_per},
                "actors_seen": sorted(tally.actors),
                "decode_workers_seen": sorted(tally.decoders),
                "finished_by_earlier_attempt": tally.earlier,
            },
        }
        report.update(summary.to_dict())
        if options.report is not None:
            write_report(options.report, report)
        return InferResult(summary, None, report, info.class_names)
    finally:
        if started_here:
            ray.shutdown()


def _driver_error(err: Exception, model: Path) -> ImasError:
    """The error a failed Ray job raises on the driver: the toolkit's own error when an actor raised one (a model
    its backend refuses: exit 2, or a missing runtime: exit 4), named by the worker's traceback; else an InferError
    with what to check."""
    text = "\n".join(str(e) for e in (err, err.__cause__) if e is not None)
    found = re.findall(r"imas_core\.errors\.(\w+): (.+)", text)
    if found:
        name, message = found[-1]
        cls = getattr(errors, name, InferError)
        if isinstance(cls, type) and issubclass(cls, ImasError) and cls is not errors.TrainingStopped:
            return cls(f"{message.strip()} (raised in a Ray actor)")
    first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    return InferError(
        f"the Ray job failed: {first}; every node needs the same environment (pip install 'imas[infer,ray]') "
        f"and the model at {model}; the full trace is in the Ray logs (/tmp/ray/session_latest/logs on each node); "
        "rerun the same command to resume"
    )


class _Tally:
    """What the driver adds up from the actors' result rows (one row per image)."""

    def __init__(self) -> None:
        self.succeeded = self.earlier = 0
        self.failures: list[tuple[str, str]] = []
        self.actors: set[str] = set()
        self.decoders: set[str] = set()

    def add(self, batch: dict[str, np.ndarray], timings: Timings, ev: Any) -> None:
        for i, status in enumerate(batch["status"]):
            if status == "failed":
                self.failures.append((str(batch["path"][i]), str(batch["reason"][i])))
                ev.error(str(batch["path"][i]), str(batch["reason"][i]))
            else:
                self.succeeded += 1
                self.earlier += status == "earlier"
            ev.image()
        for stage in STAGES:
            if f"{stage}_s" in batch:
                timings.add(stage, float(np.sum(batch[f"{stage}_s"])))
        timings.model_calls += int(np.sum(batch["model_calls"]))
        timings.windows += int(np.sum(batch["windows"]))
        self.actors.update(str(a) for a in batch["actor"])
        self.decoders.update(str(d) for d in batch["decoder"])


def _dataset(
    ray: Any,
    items: list[ListedInput],
    options: InferOptions,
    key: dict[str, Any],
    run_id: str,
    actors: int,
    gpu_per: float,
    cpu_per: float,
    ray_options: RayOptions,
) -> Any:
    per_call = ray_options.images_per_call
    rows = [{"path": item.path, "rel": item.rel.as_posix(), "size": item.size} for item in items]
    ray.data.DataContext.get_current().enable_progress_bars = False  # the CLI's bar counts images
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / per_call)))
    ds = ds.map_batches(
        decode_batch,
        batch_size=per_call,
        batch_format="numpy",
        num_cpus=ray_options.decode_cpus,
        fn_kwargs={"exif_orientation": options.exif_orientation},
        # The memory a task's decoded images take. It also keeps decoding in tasks: Ray Data fuses a task map into
        # the next actor map when their resource requests are equal (CPU actors of 1 CPU), decoding in the actor.
        memory=per_call * ray_options.decode_mib_per_image * 2**20,
    )
    return ds.map_batches(
        Segmenter,
        fn_constructor_kwargs={"options": options, "key": key, "run_id": run_id},
        batch_size=per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),  # Ray Data restarts dead actors and retries their calls
        num_cpus=cpu_per,
        num_gpus=gpu_per,
    )
