"""Window geometry of both protocols (docs/algorithm.md §8)."""

from __future__ import annotations

import numpy as np
import pytest

from imas_core.tiling import default_stride, padded_shape, plan_windows, window_starts


def test_reference_cityscapes_geometry() -> None:
    assert default_stride(769) == 512
    assert window_starts(1024, 769, 512, flush_last=False) == [0, 512]
    assert window_starts(2048, 769, 512, flush_last=False) == [0, 512, 1024, 1536]
    wins = plan_windows(1024, 2048, 769, 512, "imas")
    assert len(wins) == 8
    sizes = sorted((w.y1 - w.y0, w.x1 - w.x0) for w in wins)
    assert sizes.count((769, 769)) == 3 and sizes.count((769, 512)) == 1
    assert sizes.count((512, 769)) == 3 and sizes.count((512, 512)) == 1
    # The thin strip at height 1030 is faithful to the reference rule.
    assert window_starts(1030, 769, 512, flush_last=False) == [0, 512, 1024]


def test_voc_small_image_is_one_whole_window() -> None:
    assert plan_windows(375, 500, 769, 512, "imas") == [(0, 375, 0, 500)]


@pytest.mark.parametrize("protocol", ["imas", "full_tiles"])
def test_every_pixel_covered(protocol: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 300, size=2))
        win = int(rng.integers(1, 200))
        stride = int(rng.integers(1, win + 1))
        ph, pw = padded_shape(h, w, win, protocol)  # type: ignore[arg-type]
        count = np.zeros((ph, pw), dtype=np.int64)
        for y0, y1, x0, x1 in plan_windows(h, w, win, stride, protocol):  # type: ignore[arg-type]
            assert 0 <= y0 < y1 <= ph and 0 <= x0 < x1 <= pw
            if protocol == "full_tiles":
                assert (y1 - y0, x1 - x0) == (min(win, ph), min(win, pw)) == (win, win)
            count[y0:y1, x0:x1] += 1
        assert count[:h, :w].min() >= 1, (h, w, win, stride)


def test_full_tiles_last_window_is_flush_and_padding_only_when_small() -> None:
    assert window_starts(1024, 769, 512, flush_last=True) == [0, 255]
    assert window_starts(2048, 769, 512, flush_last=True) == [0, 512, 1024, 1279]
    assert window_starts(500, 769, 512, flush_last=True) == [0]
    assert padded_shape(500, 375, 769, "full_tiles") == (769, 769)
    assert padded_shape(1024, 2048, 769, "full_tiles") == (1024, 2048)


def test_rectangular_windows_and_bad_values() -> None:
    wins = plan_windows(100, 200, (50, 100), (50, 100), "full_tiles")
    assert [tuple(w) for w in wins] == [(0, 50, 0, 100), (0, 50, 100, 200), (50, 100, 0, 100), (50, 100, 100, 200)]
    with pytest.raises(ValueError):
        window_starts(10, 0, 1, flush_last=True)
    with pytest.raises(ValueError, match="larger than the window"):
        window_starts(100, 10, 11, flush_last=False)
    with pytest.raises(ValueError):
        plan_windows(10, 10, 5, 5, "sliding")  # type: ignore[arg-type]
