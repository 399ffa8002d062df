"""Sliding-window prediction of full images with a torch model (docs/algorithm.md §8); geometry from `imas_core.tiling`.

Protocols:
* ``imas`` (the reference): windows at 0, stride, 2*stride, ... truncated at the border and fed at their own size;
  softmax probabilities are **summed** (no count normalisation; the argmax is unaffected).
* ``full_tiles``: every window a full tile, the last one per axis moved back flush with the border; an image smaller
  than a tile is padded bottom/right with the normalised training pad colour; softmax is averaged with a count map
  and cropped back.
* ``whole``: one forward of the whole image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from imas_core.constants import IMAGENET_MEAN, IMAGENET_STD, PAD_RGB
from imas_core.tiling import Window, default_stride, padded_shape, plan_windows

__all__ = ["EvalProtocol", "normalised_pad_value", "predict_sliding", "window_count_map"]

EvalProtocol = Literal["imas", "full_tiles", "whole"]
Model = Callable[[Tensor], Tensor]


def normalised_pad_value(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The pad colour RGB (123, 116, 103) after /255 and ImageNet mean/std normalisation, shape (3,)."""
    rgb = torch.tensor(PAD_RGB, dtype=torch.float64) / 255.0
    value = (rgb - torch.tensor(IMAGENET_MEAN, dtype=torch.float64)) / torch.tensor(IMAGENET_STD, dtype=torch.float64)
    return value.to(device=device, dtype=dtype)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _resolve_stride(window: int | tuple[int, int], stride: int | tuple[int, int] | None) -> tuple[int, int]:
    if stride is not None:
        return _pair(stride)
    wh, ww = _pair(window)
    return default_stride(wh), default_stride(ww)


def window_count_map(
    height: int,
    width: int,
    window: int | tuple[int, int],
    stride: int | tuple[int, int] | None,
    protocol: EvalProtocol,
) -> Tensor:
    """How many windows cover each pixel of the image, (H, W) float32 (all ones for ``whole``).

    Dividing the ``imas`` sum by it gives the per-pixel mean probability.
    """
    if protocol == "whole":
        return torch.ones(height, width)
    ph, pw = padded_shape(height, width, window, protocol)
    count = torch.zeros(ph, pw)
    for win in plan_windows(height, width, window, _resolve_stride(window, stride), protocol):
        count[win.y0 : win.y1, win.x0 : win.x1] += 1
    return count[:height, :width]


def _probs(model: Model, batch: Tensor, num_classes: int) -> Tensor:
    logits = model(batch)
    expected = (batch.shape[0], num_classes, batch.shape[2], batch.shape[3])
    if tuple(logits.shape) != expected:
        raise ValueError(f"model returned {tuple(logits.shape)} for input {tuple(batch.shape)}; expected {expected}")
    return logits.float().softmax(dim=1)


def _accumulate(
    model: Model,
    canvas: Tensor,
    windows: list[Window],
    out: Tensor,
    num_classes: int,
    max_batch: int | None,
) -> None:
    """Forward equal-size windows of every image in chunks, adding their probabilities into `out` (N, C, H, W)."""
    n = canvas.shape[0]
    per_chunk = len(windows) if max_batch is None else max(1, max_batch // n)
    for start in range(0, len(windows), per_chunk):
        chunk = windows[start : start + per_chunk]
        crops = torch.cat([canvas[:, :, w.y0 : w.y1, w.x0 : w.x1] for w in chunk], dim=0)  # window-major
        probs = _probs(model, crops, num_classes)
        for k, w in enumerate(chunk):
            out[:, :, w.y0 : w.y1, w.x0 : w.x1] += probs[k * n : (k + 1) * n]


@torch.no_grad()
def predict_sliding(
    model: Model,
    images: Tensor,
    num_classes: int,
    window: int | tuple[int, int],
    stride: int | tuple[int, int] | None,
    protocol: EvalProtocol,
    *,
    max_batch: int | None = None,
) -> Tensor:
    """Class probabilities of whole images by sliding-window inference; the model must already be in eval mode.

    Args:
        model: maps (n, 3, h, w) normalised images to (n, C, h, w) logits at the input size.
        images: (N, 3, H, W) normalised images, on the model's device.
        num_classes: C.
        window: tile size, int or (h, w); 769 for the reference.
        stride: step between windows, int or (h, w); None = floor(window * 2 / 3) (512 for 769).
        protocol: "imas", "full_tiles" or "whole" (see the module docstring).
        max_batch: most crops per forward; None = all equal-size windows of the batch at once.

    Returns:
        (N, C, H, W) float32 on the images' device: summed probabilities for "imas", averaged probabilities
        otherwise. Take the argmax over dim 1 for labels.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    if protocol == "whole":
        return _probs(model, images, num_classes)
    if protocol not in ("imas", "full_tiles"):
        raise ValueError(f"protocol must be 'imas', 'full_tiles' or 'whole', got {protocol!r}")
    windows = plan_windows(h, w, window, _resolve_stride(window, stride), protocol)

    if protocol == "imas":
        out = images.new_zeros((n, num_classes, h, w), dtype=torch.float32)
        groups: dict[tuple[int, int], list[Window]] = {}
        for win in windows:
            groups.setdefault((win.y1 - win.y0, win.x1 - win.x0), []).append(win)
        for group in groups.values():
            _accumulate(model, images, group, out, num_classes, max_batch)
        return out

    ph, pw = padded_shape(h, w, window, protocol)
    canvas = images
    if (ph, pw) != (h, w):
        pad = normalised_pad_value(images.device, images.dtype).view(1, 3, 1, 1)
        canvas = pad.expand(n, 3, ph, pw).clone()
        canvas[:, :, :h, :w] = images
    out = images.new_zeros((n, num_classes, ph, pw), dtype=torch.float32)
    count = images.new_zeros((1, 1, ph, pw), dtype=torch.float32)
    for win in windows:
        count[:, :, win.y0 : win.y1, win.x0 : win.x1] += 1
    _accumulate(model, canvas, windows, out, num_classes, max_batch)
    return out.div_(count)[:, :, :h, :w].contiguous()
