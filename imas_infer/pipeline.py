"""The threaded inference loop: readers decode ahead, the main thread runs the model, writers encode behind.

    reader pool --(bounded: `prefetch` decoded images, in input order)--> main thread: plan windows, pad, batch,
    backend call, stitch --(bounded: 2 x `writers` finished images)--> writer pool: encode + write + score GT

Both queues are bounded, so memory stays flat over any number of images; the model call always runs in the main
thread (CUDA contexts and ONNX Runtime sessions stay on one thread). A file that cannot be decoded or written is a
failure of that image only: it is reported through `on_error` and the run goes on. Anything else (the model
failing, options the model cannot serve) raises. Tier 0 + numpy + Pillow.

A stitched model (sliding window inside the graph) skips planning and stitching: whole images are batched, up to
`settings.batch` per call, and the model's output is the result. An image of another size than the model's is a
failure of that image.

16-bit inputs are scaled to 8 bits (`image_io.decode_rgb`); the first one is reported through `on_notice`, once.
The EXIF orientation of an input is applied when it is decoded (unless `exif_orientation` is False), so the model and
every output see the image as a viewer shows it; a ground-truth mask of such an image is turned with it by the rule
of `imas_core.images` (only when it has the image's stored, unturned size).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imas_core import images
from imas_core.constants import PAD_RGB
from imas_core.errors import InferError
from imas_core.images import DecodedImage
from imas_core.runners.base import Backend
from imas_infer import image_io
from imas_infer.evaluate import Evaluator
from imas_infer.image_io import InputItem
from imas_infer.options import RunSettings
from imas_infer.outputs import OutputSpec, write_outputs
from imas_infer.report import RunSummary, Timings
from imas_infer.stitch import Batcher, ImageJob, Task, fill_batch, pad_image, plan_image, windows_overlap
from imas_infer.whole_images import WholeImageBatches


@dataclass(frozen=True)
class SyntheticItem:
    """A random image for benchmarks (deterministic per index)."""

    index: int
    height: int
    width: int

    @property
    def path(self) -> Path:
        return Path(f"synthetic_{self.index:05d}.png")

    @property
    def rel(self) -> Path:
        return self.path


@dataclass(frozen=True)
class DecodedItem:
    """An input decoded elsewhere (a Ray decoding task): `path` names it in failures, `rel` places its outputs."""

    path: Path
    rel: Path
    decoded: DecodedImage
    size: int | None = None  # bytes of the input file, for the manifest (`imas_infer.manifest`)


def load_image(item: InputItem | SyntheticItem | DecodedItem, *, exif_orientation: bool = True) -> DecodedImage:
    """The image as (H, W, 3) uint8 RGB (EXIF orientation applied if asked), with its bits per channel on file."""
    if isinstance(item, DecodedItem):
        return item.decoded
    if isinstance(item, SyntheticItem):
        rng = np.random.default_rng(item.index)
        rgb = rng.integers(0, 256, size=(item.height, item.width, 3), dtype=np.uint8)
        return DecodedImage(rgb, 8, 1, (item.height, item.width))
    return images.decode_rgb(item.path, exif_orientation=exif_orientation)


class _Run:
    """State of one run: the batcher, the images in flight, the write slots, and the counters."""

    on_written: Callable[[Any], None] | None = None  # called with each item once all its outputs are written

    def __init__(
        self,
        backend: Backend,
        settings: RunSettings,
        outputs: OutputSpec,
        evaluator: Evaluator | None,
        writers: ThreadPoolExecutor,
        write_slots: int,
        on_image: Callable[[], None] | None,
        on_error: Callable[[str, str], None] | None,
    ) -> None:
        self.backend, self.settings, self.outputs, self.evaluator = backend, settings, outputs, evaluator
        self.writers, self.on_image, self.on_error = writers, on_image, on_error
        self.slots = threading.BoundedSemaphore(write_slots)
        self.stitcher = backend.stitcher(softmax=settings.softmax)
        self.batcher = Batcher(settings.batch)
        self.inflight: OrderedDict[int, ImageJob] = OrderedDict()
        self.max_inflight = 2
        self.buffers: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.timings = Timings()
        self.failures: list[tuple[str, str]] = []
        self.succeeded = 0
        self.lock = threading.Lock()
        self.palette = image_io.palette_table(outputs.palette)
        self.whole = WholeImageBatches(backend, settings, self.timings) if settings.mode == "stitched" else None
        self.orientations: dict[int, tuple[int, tuple[int, int]]] = {}  # index -> EXIF turn for its GT

    def note_orientation(self, index: int, decoded: DecodedImage) -> None:
        """Remember an input's EXIF orientation until its ground truth is scored (only when there is any)."""
        if self.evaluator is not None and decoded.orientation != 1:
            with self.lock:
                self.orientations[index] = (decoded.orientation, decoded.stored_hw)

    def fail(self, path: Path, reason: str) -> None:
        with self.lock:
            self.failures.append((str(path), reason))
        if self.on_error is not None:
            self.on_error(str(path), reason)
        if self.on_image is not None:
            self.on_image()

    def admit(self, index: int, item: Any, image: np.ndarray, started: float) -> None:
        if self.settings.mode == "stitched":
            self.admit_whole(index, item, image, started)
            return
        t0 = time.perf_counter()
        h, w = image.shape[:2]
        s = self.settings
        canvas_hw, windows = plan_image(h, w, s.mode, s.window, s.stride, self.backend.window)
        if self.backend.output_kind == "labels" and windows_overlap(windows):
            raise InferError(
                f"{item.path}: the windows of this {h}x{w} image overlap (the last one is moved back flush with "
                f"the border), and {self.backend.info.path.name} outputs class ids, which cannot be stitched; use "
                "--whole-image or export the model with logits/probs output"
            )
        flips = (False, True) if s.flip else (False,)
        padded = pad_image(image, canvas_hw, PAD_RGB)
        job = ImageJob(
            index,
            padded,
            (h, w),
            self.stitcher.new_canvas(canvas_hw),
            len(windows) * len(flips),
            payload=(item, image, started),
        )
        self.inflight[index] = job
        self.max_inflight = max(2, math.ceil(s.batch / job.remaining) + 1)
        self.timings.add("preprocess", time.perf_counter() - t0)
        for window in windows:
            for flipped in flips:
                batch = self.batcher.add(Task(job, window, flipped))
                if batch is not None:
                    self.execute(batch)
        while len(self.inflight) > self.max_inflight:
            oldest = next(iter(self.inflight.values()))
            for batch in self.batcher.take(oldest):
                self.execute(batch)

    def _buffer(self, shape: tuple[int, int]) -> np.ndarray:
        if shape not in self.buffers:
            if len(self.buffers) >= 4:  # whole-image mode on mixed sizes: keep a few shapes only
                self.buffers.popitem(last=False)
            self.buffers[shape] = np.empty((self.settings.batch, 3, *shape), dtype=self.backend.input_dtype)
        self.buffers.move_to_end(shape)
        return self.buffers[shape]

    def execute(self, tasks: list[Task]) -> None:
        t0 = time.perf_counter()
        batch = fill_batch(tasks, self._buffer(tasks[0].shape))
        t1 = time.perf_counter()
        out = self.backend.run_device(batch)
        t2 = time.perf_counter()
        scores = self.stitcher.scores(out)
        done = []
        for i, task in enumerate(tasks):
            self.stitcher.add(task.job.canvas, scores, i, task.window, task.flipped)
            task.job.remaining -= 1
            if task.job.remaining == 0:
                done.append(task.job)
        t3 = time.perf_counter()
        self.timings.add("preprocess", t1 - t0)
        self.timings.model_call(len(tasks), t2 - t1)
        self.timings.add("stitch", t3 - t2)
        for job in done:
            self.complete(job)

    def complete(self, job: ImageJob) -> None:
        t0 = time.perf_counter()
        labels, probs = self.stitcher.finish(job.canvas, job.image_hw, self.settings.keep_probs)
        self.timings.add("stitch", time.perf_counter() - t0)
        del self.inflight[job.index]
        job.canvas = job.image = None  # type: ignore[assignment]  # free the accumulators now
        self.submit(job.index, job.payload, labels, probs)

    def submit(self, index: int, payload: Any, labels: np.ndarray, probs: np.ndarray | None) -> None:
        self.slots.acquire()  # blocks while the writers are `write_slots` images behind
        try:
            self.writers.submit(self._write, index, payload, labels, probs)
        except BaseException:
            self.slots.release()
            raise

    def admit_whole(self, index: int, item: Any, image: np.ndarray, started: float) -> None:
        """Queue a whole image for a stitched model (a full batch runs at once); a wrong size fails the image."""
        assert self.whole is not None
        reason = self.whole.refusal(image)
        if reason is not None:
            with self.lock:
                self.orientations.pop(index, None)
            self.fail(item.path, reason)
            return
        for done in self.whole.add(index, (item, image, started), image):
            self.submit(*done)

    def flush(self) -> None:
        """Run every partial batch (windows, or queued whole images)."""
        for batch in self.batcher.drain():
            self.execute(batch)
        for done in self.whole.flush() if self.whole is not None else []:
            self.submit(*done)

    def _write(
        self, index: int, payload: tuple[Any, np.ndarray, float], labels: np.ndarray, probs: np.ndarray | None
    ) -> None:
        item, image, started = payload
        with self.lock:
            orientation, stored_hw = self.orientations.pop(index, (1, (int(labels.shape[-2]), int(labels.shape[-1]))))
        try:
            t0 = time.perf_counter()
            if self.outputs.root is not None:
                write_outputs(self.outputs, self.palette, item.rel, image, labels, probs)
                if self.on_written is not None:
                    self.on_written(item)
            t1 = time.perf_counter()
            self.timings.add("write", t1 - t0)
            if self.evaluator is not None:
                self.evaluator.add(index, labels, orientation=orientation, stored_hw=stored_hw)
                self.timings.add("eval", time.perf_counter() - t1)
            t2 = time.perf_counter()
            self.timings.image_done(t2 - started)
            with self.lock:
                self.succeeded += 1
            if self.on_image is not None:
                self.on_image()
        except Exception as err:  # one image's failure must not stop the run
            self.fail(item.path, f"{type(err).__name__}: {err}" if not isinstance(err, InferError) else str(err))
        finally:
            self.slots.release()


def _load(
    index: int, item: InputItem | SyntheticItem, exif_orientation: bool
) -> tuple[int, Any, DecodedImage | None, str | None, float, float]:
    started = time.perf_counter()
    try:
        decoded, error = load_image(item, exif_orientation=exif_orientation), None
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
        decoded, error = None, f"unreadable image ({type(err).__name__}: {err})"
    return index, item, decoded, error, started, time.perf_counter() - started


def run_pipeline(
    backend: Backend,
    settings: RunSettings,
    items: Sequence[InputItem | SyntheticItem | DecodedItem],
    outputs: OutputSpec,
    *,
    evaluator: Evaluator | None = None,
    readers: int = 2,
    writers: int = 2,
    prefetch: int = 8,
    on_image: Callable[[], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    exif_orientation: bool = True,
    on_written: Callable[[Any], None] | None = None,
) -> RunSummary:
    """Run every input through the model and write its outputs.

    Args:
        backend: the loaded model.
        settings: resolved windows and batch (`options.resolve_settings`).
        items: inputs, processed in this order.
        outputs: the kinds to write and where.
        evaluator: scores each prediction against its ground truth, if given.
        readers, writers: thread pool sizes; prefetch: decoded images queued ahead of the model.
        on_image: called once per finished image (success or failure), e.g. to advance a progress bar.
        on_error: called with (path, reason) for each image that failed.
        on_notice: called once with a line saying that 16-bit inputs are scaled, at the first one.
        exif_orientation: apply each input's EXIF orientation (`imas_core.images`); False reads stored pixels.
        on_written: called (in a writer thread) with each item whose outputs are all written, e.g. to journal it
            (`imas_infer.manifest`); an exception it raises fails that image.

    Returns:
        Counts, failures and timings of the run.

    Raises:
        InferError: the model failed, or an image needs something the model cannot do.
    """
    with ThreadPoolExecutor(writers, thread_name_prefix="imas-write") as write_pool:
        run = _Run(backend, settings, outputs, evaluator, write_pool, 2 * writers, on_image, on_error)
        run.on_written = on_written
        with ThreadPoolExecutor(readers, thread_name_prefix="imas-read") as read_pool:
            pending: deque[Future[Any]] = deque()
            queue = iter(enumerate(items))
            noted_16bit = False
            try:
                for index, item in queue:
                    pending.append(read_pool.submit(_load, index, item, exif_orientation))
                    if len(pending) >= prefetch:
                        break
                while pending:
                    index, item, decoded, error, started, seconds = pending.popleft().result()
                    following = next(queue, None)
                    if following is not None:
                        pending.append(read_pool.submit(_load, *following, exif_orientation))
                    run.timings.add("decode", seconds)
                    if decoded is None:
                        run.fail(item.path, error or "unreadable image")
                        continue
                    if decoded.bits == 16 and not noted_16bit:
                        noted_16bit = True
                        if on_notice is not None:
                            on_notice(f"16-bit images are scaled to 8 bits (value >> 8); first one: {item.path}")
                    run.note_orientation(index, decoded)
                    run.admit(index, item, decoded.rgb, started)
                run.flush()
            except BaseException:
                read_pool.shutdown(wait=True, cancel_futures=True)
                raise
    run.timings.stop()
    return RunSummary(len(items), run.succeeded, sorted(run.failures), run.timings)
