"""Stitched export: whole images in, the `full_tiles` sliding window run inside the graph, final labels/probs out.

The window plan of a static image size is static, so the wrapper unrolls it with Python loops while tracing; the
graph is plain Slice/Concat/Reshape/Add/Mul/Div/Exp/Reduce* (no Loop, Scan, If or Pad), and only the batch N is
dynamic:

1. pad bottom/right with the training pad colour (raw RGB, before normalisation, as `imas_infer` pads) when the
   image is smaller than the window, then normalise;
2. cut the K windows of every image, stack them to (N, K, 3, h, w) and run the network once on (N*K, 3, h, w);
3. softmax (written out, see `channel_softmax`), reshape to (N, K, C, h, w), and assemble the canvas from
   *cells*: the rectangles between consecutive window boundaries (sorted unique y0/y1 and x0/x1). Every window
   covers a cell completely or not at all, so a cell is the sum of its covering windows' slices (in window order,
   as `imas_infer`'s NumPy stitcher adds them), divided by their static count. Cells are concatenated into rows
   and rows into the image; cells in the padding are never built, so no crop and no K full-size padded copies
   are needed.

The `labels` head is the argmax of the summed probabilities (the NumPy path's argmax); `probs` divides by the
count (averaged probabilities, docs/algorithm.md §8 `full_tiles`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imas_core.constants import PAD_RGB
from imas_core.tiling import Window, padded_shape, plan_windows

STITCHED_OUTPUTS = ("labels", "probs")  # logits cannot be averaged meaningfully: the protocol averages softmax


@dataclass(frozen=True)
class Cell:
    """One rectangle [y0, y1) x [x0, x1) of the image and the indices of the windows covering it."""

    y0: int
    y1: int
    x0: int
    x1: int
    windows: tuple[int, ...]


@dataclass(frozen=True)
class StitchPlan:
    """The static geometry of a stitched model: windows on the padded canvas, and cells row by row."""

    image_size: tuple[int, int]
    window: tuple[int, int]
    canvas: tuple[int, int]  # padded size (at least one window)
    windows: list[Window]
    rows: list[list[Cell]]  # cells of each band of rows, left to right; together they tile the image exactly


def _bands(edges: set[int], size: int) -> list[tuple[int, int]]:
    cuts = sorted({0, size} | {min(e, size) for e in edges})
    return list(zip(cuts, cuts[1:], strict=False))


def stitch_plan(image_size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]) -> StitchPlan:
    """The `full_tiles` windows of an `image_size` image (`imas_core.tiling.plan_windows`) and their cells."""
    h, w = image_size
    windows = plan_windows(h, w, window, stride, "full_tiles")
    rows = []
    for y0, y1 in _bands({e for win in windows for e in (win.y0, win.y1)}, h):
        row = []
        for x0, x1 in _bands({e for win in windows for e in (win.x0, win.x1)}, w):
            cover = tuple(
                k for k, win in enumerate(windows) if win.y0 <= y0 and y1 <= win.y1 and win.x0 <= x0 and x1 <= win.x1
            )
            row.append(Cell(y0, y1, x0, x1, cover))
        rows.append(row)
    canvas = padded_shape(h, w, window, "full_tiles")
    return StitchPlan((h, w), (int(window[0]), int(window[1])), canvas, windows, rows)


def channel_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 written out (max, subtract, exp, sum, divide): the same numbers as `torch.softmax`, but
    ONNX Runtime's CPU Softmax on a non-last axis transposes twice and is ~10x slower than these five ops."""
    shifted = logits - logits.amax(dim=1, keepdim=True)
    exp = torch.exp(shifted)
    return exp / exp.sum(dim=1, keepdim=True)


class StitchedWrapper(nn.Module):
    """Raw RGB 0-255 whole images (N, 3, H, W), float32 or uint8 -> full_tiles sliding window -> labels or probs.

    Args:
        teacher: maps normalised (n, 3, h, w) windows to (n, C, h, w) logits.
        mean: per-channel mean of 0-1 RGB.
        std: per-channel standard deviation of 0-1 RGB.
        num_classes: C (static, so the reshape to (N, K, C, h, w) keeps only N dynamic).
        image_size: the static (H, W) of the input images.
        window: (h, w) of every window.
        stride: (h, w) step between windows (the last window per axis is moved back flush with the border).
        output_kind: ``labels`` (N, H, W) uint8, or ``probs`` (N, C, H, W) float32 averaged probabilities.
        pad_rgb: raw colour of the padding when the image is smaller than the window.
    """

    scale: torch.Tensor
    shift: torch.Tensor
    pad: torch.Tensor

    def __init__(
        self,
        teacher: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        num_classes: int,
        image_size: tuple[int, int],
        window: tuple[int, int],
        stride: tuple[int, int],
        output_kind: str = "labels",
        pad_rgb: Sequence[int] = PAD_RGB,
    ) -> None:
        super().__init__()
        if output_kind not in STITCHED_OUTPUTS:
            raise ValueError(f"a stitched model outputs one of {STITCHED_OUTPUTS}, got {output_kind!r}")
        self.teacher = teacher.eval()
        self.output_kind = output_kind
        self.num_classes = int(num_classes)
        self.plan = stitch_plan(image_size, window, stride)
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)
        self.register_buffer("pad", torch.tensor([float(v) for v in pad_rgb]).view(1, 3, 1, 1), persistent=False)
        self.eval()  # the exporter restores the wrapper's own mode afterwards: it must be eval, not train

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (N, 3, H, W) raw RGB at exactly `image_size`. Returns (N, H, W) uint8 or (N, C, H, W) float32."""
        plan = self.plan
        (h, w), (ph, pw), (wh, ww) = plan.image_size, plan.canvas, plan.window
        x = image.float()
        if pw > w:  # pad-coloured strips: a pixel column times static zeros (broadcast to the strip) plus the colour
            x = torch.cat([x, x[:, :, :, :1] * torch.zeros(1, 1, 1, pw - w) + self.pad], dim=3)
        if ph > h:
            x = torch.cat([x, x[:, :, :1, :] * torch.zeros(1, 1, ph - h, 1) + self.pad], dim=2)
        x = x * self.scale + self.shift
        crops = [x[:, :, win.y0 : win.y1, win.x0 : win.x1] for win in plan.windows]
        windows = torch.stack(crops, dim=1).reshape(-1, 3, wh, ww)  # (N*K, 3, h, w), image-major
        probs = channel_softmax(self.teacher(windows).float())
        probs = probs.reshape(-1, len(plan.windows), self.num_classes, wh, ww)  # (N, K, C, h, w): -1 keeps N dynamic
        rows = []
        for row in plan.rows:
            cells = []
            for cell in row:
                total = None
                for k in cell.windows:  # one Slice over (k, y, x): a Gather of window k would copy all of it first
                    win = plan.windows[k]
                    ys, xs = slice(cell.y0 - win.y0, cell.y1 - win.y0), slice(cell.x0 - win.x0, cell.x1 - win.x0)
                    part = probs[:, k : k + 1, :, ys, xs]  # (N, 1, C, cell h, cell w)
                    total = part if total is None else total + part
                assert total is not None  # every cell of the image lies in some window
                if self.output_kind == "probs" and len(cell.windows) > 1:
                    total = total / float(len(cell.windows))
                cells.append(total)
            rows.append(torch.cat(cells, dim=4) if len(cells) > 1 else cells[0])
        canvas = torch.cat(rows, dim=3) if len(rows) > 1 else rows[0]
        canvas = canvas.reshape(-1, self.num_classes, h, w)  # (N, 1, C, H, W) -> (N, C, H, W); squeeze would add an If
        if self.output_kind == "probs":
            return canvas
        return torch.argmax(canvas, dim=1).to(torch.uint8)


def sliding_reference(
    teacher: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    images: np.ndarray,
    num_classes: int,
    window: tuple[int, int],
    stride: tuple[int, int],
) -> np.ndarray:
    """Averaged probabilities (N, C, H, W) of the teacher by the torch `full_tiles` sliding window, per image.

    The parity reference of stitched models: images are padded raw with the pad colour (as `imas_infer` pads) and
    normalised as the graph does, then `imas_train.sliding_window.predict_sliding` runs on the padded canvas.
    """
    from imas_train.sliding_window import predict_sliding

    std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, 3, 1, 1)
    mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, 3, 1, 1)
    scale, shift = 1.0 / (255.0 * std_t), -mean_t / std_t
    teacher.eval()
    outs = []
    with torch.inference_mode():
        for raw in images:
            h, w = raw.shape[1:]
            ph, pw = padded_shape(h, w, window, "full_tiles")
            canvas = np.empty((3, ph, pw), dtype=np.float32)
            canvas[...] = np.asarray(PAD_RGB, dtype=np.float32).reshape(3, 1, 1)
            canvas[:, :h, :w] = raw
            x = torch.from_numpy(canvas)[None] * scale + shift
            probs = predict_sliding(teacher, x, num_classes, window, stride, "full_tiles")
            outs.append(probs[:, :, :h, :w].numpy())
    return np.concatenate(outs)
