"""A procedural demo dataset drawn on the fly from a seed: no files, no downloads.

Street-like scenes with the classes of `classes.DEMO_CLASSES`: a road trapezoid below a horizon, then discs,
(rotated) boxes and triangles of random size and position painted in random order, so they occlude each other.
Every region, background included, draws its colour and texture (flat, stripes, checker or pixel noise) from the
same distribution, so colour does not identify a class; shape does. An illumination gradient, an optional blur
and sensor noise finish the image. The labeled, unlabeled and val splits use different seed streams, so they are
disjoint by construction; a sample is a pure function of (split, index, seed, size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np

BACKGROUND, ROAD, DISC, BOX, TRIANGLE = range(5)  # indices into classes.DEMO_CLASSES
_SPLIT_STREAMS = {"labeled": 101, "unlabeled": 102, "val": 103}
Grid = tuple[np.ndarray, np.ndarray]


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> Grid:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return yy, xx


def _fill(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Colours (..., 3) in [0, 1] for the pixels at (yy, xx): two random colours blended by a random texture."""
    c1, c2 = rng.uniform(0.05, 0.95, 3).astype(np.float32), rng.uniform(0.05, 0.95, 3).astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # flat
        t = np.zeros_like(yy)
    elif kind == 1:  # stripes
        f, a, phase = rng.uniform(0.2, 0.8), rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
        t = 0.5 + 0.5 * np.sin(f * (xx * math.cos(a) + yy * math.sin(a)) + phase)
    elif kind == 2:  # checker
        p = rng.integers(3, 10)
        t = ((xx // p + yy // p) % 2).astype(np.float32)
    else:  # pixel noise
        t = rng.random(yy.shape, dtype=np.float32)
    amount = rng.uniform(0.2, 0.7)
    return c1 + (c2 - c1) * (amount * t)[..., None]


def _road(rng: np.random.Generator, g: Grid, h: int, w: int) -> np.ndarray:
    yy, xx = g
    horizon = rng.uniform(0.4, 0.65) * h
    x_bottom, x_top = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * w
    half_bottom, half_top = rng.uniform(0.35, 0.8) * w, rng.uniform(0.06, 0.2) * w
    t = (yy - horizon) / max(h - horizon, 1.0)
    centre = x_top + (x_bottom - x_top) * t
    return (yy >= horizon) & (np.abs(xx - centre) < half_top + (half_bottom - half_top) * t)


def _disc(rng: np.random.Generator, g: Grid, h: int, w: int) -> np.ndarray:
    yy, xx = g
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.06, 0.2) * min(h, w)
    aspect = rng.uniform(0.8, 1.25)
    return ((xx - cx) / (r * aspect)) ** 2 + ((yy - cy) * aspect / r) ** 2 < 1.0


def _box(rng: np.random.Generator, g: Grid, h: int, w: int) -> np.ndarray:
    yy, xx = g
    cy, cx, angle = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(-0.4, 0.4)
    half_u, half_v = rng.uniform(0.05, 0.2, 2) * min(h, w)
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = (yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle)
    return (np.abs(u) < half_u) & (np.abs(v) < half_v)


def _triangle(rng: np.random.Generator, g: Grid, h: int, w: int) -> np.ndarray:
    yy, xx = g
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.08, 0.25) * min(h, w)
    angles = rng.uniform(0, 2 * math.pi) + np.array([0.0, 2.0, 4.0]) * math.pi / 3 + rng.uniform(-0.3, 0.3, 3)
    vy, vx = cy + r * np.sin(angles), cx + r * np.cos(angles)
    inside = np.ones(yy.shape, dtype=bool)
    for k in range(3):  # counter-clockwise vertices: inside = left of every edge
        j = (k + 1) % 3
        inside &= (vx[j] - vx[k]) * (yy - vy[k]) - (vy[j] - vy[k]) * (xx - vx[k]) >= 0
    return inside


_SHAPES: dict[int, Callable[[np.random.Generator, Grid, int, int], np.ndarray]] = {
    DISC: _disc,
    BOX: _box,
    TRIANGLE: _triangle,
}


def _box_blur(img: np.ndarray) -> np.ndarray:
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


def render(split: str, index: int, seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One demo scene: image uint8 (H, W, 3) and label uint8 (H, W) with values 0..4 (DEMO_CLASSES)."""
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAMS[split], index]))
    grid = _grid(height, width)
    yy, xx = grid
    image = _fill(rng, yy, xx)
    label = np.zeros((height, width), dtype=np.uint8)
    regions = [ROAD] if rng.random() < 0.85 else []
    regions += [int(c) for c in rng.integers(DISC, TRIANGLE + 1, size=rng.integers(3, 8))]
    for cls in regions:  # painter's order: later shapes occlude earlier ones
        mask = _road(rng, grid, height, width) if cls == ROAD else _SHAPES[cls](rng, grid, height, width)
        image[mask] = _fill(rng, yy[mask], xx[mask])
        label[mask] = cls
    tilt = rng.uniform(0, 2 * math.pi)
    gain = rng.uniform(0.6, 1.2) + rng.uniform(-0.6, 0.6) * (
        (xx / width - 0.5) * math.cos(tilt) + (yy / height - 0.5) * math.sin(tilt)
    )
    image = image * gain[..., None]
    if rng.random() < 0.5:
        image = _box_blur(image)
    image = image + rng.uniform(0.0, 0.05) * rng.standard_normal(image.shape, dtype=np.float32)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), label


class DemoSource:
    """`count` demo scenes of one split, rendered on demand (the Source interface of `data.sources`)."""

    def __init__(self, split: str, count: int, *, seed: int, height: int, width: int) -> None:
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
        self.split, self.count, self.seed, self.height, self.width = split, count, seed, height, width

    def __len__(self) -> int:
        return self.count

    def load(self, index: int, *, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if not 0 <= index < self.count:
            raise IndexError(f"demo {self.split} index {index} out of range 0..{self.count - 1}")
        image, label = render(self.split, index, self.seed, self.height, self.width)
        return image, (label if with_label else None)

    def name(self, index: int) -> str:
        return f"demo_{self.split}_{index:05d}"
