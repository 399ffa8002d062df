"""Window planning, batching and numpy stitching, checked against closed forms."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from imas_core.constants import PAD_RGB
from imas_core.errors import InferError
from imas_core.stitching import NumpyStitcher, softmax_
from imas_core.tiling import Window
from imas_infer.image_io import InputItem
from imas_infer.options import RunSettings
from imas_infer.pipeline import OutputSpec, run_pipeline
from imas_infer.stitch import Batcher, ImageJob, Task, fill_batch, pad_image, plan_image, windows_overlap
from tests.infer.infer_helpers import (
    PositionBackend,
    WindowSensitiveBackend,
    encode_positions,
    position_logits,
    random_image,
    save_image,
)

SIZES = (1, 5, 16, 17, 23, 31, 32, 33, 50)


def _coverage(canvas_hw: tuple[int, int], windows: list[Window]) -> np.ndarray:
    count = np.zeros(canvas_hw, dtype=np.int64)
    for y0, y1, x0, x1 in windows:
        count[y0:y1, x0:x1] += 1
    return count


def _axis_count(size: int, starts: list[int], window: int) -> np.ndarray:
    """Independent per-axis count: how many [s, s + window) intervals contain each coordinate."""
    pos = np.arange(size)
    return sum(((pos >= s) & (pos < s + window)).astype(np.int64) for s in starts)


@pytest.mark.parametrize("window,stride", [((16, 16), (11, 11)), ((16, 24), (16, 24)), ((7, 12), (3, 5))])
def test_full_tiles_plan_covers_every_pixel_with_full_windows(window: tuple[int, int], stride: tuple[int, int]) -> None:
    for h, w in itertools.product(SIZES, SIZES):
        canvas, windows = plan_image(h, w, "full_tiles", window, stride, window)
        assert canvas == (max(h, window[0]), max(w, window[1]))
        assert all((y1 - y0, x1 - x0) == window for y0, y1, x0, x1 in windows)  # always full tiles
        assert all(0 <= y0 and y1 <= canvas[0] and 0 <= x0 and x1 <= canvas[1] for y0, y1, x0, x1 in windows)
        count = _coverage(canvas, windows)
        assert count.min() >= 1, (h, w)
        # the last window of each axis is flush with the border, and starts advance by the stride
        rows = sorted({y0 for y0, *_ in windows})
        cols = sorted({x0 for _, _, x0, _ in windows})
        assert rows[-1] + window[0] == canvas[0] and cols[-1] + window[1] == canvas[1]
        assert all(b - a <= stride[0] for a, b in zip(rows, rows[1:], strict=False))
        expected = np.outer(_axis_count(canvas[0], rows, window[0]), _axis_count(canvas[1], cols, window[1]))
        np.testing.assert_array_equal(count, expected)


def test_imas_plan_truncates_edges_and_matches_the_reference_on_cityscapes() -> None:
    canvas, windows = plan_image(1024, 2048, "imas", (769, 769), (512, 512), None)
    assert canvas == (1024, 2048)
    assert sorted({(y0, y1) for y0, y1, _, _ in windows}) == [(0, 769), (512, 1024)]
    assert sorted({(x0, x1) for _, _, x0, x1 in windows}) == [(0, 769), (512, 1281), (1024, 1793), (1536, 2048)]
    for h, w in itertools.product(SIZES, SIZES):
        canvas, windows = plan_image(h, w, "imas", (16, 16), (11, 11), None)
        assert canvas == (h, w)
        assert _coverage(canvas, windows).min() >= 1
        assert sorted({y0 for y0, *_ in windows}) == list(range(0, h, 11))


def test_whole_image_plans() -> None:
    assert plan_image(30, 40, "whole", (16, 16), (8, 8), None) == ((30, 40), [Window(0, 30, 0, 40)])
    assert plan_image(10, 12, "whole", (16, 16), (8, 8), (16, 24)) == ((16, 24), [Window(0, 16, 0, 24)])
    with pytest.raises(InferError, match="does not fit"):
        plan_image(30, 12, "whole", (16, 16), (8, 8), (16, 24))


def test_unknown_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="mode must be 'whole' or one of full_tiles, imas, got 'fast'"):
        plan_image(32, 48, "fast", (16, 24), (16, 24), (16, 24))


def test_windows_overlap() -> None:
    assert not windows_overlap(plan_image(32, 48, "full_tiles", (16, 24), (16, 24), (16, 24))[1])
    assert windows_overlap(plan_image(33, 48, "full_tiles", (16, 24), (16, 24), (16, 24))[1])  # last row moved back
    assert windows_overlap(plan_image(32, 48, "full_tiles", (16, 24), (8, 24), (16, 24))[1])


def test_pad_image_pads_bottom_right_with_pad_rgb() -> None:
    image = random_image(5, 7, seed=0)
    assert pad_image(image, (5, 7), PAD_RGB) is image
    padded = pad_image(image, (8, 9), PAD_RGB)
    np.testing.assert_array_equal(padded[:5, :7], image)
    assert (padded[5:] == PAD_RGB).all() and (padded[:, 7:] == PAD_RGB).all()


def test_batcher_packs_by_shape_and_flushes_by_job() -> None:
    jobs = [ImageJob(i, np.zeros((1, 1, 3), np.uint8), (1, 1), None, 0) for i in range(3)]
    batcher = Batcher(3)
    small, big = Window(0, 2, 0, 2), Window(0, 4, 0, 4)
    assert batcher.add(Task(jobs[0], small, False)) is None
    assert batcher.add(Task(jobs[0], big, False)) is None
    assert batcher.add(Task(jobs[1], small, False)) is None
    full = batcher.add(Task(jobs[2], small, False))
    assert full is not None and [t.job.index for t in full] == [0, 1, 2]
    taken = batcher.take(jobs[0])
    assert len(taken) == 1 and taken[0][0].window == big
    assert batcher.drain() == []


def _stitch_with(backend: PositionBackend, image: np.ndarray, mode: str, window, stride, flip: bool, batch: int):
    """Run one image through plan -> batch -> backend -> stitch, like the pipeline."""
    h, w = image.shape[:2]
    canvas_hw, windows = plan_image(h, w, mode, window, stride, backend.window)
    stitcher = NumpyStitcher("logits", backend.num_classes, softmax=True)
    job = ImageJob(0, pad_image(image, canvas_hw, PAD_RGB), (h, w), stitcher.new_canvas(canvas_hw), 0)
    tasks = [Task(job, win, f) for win in windows for f in ((False, True) if flip else (False,))]
    for start in range(0, len(tasks), batch):
        chunk = tasks[start : start + batch]
        for shape in {t.shape for t in chunk}:
            group = [t for t in chunk if t.shape == shape]
            buf = np.empty((len(group), 3, *shape), np.float32)
            scores = stitcher.scores(backend.run(fill_batch(group, buf)))
            for i, t in enumerate(group):
                stitcher.add(job.canvas, scores, i, t.window, t.flipped)
    return stitcher.finish(job.canvas, (h, w), keep_probs=True)


@pytest.mark.parametrize("mode", ["full_tiles", "imas", "whole"])
@pytest.mark.parametrize("flip", [False, True])
def test_stitching_reproduces_the_closed_form(mode: str, flip: bool) -> None:
    window, stride = (16, 20), (11, 13)
    for h, w in [(7, 9), (16, 20), (33, 47), (40, 21), (300, 20)]:
        static = window if mode == "full_tiles" else None
        backend = PositionBackend(num_classes=4, window=static)
        labels, probs = _stitch_with(backend, encode_positions(h, w), mode, window, stride, flip, batch=5)
        y, x = np.mgrid[:h, :w]
        expected = softmax_(position_logits(y, x, 4)[None].astype(np.float32), axis=1)[0]
        assert probs is not None and probs.shape == (4, h, w)
        np.testing.assert_allclose(probs, expected, atol=2e-6, rtol=0)
        np.testing.assert_array_equal(labels, expected.argmax(0))


def test_labels_stitcher_pastes_class_ids() -> None:
    stitcher = NumpyStitcher("labels", 3, softmax=True)
    canvas = stitcher.new_canvas((4, 6))
    out = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3) % 3
    stitcher.add(canvas, out, 0, Window(0, 4, 0, 3), False)
    stitcher.add(canvas, out, 1, Window(0, 4, 3, 6), True)
    labels, probs = stitcher.finish(canvas, (3, 5), keep_probs=False)
    assert probs is None
    np.testing.assert_array_equal(labels, np.concatenate([out[0], out[1][:, ::-1]], axis=1)[:3, :5])


def _run_images(tmp_path: Path, backend, settings: RunSettings, name: str) -> list[np.ndarray]:
    from PIL import Image

    items = [InputItem(p, p.relative_to(tmp_path / "in")) for p in sorted((tmp_path / "in").rglob("*.png"))]
    summary = run_pipeline(backend, settings, items, OutputSpec(tmp_path / name, ("labels",), ()), prefetch=3)
    assert summary.succeeded == len(items) and not summary.failures
    return [np.asarray(Image.open(tmp_path / name / "labels" / it.rel)) for it in items]


@pytest.mark.parametrize("mode", ["full_tiles", "imas"])
def test_batching_across_images_gives_the_same_labels(tmp_path: Path, mode: str) -> None:
    sizes = [(20, 30), (35, 41), (16, 16), (9, 50), (50, 9), (33, 33)]
    for i, (h, w) in enumerate(sizes):
        save_image(tmp_path / "in" / f"sub{i % 2}" / f"img{i}.png", random_image(h, w, seed=i))
    results = {}
    for batch in (1, 3, 8):
        backend = WindowSensitiveBackend(window=(16, 16) if mode == "full_tiles" else None)
        settings = RunSettings(mode, (16, 16), (11, 11), batch, flip=False, softmax=True, keep_probs=False)
        results[batch] = _run_images(tmp_path, backend, settings, f"out{batch}")
        total = sum(n for n, *_ in backend.calls)
        assert max(n for n, *_ in backend.calls) <= batch
        if batch == 8 and mode == "full_tiles":  # windows of different images share calls
            assert len(backend.calls) == -(-total // 8)
    for batch in (3, 8):
        for a, b in zip(results[1], results[batch], strict=True):
            np.testing.assert_array_equal(a, b)


def test_argmax_channels_equals_numpy_including_ties() -> None:
    from imas_core.stitching import argmax_channels

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(7, 300, 33)).astype(np.float32)  # many ties: the first index must win
    np.testing.assert_array_equal(argmax_channels(scores), scores.argmax(axis=0))
    view = rng.normal(size=(5, 130, 90)).astype(np.float32)[:, 3:120, 7:80]  # a cropped, non-contiguous region
    np.testing.assert_array_equal(argmax_channels(view), view.argmax(axis=0))


def test_readers_stay_a_bounded_number_of_images_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import imas_infer.pipeline as pipeline

    started, lock = [0], threading.Lock()
    original = pipeline.load_image

    def counting_load(item, **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            started[0] += 1
        return original(item, **kwargs)

    monkeypatch.setattr(pipeline, "load_image", counting_load)
    items = [pipeline.SyntheticItem(i, 8, 8) for i in range(30)]
    backend = PositionBackend(num_classes=3)
    seen: list[int] = []
    run = backend.run
    backend.run = lambda batch: (seen.append(started[0]), run(batch))[1]  # type: ignore[method-assign]
    settings = RunSettings("whole", (8, 8), (8, 8), 1, flip=False, softmax=False, keep_probs=False)
    summary = run_pipeline(backend, settings, items, OutputSpec(None, ("labels",), ()), prefetch=3, readers=2)
    assert summary.succeeded == 30 and len(seen) == 30
    assert all(count <= k + 3 for k, count in enumerate(seen, start=1)), seen  # never more than `prefetch` ahead
