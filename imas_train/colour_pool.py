"""The colour strong augmentation of ST++ / UniMatch / Dual Teacher, and ST++'s Cutout (STPlusPlus.md §2.D item 3).

Per sample, in this order, on an RGB uint8 crop (after the weak geometry, so the view stays pixel-aligned):
ColorJitter(brightness 0.5, contrast 0.5, saturation 0.5, hue 0.25) with p = 0.8, RandomGrayscale p = 0.2, Gaussian
blur σ ~ U(0.1, 2.0) with p = 0.5; then, for ST++'s pseudo-labeled images, Cutout p = 0.5 whose box becomes ignore
(255) in the label. Every draw comes from the numpy Generator the caller passes in, a fixed number per call.

**Why PIL and not albumentations.** The references run torchvision transforms on PIL images, and torchvision's PIL
backend is PIL itself: brightness, contrast and saturation are ``ImageEnhance.Brightness/Contrast/Color``, hue
shifts the H channel of PIL's 8-bit HSV by ``int(factor·255)`` with wrap-around, grayscale is ``convert("L")``
replicated to 3 channels, and ST++'s blur is ``ImageFilter.GaussianBlur(radius=σ)``. albumentations 2.0.8 was
measured against these on random and smoothed 64×80 images:

* ``A.ColorJitter``: same factor ranges and random order, but brightness is the only op that matches exactly;
  contrast blends towards the float mean of the OpenCV gray image (PIL: the mean rounded to an integer), ±1 on
  ≈ 8–50 % of the pixels; saturation ±1 on 25–40 %; hue is shifted in OpenCV's 180-level HSV, not PIL's 256-level
  one. The four ops cannot be used separately through the transform, so none is used.
* ``A.ToGray`` (OpenCV weights): ±1 on ≈ 0.13 % of all RGB colours.
* ``A.GaussianBlur(blur_limit=0)``: a true Gaussian kernel with reflect-101 borders, while PIL's GaussianBlur is
  three extended box blurs with clamped borders; up to 42 grey levels apart on noise (2 on smooth images).
* ``A.Erasing`` (the RandomErasing-like Cutout): draws the area from a range truncated to what can fit, the aspect
  from a range narrowed to fit, rounds the sides and places the box among feasible positions, with no rejection.
  ST++ rejects whole (aspect, position) draws until the box fits, which favours smaller, squarer boxes, and
  truncates the sides. ``A.CoarseDropout`` counts holes, not areas.

So every op here is PIL or numpy, exactly the reference's arithmetic, like the iMAS pool in ``augment.py``; the only
divergence from the references is the source of randomness (one numpy Generator instead of torch's and Python's
global RNGs, same distributions).

**Dual Teacher.** Its faithful strong view is ColorJitter + grayscale (no blur) on the *normalised batch tensor*, one
draw per batch, clamped to [0, 1] (DualTeacher.md §2 item 2, §4 row 6); that is a batch-level device op, not this
per-sample pool. ``colour_strong(..., blur_p=0)`` is the per-sample, unclamped option. Its CutMix post-mix jitter
(§2 item 3c) is ``colour_strong(..., brightness=(0.75, 1.25), contrast=(0.75, 1.25), saturation=(0.75, 1.25),
grayscale_p=0, blur_sigma=(0.15, 1.15))`` if its blur is PIL's, which the spec does not say.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

__all__ = [
    "ColourDraw",
    "adjust_hue",
    "colour_jitter",
    "grayscale",
    "gaussian_blur",
    "sample_colour_strong",
    "apply_colour_strong",
    "colour_strong",
    "sample_cutout_box",
    "cutout",
]

_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)  # jitter ops 0, 1, 2; hue is 3


@dataclass(frozen=True)
class ColourDraw:
    """The random choices of one `colour_strong` call.

    Attributes:
        factors: (brightness, contrast, saturation, hue) factors; None when the jitter does not fire. A factor whose
            range is the identity (e.g. brightness 0) is still drawn but its op is skipped, as torchvision does.
        order: the order of the jitter ops, a permutation of (0, 1, 2, 3) = (brightness, contrast, saturation, hue).
        skip: which of the four ops have an identity range.
        grayscale: apply RandomGrayscale.
        blur_sigma: σ of the Gaussian blur in pixels; None when the blur does not fire.
    """

    factors: tuple[float, float, float, float] | None
    order: tuple[int, int, int, int]
    skip: tuple[bool, bool, bool, bool]
    grayscale: bool
    blur_sigma: float | None


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's PIL hue shift: H of PIL's 8-bit HSV plus ``int(factor·255)`` (truncated), modulo 256.

    Args:
        img: RGB PIL image.
        factor: hue shift as a fraction of the hue circle, in [−0.5, 0.5].
    """
    if not -0.5 <= factor <= 0.5:
        raise ValueError(f"hue factor must be in [-0.5, 0.5], got {factor}")
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + int(factor * 255)) % 256).astype(np.uint8)
    return Image.fromarray(hsv, "HSV").convert("RGB")


def colour_jitter(
    image: np.ndarray,
    factors: tuple[float, float, float, float],
    order: tuple[int, ...] = (0, 1, 2, 3),
    skip: tuple[bool, ...] = (False, False, False, False),
) -> np.ndarray:
    """Apply brightness, contrast, saturation (``ImageEnhance`` factors, 1 = identity) and hue (`adjust_hue`).

    Args:
        image: RGB uint8 (H, W, 3).
        factors: (brightness, contrast, saturation, hue).
        order: op indices in application order (0 brightness, 1 contrast, 2 saturation, 3 hue).
        skip: ops not to apply.

    Returns:
        A new RGB uint8 (H, W, 3) array.
    """
    _check_image(image)
    pil = Image.fromarray(image)
    for op in order:
        if skip[op]:
            continue
        pil = adjust_hue(pil, factors[3]) if op == 3 else _ENHANCERS[op](pil).enhance(factors[op])
    return np.array(pil)


def grayscale(image: np.ndarray) -> np.ndarray:
    """PIL's luma ``convert("L")`` (ITU-R 601-2) replicated to 3 channels: RGB uint8 (H, W, 3) in and out."""
    _check_image(image)
    luma = np.array(Image.fromarray(image).convert("L"))
    return np.repeat(luma[..., None], 3, axis=2)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """PIL ``GaussianBlur(radius=sigma)``; sigma is the standard deviation in pixels. RGB uint8 in and out."""
    _check_image(image)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    return np.array(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


def _factor_range(value: float | tuple[float, float], centre: float, name: str) -> tuple[float, float]:
    """torchvision's rule: a number v means [max(0, centre − v), centre + v] ([−v, v] for hue)."""
    if isinstance(value, tuple):
        lo, hi = value
    elif value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    else:
        lo, hi = centre - value, centre + value
        lo = max(lo, 0.0) if centre == 1.0 else lo
    if lo > hi or (centre == 1.0 and lo < 0) or (centre == 0.0 and not -0.5 <= lo <= hi <= 0.5):
        raise ValueError(f"invalid {name} range ({lo}, {hi})")
    return float(lo), float(hi)


def sample_colour_strong(
    rng: np.random.Generator,
    *,
    brightness: float | tuple[float, float] = 0.5,
    contrast: float | tuple[float, float] = 0.5,
    saturation: float | tuple[float, float] = 0.5,
    hue: float | tuple[float, float] = 0.25,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> ColourDraw:
    """Draw one `ColourDraw` (STPlusPlus.md §2.D item 3, §3 "SDA").

    Draws, always all of them and in this order: jitter coin, 4 factors (uniform in their ranges), a permutation of
    the 4 ops, grayscale coin, blur coin, σ ~ U(blur_sigma). An op fires when its coin is < its p.

    Args:
        rng: numpy Generator.
        brightness, contrast, saturation: a number v (factor ~ U(max(0, 1 − v), 1 + v)) or a (min, max) range.
        hue: a number v in [0, 0.5] (factor ~ U(−v, v)) or a range inside [−0.5, 0.5].
        jitter_p, grayscale_p, blur_p: probabilities of the three ops.
        blur_sigma: (min, max) of σ in pixels.
    """
    ranges = (
        _factor_range(brightness, 1.0, "brightness"),
        _factor_range(contrast, 1.0, "contrast"),
        _factor_range(saturation, 1.0, "saturation"),
        _factor_range(hue, 0.0, "hue"),
    )
    for name, p in (("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if not 0.0 <= blur_sigma[0] <= blur_sigma[1]:
        raise ValueError(f"blur_sigma must satisfy 0 <= min <= max, got {blur_sigma}")
    jitter_coin = rng.random()
    b, c, s, h = (float(rng.uniform(lo, hi)) for lo, hi in ranges)
    order = tuple(int(i) for i in rng.permutation(4))
    gray_coin, blur_coin = rng.random(), rng.random()
    sigma = float(rng.uniform(*blur_sigma))
    skip = tuple(lo == hi == centre for (lo, hi), centre in zip(ranges, (1.0, 1.0, 1.0, 0.0), strict=True))
    return ColourDraw(
        factors=(b, c, s, h) if jitter_coin < jitter_p else None,
        order=(order[0], order[1], order[2], order[3]),
        skip=(skip[0], skip[1], skip[2], skip[3]),
        grayscale=bool(gray_coin < grayscale_p),
        blur_sigma=sigma if blur_coin < blur_p else None,
    )


def apply_colour_strong(image: np.ndarray, draw: ColourDraw) -> np.ndarray:
    """Jitter, then grayscale, then blur, as drawn. RGB uint8 (H, W, 3) in, a new array of the same shape out."""
    _check_image(image)
    out = image.copy()
    if draw.factors is not None:
        out = colour_jitter(out, draw.factors, draw.order, draw.skip)
    if draw.grayscale:
        out = grayscale(out)
    if draw.blur_sigma is not None:
        out = gaussian_blur(out, draw.blur_sigma)
    return out


def colour_strong(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    brightness: float | tuple[float, float] = 0.5,
    contrast: float | tuple[float, float] = 0.5,
    saturation: float | tuple[float, float] = 0.5,
    hue: float | tuple[float, float] = 0.25,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> np.ndarray:
    """The colour strong augmentation of one crop; defaults are ST++'s / UniMatch's (STPlusPlus.md §3 "SDA").

    Deterministic given the Generator's state. See `sample_colour_strong` for the arguments.

    Args:
        image: RGB uint8 (H, W, 3).
        rng: numpy Generator (advanced by a fixed number of draws).

    Returns:
        A new RGB uint8 (H, W, 3) array, pixel-aligned with the input.
    """
    _check_image(image)
    draw = sample_colour_strong(
        rng,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue,
        jitter_p=jitter_p,
        grayscale_p=grayscale_p,
        blur_p=blur_p,
        blur_sigma=blur_sigma,
    )
    return apply_colour_strong(image, draw)


# ------------------------------------------------------------------------------------------------------- Cutout


def sample_cutout_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    area_range: tuple[float, float] = (0.02, 0.4),
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 10_000,
) -> tuple[int, int, int, int]:
    """ST++'s Cutout box (STPlusPlus.md §2.D item 3, §7 oracle 6).

    Area A ~ U(area_range)·H·W, drawn once. Then, until the box fits: aspect r ~ U(aspect_range) (uniform, not
    log-uniform), box height ⌊√(A·r)⌋ and width ⌊√(A/r)⌋ (so r = height/width), top-left row uniform in [0, H) and
    column uniform in [0, W); accepted when y0 + h <= H and x0 + w <= W. Assumptions where the spec is silent: the
    area is kept and aspect and position are redrawn on a retry; r is height/width; sides are truncated.

    Args:
        height, width: H, W of the crop.
        rng: numpy Generator. Draws: area, then (aspect, row, column) per attempt.
        area_range: fraction of the image area.
        aspect_range: range of r.
        max_attempts: raise instead of looping forever (a very elongated image may admit no box).

    Returns:
        (y0, y1, x0, x1), half-open pixel coordinates.
    """
    lo, hi = area_range
    if not 0.0 < lo <= hi <= 1.0 or not 0.0 < aspect_range[0] <= aspect_range[1]:
        raise ValueError(f"invalid cutout ranges: area {area_range}, aspect {aspect_range}")
    area = rng.uniform(lo, hi) * height * width
    for _ in range(max_attempts):
        ratio = rng.uniform(*aspect_range)
        box_h, box_w = int(np.sqrt(area * ratio)), int(np.sqrt(area / ratio))
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        if y0 + box_h <= height and x0 + box_w <= width:
            return y0, y0 + box_h, x0, x0 + box_w
    raise ValueError(f"no cutout box of area {area:.0f} px fits a {height}x{width} image in {max_attempts} draws")


def cutout(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    p: float = 0.5,
    area_range: tuple[float, float] = (0.02, 0.4),
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
) -> tuple[np.ndarray, np.ndarray]:
    """ST++'s Cutout: fill a random box with per-pixel random values; its label pixels become ignore (255).

    With probability p, `sample_cutout_box` draws the box and every pixel and channel inside it gets ⌊U(0, 255)⌋
    (what assigning float draws to a uint8 array does; values 0..254; per channel is an assumption, the spec says
    "per-pixel uniform random values in [0, 255]"). The dataset sets ``label[ignore] = 255`` (STPlusPlus.md §2.D
    item 3, §4 row 5); apply Cutout after `colour_strong` and to pseudo-labeled images only.

    Args:
        image: RGB uint8 (H, W, 3).
        rng: numpy Generator. Draws: the coin, then (when it fires) the box, then the H_box·W_box·3 fill values.
        p: probability of cutting a box.
        area_range, aspect_range: see `sample_cutout_box`.

    Returns:
        image: a new uint8 (H, W, 3) array; ignore: (H, W) bool, True exactly inside the box (all False when the
        coin did not fire).
    """
    _check_image(image)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    out = image.copy()
    ignore = np.zeros(image.shape[:2], dtype=bool)
    if rng.random() >= p:
        return out, ignore
    y0, y1, x0, x1 = sample_cutout_box(
        image.shape[0], image.shape[1], rng, area_range=area_range, aspect_range=aspect_range
    )
    out[y0:y1, x0:x1] = rng.uniform(0, 255, (y1 - y0, x1 - x0, 3)).astype(np.uint8)
    ignore[y0:y1, x0:x1] = True
    return out, ignore
