"""The module that is exported: raw RGB pixels in, one output head out, normalisation baked into the graph."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imas_export.options import InputDtype, OutputKind

OUTPUT_NAMES: dict[str, str] = {"logits": "logits", "probs": "probs", "labels": "labels"}
INPUT_NAME = "image"


class ExportWrapper(nn.Module):
    """Raw RGB 0-255 NCHW (float32 or uint8) -> teacher -> logits, softmax probabilities or uint8 labels.

    Normalisation `(x / 255 - mean) / std` is folded into one multiply-add whose constants live in the graph,
    so every runtime feeds the same raw pixels and the mean/std can never drift from training.

    Args:
        teacher: the segmentation model; `forward(x_normalised)` returns (N, C, H, W) logits at input size.
        mean: per-channel mean of 0-1 RGB (ImageNet's for every built-in config).
        std: per-channel standard deviation of 0-1 RGB.
        output_kind: ``logits`` (N, C, H, W) float, ``probs`` (N, C, H, W) float32 softmax over classes,
            ``labels`` (N, H, W) uint8 argmax (class count must be <= 256).
    """

    def __init__(
        self,
        teacher: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        output_kind: OutputKind = "logits",
    ) -> None:
        super().__init__()
        if output_kind not in OUTPUT_NAMES:
            raise ValueError(f"output_kind must be one of {sorted(OUTPUT_NAMES)}, got {output_kind!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
        self.teacher = teacher.eval()
        self.output_kind = output_kind
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (N, 3, H, W) raw RGB 0-255, float32 or uint8. Returns the head selected by `output_kind`."""
        x = image.float() * self.scale + self.shift
        logits = self.teacher(x)
        if self.output_kind == "logits":
            return logits
        if self.output_kind == "probs":
            return torch.softmax(logits.float(), dim=1)
        return torch.argmax(logits, dim=1).to(torch.uint8)


def example_input(batch: int, height: int, width: int, input_dtype: InputDtype) -> torch.Tensor:
    """A deterministic raw-pixel example for tracing: batch 2 so the exporter cannot specialise the batch to 1."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, height, width), generator=gen, dtype=torch.int64)
    return pixels.to(torch.uint8 if input_dtype == "uint8" else torch.float32)
