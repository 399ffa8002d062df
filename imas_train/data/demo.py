"""A procedural demo dataset drawn on the fly from a seed: no files, no downloads.

Street-like scenes with the 5 classes of `classes.DEMO_CLASSES`, built so that a tiny CPU model learns them in a
minute or two, yet 16 labeled images do not cover their variety and unlabeled images can matter:

* **Background**: a vertical gradient between two muted colours (saturation <= 0.35) with a smooth,
  low-frequency texture, like sky over terrain.
* **Road** (85% of scenes): a grey trapezoid below a horizon, half of them with a dashed centre line.
* **Objects**: 1 to 3 discs, (rotated) boxes and triangles, of radius 14-30% of the short side, painted in random
  order so they occlude each other and the road. Each class has two *cues*: a hue family (disc magenta to red, box
  cyan to blue, triangle orange to yellow-green; saturation >= 0.55, hue within +-0.11 of the family centre, so
  the families barely touch) and a texture (disc flat or radially shaded, box stripes, triangle checker).
  Independently for colour and texture, 30% of objects get a neutral version instead (a grey paint, a speckle
  texture): the cues are reliable when present but often absent, and then only the shape tells the class.
* **Contrast guarantee**: the road's grey and every object's paint lie at least `MIN_CONTRAST` = 0.25 (RGB
  distance, values in [0, 1]) from the mean colour of the pixels they cover, before capture. A failing paint is
  re-drawn up to 8 times, then an object's is stepped in brightness until it passes and the road takes the darkest
  or lightest asphalt, whichever is further (both always pass). `paint_scene` exposes the paints.
* **Capture**, different for every image: a global gain with an illumination gradient, a white-balance cast
  (x0.75-1.25 per channel), haze on half the images (up to 40% towards a light colour), a gamma (0.7-1.4), a 3x3
  blur on half the images and Gaussian sensor noise (sigma <= 0.04). With the partial cues, these nuisances are
  what 16 labeled scenes sample sparsely and hundreds of unlabeled ones fill in (configs/demo.yaml has the numbers).

The labeled, unlabeled and val splits use different seed streams, so they are disjoint by construction; a sample
is a pure function of (split, index, seed, size). A 96x128 scene renders in about 2 ms on one core.

`write_scenes` writes scenes as image files with their ground truth (``imas-train demo-scenes``), so that
``imas-infer --gt`` can score a demo model on the very scenes it was validated on.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from imas_core.atomic import atomic_write_bytes
from imas_core.classes import DEMO_PALETTE

BACKGROUND, ROAD, DISC, BOX, TRIANGLE = range(5)  # indices into classes.DEMO_CLASSES
_SPLIT_STREAMS = {"labeled": 101, "unlabeled": 102, "val": 103}
MIN_CONTRAST = 0.25  # RGB distance (values in [0, 1]) of a road or object paint from the mean of what it covers
HUE_FAMILY = {DISC: 0.97, BOX: 0.58, TRIANGLE: 0.18}  # hue centres (HSV, in turns); each family spans +-0.11
HUE_SPREAD = 0.11
NEUTRAL_SATURATION = 0.15  # off-family paints are greys of at most this saturation: colour says nothing
OFF_FAMILY = 0.3  # probability that an object's paint is neutral (and, independently, that its texture is speckle)
PREFERRED_TEXTURE = {DISC: ("flat", "radial"), BOX: ("stripes",), TRIANGLE: ("checker",)}
Grid = tuple[np.ndarray, np.ndarray]


class Paint(NamedTuple):
    """How the road or one object was painted, before capture (illumination, weather, blur, noise)."""

    cls: int
    colour: np.ndarray  # RGB in [0, 1]
    texture: str  # objects: "flat", "radial", "stripes", "checker" or "speckle"; road: "plain" or "lane"
    contrast: float  # RGB distance of `colour` from the mean of the pixels it was painted over


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> Grid:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a (cells+1)^2 random lattice, bilinearly upsampled to (height, width)."""
    lattice = rng.random((cells + 1, cells + 1), dtype=np.float32)
    fy = np.linspace(0, cells, height, dtype=np.float32)
    fx = np.linspace(0, cells, width, dtype=np.float32)
    y0, x0 = np.minimum(fy.astype(int), cells - 1), np.minimum(fx.astype(int), cells - 1)
    ty, tx = (fy - y0)[:, None], (fx - x0)[None, :]
    a, b = lattice[y0][:, x0], lattice[y0][:, x0 + 1]
    c, d = lattice[y0 + 1][:, x0], lattice[y0 + 1][:, x0 + 1]
    return (a * (1 - tx) + b * tx) * (1 - ty) + (c * (1 - tx) + d * tx) * ty


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _background(rng: np.random.Generator, g: Grid, h: int, w: int) -> np.ndarray:
    yy, _ = g
    top = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.45, 0.9))
    bottom = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.7))
    t = (yy / max(h - 1, 1))[..., None]
    texture = _smooth_noise(rng, h, w, int(rng.integers(2, 6)))[..., None] - 0.5
    return top + (bottom - top) * t + rng.uniform(0.1, 0.3) * texture


def _road(
    rng: np.random.Generator, g: Grid, h: int, w: int, background: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Paint]:
    """The road's mask, its colours (h, w, 3) (valid under the mask) and its paint."""
    yy, xx = g
    horizon = rng.uniform(0.4, 0.62) * h
    x_bottom, x_top = rng.uniform(0.3, 0.7) * w, rng.uniform(0.35, 0.65) * w
    half_bottom, half_top = rng.uniform(0.35, 0.8) * w, rng.uniform(0.06, 0.18) * w
    t = np.clip((yy - horizon) / max(h - horizon, 1.0), 0.0, 1.0)
    centre = x_top + (x_bottom - x_top) * t
    half = half_top + (half_bottom - half_top) * t
    mask = (yy >= horizon) & (np.abs(xx - centre) < half)
    under = background[mask].mean(0) if mask.any() else background.mean((0, 1))
    tint = rng.uniform(-0.025, 0.025, 3).astype(np.float32)
    for _ in range(8):  # asphalt grey, re-drawn until it stands out from the terrain it covers
        colour = np.clip(rng.uniform(0.12, 0.6) + tint, 0.0, 1.0)
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            break
    else:  # the darkest or the lightest asphalt, whichever is further from the terrain
        colour = np.clip((0.12 if under.mean() > 0.36 else 0.6) + tint, 0.0, 1.0)
    grain = rng.uniform(0.02, 0.08) * (rng.random((h, w), dtype=np.float32) - 0.5)
    image = np.broadcast_to(colour, (h, w, 3)) + grain[..., None]
    marked = rng.random() < 0.5
    if marked:  # dashed lane marking along the centre line, widening with depth
        period = rng.uniform(0.12, 0.25) * h
        dash = ((yy - horizon) % period) < 0.55 * period
        lane = mask & dash & (np.abs(xx - centre) < 0.04 * half + 0.5)
        image = np.where(lane[..., None], np.float32(rng.uniform(0.8, 0.95)), image)
    paint = Paint(ROAD, colour, "lane" if marked else "plain", float(np.linalg.norm(colour - under)))
    return mask, image, paint


def _disc(rng: np.random.Generator, g: Grid, h: int, w: int, r: float) -> np.ndarray:
    yy, xx = g
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.05, 0.95) * w
    aspect = rng.uniform(0.85, 1.2)
    return ((xx - cx) / (r * aspect)) ** 2 + ((yy - cy) * aspect / r) ** 2 < 1.0


def _box(rng: np.random.Generator, g: Grid, h: int, w: int, r: float) -> np.ndarray:
    yy, xx = g
    cy, cx, angle = rng.uniform(0.1, 0.9) * h, rng.uniform(0.05, 0.95) * w, rng.uniform(-0.35, 0.35)
    half_u, half_v = r * rng.uniform(0.65, 1.0, 2)
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = (yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle)
    return (np.abs(u) < half_u) & (np.abs(v) < half_v)


def _triangle(rng: np.random.Generator, g: Grid, h: int, w: int, r: float) -> np.ndarray:
    yy, xx = g
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.05, 0.95) * w
    r = 1.25 * r  # a triangle covers less of its circumcircle than a disc or box
    angles = rng.uniform(0, 2 * math.pi) + np.array([0.0, 2.0, 4.0]) * math.pi / 3 + rng.uniform(-0.2, 0.2, 3)
    vy, vx = cy + r * np.sin(angles), cx + r * np.cos(angles)
    inside = np.ones(yy.shape, dtype=bool)
    for k in range(3):  # counter-clockwise vertices: inside = left of every edge
        j = (k + 1) % 3
        inside &= (vx[j] - vx[k]) * (yy - vy[k]) - (vy[j] - vy[k]) * (xx - vx[k]) >= 0
    return inside


_SHAPES: dict[int, Callable[[np.random.Generator, Grid, int, int, float], np.ndarray]] = {
    DISC: _disc,
    BOX: _box,
    TRIANGLE: _triangle,
}


def _object_colour(rng: np.random.Generator, cls: int, under: np.ndarray) -> np.ndarray:
    """A saturated paint of `cls`'s hue family, or (OFF_FAMILY) a neutral one, >= MIN_CONTRAST from `under`."""
    neutral = rng.random() < OFF_FAMILY
    colour = under
    for _ in range(8):
        if neutral:
            colour = _hsv(rng.uniform(0, 1), rng.uniform(0.0, NEUTRAL_SATURATION), rng.uniform(0.05, 1.0))
        else:
            hue = HUE_FAMILY[cls] + rng.uniform(-HUE_SPREAD, HUE_SPREAD)
            colour = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            return colour
    # eight misses: step the brightness away from what lies under it; white or black is always far enough
    direction = -1.0 if under.mean() > 0.5 else 1.0
    for _ in range(20):
        colour = np.clip(colour + direction * 0.05, 0.0, 1.0)
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            break
    return colour


def _texture(
    rng: np.random.Generator, cls: int, yy: np.ndarray, xx: np.ndarray, mask: np.ndarray
) -> tuple[str, np.ndarray]:
    """The texture kind and its values in [-1, 1] for the masked pixels: the class's own kind, or speckle."""
    kinds = ("speckle",) if rng.random() < OFF_FAMILY else PREFERRED_TEXTURE[cls]
    kind = kinds[int(rng.integers(len(kinds)))]
    y, x = yy[mask], xx[mask]
    if kind == "flat":
        return kind, np.zeros_like(y)
    if kind == "speckle":
        return kind, 2 * rng.random(y.shape, dtype=np.float32) - 1
    if kind == "radial":  # shaded like a sphere lit from one side
        cy, cx = y.mean(), x.mean()
        extent = max(float(np.sqrt(((y - cy) ** 2 + (x - cx) ** 2).max())), 1.0)
        a = rng.uniform(0, 2 * math.pi)
        return kind, ((x - cx) * math.cos(a) + (y - cy) * math.sin(a)) / extent
    if kind == "stripes":
        period, a = rng.uniform(3.0, 7.0), rng.uniform(0, math.pi)
        return kind, np.sign(np.sin(2 * math.pi * (x * math.cos(a) + y * math.sin(a)) / period)).astype(np.float32)
    p = int(rng.integers(2, 5))  # checker
    return kind, (2 * ((x // p + y // p) % 2) - 1).astype(np.float32)


def _box_blur(img: np.ndarray) -> np.ndarray:
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


def paint_scene(
    split: str, index: int, seed: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, list[Paint], np.random.Generator]:
    """The scene before capture: float image (H, W, 3), label, the paints (road first), and the generator."""
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAMS[split], index]))
    grid = _grid(height, width)
    yy, xx = grid
    image = _background(rng, grid, height, width)
    label = np.zeros((height, width), dtype=np.uint8)
    paints: list[Paint] = []
    if rng.random() < 0.85:
        mask, road, paint = _road(rng, grid, height, width, image)
        image[mask] = road[mask]
        label[mask] = ROAD
        paints.append(paint)
    short = min(height, width)
    for cls in (int(c) for c in rng.integers(DISC, TRIANGLE + 1, size=rng.integers(1, 4))):
        mask = _SHAPES[cls](rng, grid, height, width, rng.uniform(0.14, 0.3) * short)
        if not mask.any():
            continue
        under = image[mask].mean(0)  # painter's order: the object occludes what came before
        colour = _object_colour(rng, cls, under)
        strength = rng.uniform(0.08, 0.2)
        kind, texture = _texture(rng, cls, yy, xx, mask)
        image[mask] = colour + strength * texture[:, None]
        label[mask] = cls
        paints.append(Paint(cls, colour, kind, float(np.linalg.norm(colour - under))))
    return image, label, paints, rng


def render(split: str, index: int, seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One demo scene: image uint8 (H, W, 3) and label uint8 (H, W) with values 0..4 (DEMO_CLASSES)."""
    image, label, _, rng = paint_scene(split, index, seed, height, width)
    yy, xx = _grid(height, width)
    # capture: illumination gradient, white balance, haze, gamma, optional blur, sensor noise
    tilt = rng.uniform(0, 2 * math.pi)
    gain = rng.uniform(0.8, 1.1) + rng.uniform(-0.3, 0.3) * (
        (xx / width - 0.5) * math.cos(tilt) + (yy / height - 0.5) * math.sin(tilt)
    )
    image = image * gain[..., None] * rng.uniform(0.75, 1.25, 3).astype(np.float32)
    if rng.random() < 0.5:
        haze = rng.uniform(0.0, 0.4)
        image = image * (1 - haze) + haze * _hsv(rng.uniform(0, 1), rng.uniform(0, 0.2), rng.uniform(0.6, 1.0))
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.5:
        image = _box_blur(image)
    image = image + rng.uniform(0.0, 0.04) * rng.standard_normal(image.shape, dtype=np.float32)
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


def write_scenes(output: Path, split: str, count: int, *, seed: int, height: int, width: int) -> list[str]:
    """Write `count` scenes of `split` as ``output/images/<name>.png`` (RGB) and ``output/labels/<name>.png``
    (palette PNG whose indices are the class ids 0..4, colours `DEMO_PALETTE`), each atomically; `<name>` is
    `DemoSource.name`, the same in both folders, as ``imas-infer --gt`` pairs them. Returns the names, in order.
    """
    from PIL import Image  # a training dependency; imported here like every image writer of the toolkit

    from imas_train.data.labels import label_png

    source = DemoSource(split, count, seed=seed, height=height, width=width)
    names = []
    for index in range(count):
        image, label = source.load(index, with_label=True)
        assert label is not None
        name = source.name(index)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        atomic_write_bytes(output / "images" / f"{name}.png", buffer.getvalue(), fsync=False)
        atomic_write_bytes(output / "labels" / f"{name}.png", label_png(label, DEMO_PALETTE), fsync=False)
        names.append(name)
    return names
