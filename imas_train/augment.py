"""Weak augmentation A_w, the strong intensity pool A_s^I and normalisation (docs/algorithm.md §5.3, §5.4).

Every random draw comes from the numpy Generator the caller passes in (the data pipeline builds it from a
per-sample seed), never from global random state, so an augmented sample is a pure function of its seed.

* A_w = resize -> horizontal flip (p=0.5) -> pad bottom/right to the crop -> random crop. The random-size resize
  rules have no albumentations equivalent, so `RandomRescale` is a small custom transform; flip, pad and crop are
  albumentations' own. A `valid` mask (False on padding) travels through the same geometry.
* A_s^I = two ops drawn with replacement from the 12-op table `STRONG_OPS`, applied with PIL to the weak crop, so
  the strong view stays pixel-aligned with the weak one.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

# albumentations otherwise queries PyPI for a newer version at import (a 2 s timeout on offline training hosts)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.core.transforms_interface import DualTransform  # noqa: E402
from PIL import Image, ImageEnhance, ImageFilter, ImageOps  # noqa: E402

from imas_core.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, PAD_RGB  # noqa: E402

ScaleMode = Literal["fixed_base", "long_side", "relative"]
_PAD_MARK = 255  # the valid-mask channel starts at 0 and is padded with the label fill value: 255 marks padding


def resize_shape(
    mode: ScaleMode,
    height: int,
    width: int,
    draw: random.Random,
    *,
    scale_range: tuple[float, float],
    base_size: tuple[int, int],
    long_side_range: tuple[int, int],
) -> tuple[int, int]:
    """Output (H, W) of the random resize, one draw from `draw`.

    fixed_base (Cityscapes): s = lo + (hi - lo)·U, output (⌊base_h·s⌋, ⌊base_w·s⌋), ignoring the input size.
    long_side (VOC): long side uniform integer in [a, b] inclusive, short side ⌊long·short₀/long₀ + 0.5⌋.
    relative (custom, demo): s = lo + (hi - lo)·U times the input size, rounded half up.
    """
    if mode == "fixed_base":
        s = scale_range[0] + (scale_range[1] - scale_range[0]) * draw.random()
        return max(1, math.floor(base_size[0] * s)), max(1, math.floor(base_size[1] * s))
    if mode == "long_side":
        long = draw.randint(long_side_range[0], long_side_range[1])
        if height >= width:
            return long, max(1, math.floor(long * width / height + 0.5))
        return max(1, math.floor(long * height / width + 0.5)), long
    if mode == "relative":
        s = scale_range[0] + (scale_range[1] - scale_range[0]) * draw.random()
        return max(1, math.floor(height * s + 0.5)), max(1, math.floor(width * s + 0.5))
    raise ValueError(f"scale_mode must be fixed_base, long_side or relative, got {mode!r}")


class RandomRescale(DualTransform):
    """Random-size resize by one of the rules of `resize_shape` (custom: albumentations' resizes have fixed
    targets or scale relative to the input only). Images use PIL bilinear and masks PIL nearest, like the
    reference: PIL's bilinear filter widens its support when downscaling (antialiasing), cv2's does not."""

    def __init__(
        self,
        mode: ScaleMode,
        *,
        scale_range: tuple[float, float],
        base_size: tuple[int, int],
        long_side_range: tuple[int, int],
    ) -> None:
        super().__init__(p=1.0)
        self.mode = mode
        self.scale_range = scale_range
        self.base_size = base_size
        self.long_side_range = long_side_range

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        size = resize_shape(
            self.mode,
            height,
            width,
            self.py_random,
            scale_range=self.scale_range,
            base_size=self.base_size,
            long_side_range=self.long_side_range,
        )
        return {"size": size}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("mode", "scale_range", "base_size", "long_side_range")


@dataclass(frozen=True)
class WeakView:
    """One weak-augmented crop: image uint8 (H, W, 3); label uint8 (H, W) or None; valid bool (H, W)."""

    image: np.ndarray
    label: np.ndarray | None
    valid: np.ndarray


class WeakAugment:
    """A_w: resize -> hflip p=0.5 -> pad bottom/right (image PAD_RGB, label `label_pad`) -> random crop.

    `label_pad` is 255 (ignored) for every method but U2PL, whose reference pads labels with class 0.
    """

    def __init__(
        self,
        *,
        crop_size: int,
        scale_mode: ScaleMode,
        scale_range: tuple[float, float],
        base_size: tuple[int, int],
        long_side_range: tuple[int, int],
        label_pad: int = IGNORE_INDEX,
    ) -> None:
        self.crop_size = crop_size
        self.label_pad = label_pad
        self._resize_flip = A.Compose(
            [
                RandomRescale(
                    scale_mode, scale_range=scale_range, base_size=base_size, long_side_range=long_side_range
                ),
                A.HorizontalFlip(p=0.5),
            ]
        )
        self._pad_crop = A.Compose(
            [
                # top_left keeps the image at the origin, so padding goes to the bottom/right as in the reference.
                A.PadIfNeeded(
                    min_height=crop_size,
                    min_width=crop_size,
                    position="top_left",
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=PAD_RGB,
                    fill_mask=IGNORE_INDEX,
                ),
                A.RandomCrop(height=crop_size, width=crop_size),
            ]
        )

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator) -> WeakView:
        """Augment `image` (H, W, 3) uint8 and its optional label (H, W) uint8 with draws from `rng`."""
        # Compose(seed=...) and set_random_seed give every child transform its OWN generator with the SAME seed,
        # so the scale, flip and crop draws would be the same numbers. One shared pair of generators avoids that.
        seed = int(rng.integers(0, 2**63))
        generators = (np.random.default_rng(seed), random.Random(seed))
        self._resize_flip.set_random_state(*generators)
        self._pad_crop.set_random_state(*generators)
        out = self._resize_flip(image=image, masks=[] if label is None else [label])
        # The valid marker starts after resize and flip (they leave an all-zero map unchanged); padding fills 255.
        marker = np.zeros(out["image"].shape[:2], dtype=np.uint8)
        masks = [marker] if label is None else [np.asarray(out["masks"][0]), marker]
        out = self._pad_crop(image=out["image"], masks=masks)
        out_masks = list(out["masks"])
        valid = np.asarray(out_masks[-1]) != _PAD_MARK
        out_label = None if label is None else np.ascontiguousarray(out_masks[0])
        if out_label is not None and self.label_pad != IGNORE_INDEX:
            out_label[~valid] = self.label_pad
        return WeakView(image=np.ascontiguousarray(out["image"]), label=out_label, valid=valid)


# ------------------------------------------------------------------------------------- strong intensity pool A_s^I
# PIL ops with the reference magnitudes: albumentations' near-equivalents differ (none softens sharpness, and its
# HSV and contrast maths are not PIL's), so none is used here (docs/algorithm.md §5.4).

_MODIFIER = 0.999  # m = (max - min)·u·0.999, hard-wired in the reference


def _hue(img: Image.Image, shift: float) -> Image.Image:
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + int(shift * 255)) % 256).astype(np.uint8)  # int() truncates
    return Image.fromarray(hsv, "HSV").convert("RGB")


class StrongOp(NamedTuple):
    """One op of A_s^I: `apply(img, param)`, its magnitude range, and the parameter as a function of m."""

    apply: Callable[[Image.Image, Any], Image.Image]
    magnitude_range: tuple[float, float] | None  # (min, max) of m = (max - min)·u·0.999; None: no parameter
    param: Callable[[float], Any]


def _no_param(m: float) -> None:
    return None


STRONG_OPS: dict[str, StrongOp] = {
    "identity": StrongOp(lambda img, _: img, None, _no_param),
    "autocontrast": StrongOp(lambda img, _: ImageOps.autocontrast(img), None, _no_param),
    "equalize": StrongOp(lambda img, _: ImageOps.equalize(img), None, _no_param),
    "invert": StrongOp(lambda img, _: ImageOps.invert(img), None, _no_param),
    "blur": StrongOp(lambda img, s: img.filter(ImageFilter.GaussianBlur(radius=s)), (0.1, 2.0), lambda m: 0.1 + m),
    "contrast": StrongOp(lambda img, f: ImageEnhance.Contrast(img).enhance(f), (0.1, 0.95), lambda m: 0.95 - m),
    "brightness": StrongOp(lambda img, f: ImageEnhance.Brightness(img).enhance(f), (0.1, 0.95), lambda m: 0.95 - m),
    "color": StrongOp(lambda img, f: ImageEnhance.Color(img).enhance(f), (0.1, 0.95), lambda m: 0.95 - m),
    "sharpness": StrongOp(lambda img, f: ImageEnhance.Sharpness(img).enhance(f), (0.1, 0.95), lambda m: 0.95 - m),
    "hue": StrongOp(_hue, (0.0, 0.5), lambda m: m),  # the sign is drawn separately
    "posterize": StrongOp(lambda img, b: ImageOps.posterize(img, b), (4, 8), lambda m: 8 - max(1, math.ceil(m))),
    "solarize": StrongOp(
        lambda img, t: ImageOps.solarize(img, t), (1, 256), lambda m: min(256, max(1, 256 - math.ceil(m)))
    ),
}


def op_param(name: str, u: float, *, negative: bool = False) -> Any:
    """The parameter of op `name` for u in [0, 1]: m = (max - min)·u·0.999 mapped by the op's rule.

    Args:
        name: a key of `STRONG_OPS`.
        u: the uniform draw.
        negative: hue only: shift left instead of right.
    """
    op = STRONG_OPS[name]
    if op.magnitude_range is None:
        return None
    low, high = op.magnitude_range
    value = op.param((high - low) * u * _MODIFIER)
    return -value if (negative and name == "hue") else value


def apply_strong_ops(image: np.ndarray, ops: list[tuple[str, Any]]) -> np.ndarray:
    """Apply `(name, param)` ops in order to an RGB uint8 (H, W, 3) array with PIL; returns a new array."""
    pil = Image.fromarray(image)
    for name, param in ops:
        pil = STRONG_OPS[name].apply(pil, param)
    return np.array(pil.convert("RGB"))


def sample_strong_ops(rng: np.random.Generator, num_ops: int = 2) -> list[tuple[str, Any]]:
    """Draw `num_ops` ops with replacement and their parameters (a fixed number of draws per op)."""
    names = list(STRONG_OPS)
    picks = rng.integers(0, len(names), size=num_ops)
    ops = []
    for k in picks:
        u, sign = rng.random(), rng.random()
        ops.append((names[int(k)], op_param(names[int(k)], u, negative=sign < 0.5)))
    return ops


def strong_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2) -> np.ndarray:
    """A_s^I on a weak crop: RGB uint8 (H, W, 3) in, same size out, pixel-aligned with the input."""
    return apply_strong_ops(image, sample_strong_ops(rng, num_ops))


# ----------------------------------------------------------------------------------------------------- normalise


def to_chw_uint8(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> uint8 (3, H, W): what data workers return (a quarter of float32's bytes to move)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> float32 normalised there: divide by 255, subtract the ImageNet mean,
    divide by the std. Done on the training device, after the (pinned, asynchronous) copy of the uint8 batch; the
    element-wise float32 arithmetic is the same as on the CPU, so results are identical."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std
