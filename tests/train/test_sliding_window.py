"""Sliding-window prediction (docs/algorithm.md §8) with pointwise fake models, whose stitched output must equal a
whole-image forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from imas_core.constants import IMAGENET_MEAN, IMAGENET_STD, PAD_RGB
from imas_train.sliding_window import normalised_pad_value, predict_sliding, window_count_map


class _Pointwise(nn.Module):
    """A 1x1 conv: each output pixel depends on its own input pixel only. Records input shapes and corners."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.calls: list[tuple[int, ...]] = []
        self.corners: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        self.corners += [(int(c[0, 0, 0]), int(c[1, 0, 0])) for c in x]
        return self.conv(x)


def _whole(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).softmax(1)


@pytest.mark.parametrize(("h", "w"), [(37, 53), (20, 30), (32, 64), (33, 20)])
@pytest.mark.parametrize("protocol", ["imas", "full_tiles"])
def test_stitched_equals_whole_and_covers_every_pixel(h: int, w: int, protocol: str) -> None:
    model = _Pointwise().eval()
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    probs = predict_sliding(model, images, 3, window=24, stride=16, protocol=protocol)  # type: ignore[arg-type]
    count = window_count_map(h, w, 24, 16, protocol)  # type: ignore[arg-type]
    assert bool((count > 0).all())
    assert probs.shape == (2, 3, h, w) and probs.dtype == torch.float32
    if protocol == "imas":
        probs = probs / count  # imas sums probabilities
    torch.testing.assert_close(probs, _whole(model, images))


def test_chunking_and_whole_protocol() -> None:
    model = _Pointwise().eval()
    images = torch.randn(2, 3, 40, 50)
    for protocol in ("imas", "full_tiles"):
        a = predict_sliding(model, images, 3, 24, 16, protocol)  # type: ignore[arg-type]
        b = predict_sliding(model, images, 3, 24, 16, protocol, max_batch=3)  # type: ignore[arg-type]
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(predict_sliding(model, images, 3, 24, None, "whole"), _whole(model, images))


def test_full_tiles_pads_small_images_with_the_normalised_pad_colour() -> None:
    model = _Pointwise().eval()
    images = torch.randn(1, 3, 10, 12)
    seen: list[torch.Tensor] = []
    model.register_forward_hook(lambda _m, args, _out: seen.append(args[0].clone()))
    predict_sliding(model, images, 3, window=16, stride=10, protocol="full_tiles")
    assert len(seen) == 1 and seen[0].shape == (1, 3, 16, 16)
    pad = (np.array(PAD_RGB) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    torch.testing.assert_close(normalised_pad_value(), torch.tensor(pad, dtype=torch.float32))
    expected = normalised_pad_value().view(3, 1, 1).expand(3, 16, 16).clone()
    expected[:, :10, :12] = images[0]
    assert torch.equal(seen[0][0], expected)


def test_imas_protocol_reproduces_the_reference_starts() -> None:
    # The real geometry: 1024x2048, window 769, default stride 512. Channels 0/1 hold the row/column index, so
    # each crop's top-left pixel reveals where it was taken.
    h, w = 1024, 2048
    images = torch.zeros(1, 3, h, w)
    images[0, 0] = torch.arange(h, dtype=torch.float32).view(h, 1)
    images[0, 1] = torch.arange(w, dtype=torch.float32).view(1, w)
    model = _Pointwise(num_classes=2).eval()
    predict_sliding(model, images, 2, window=769, stride=None, protocol="imas")
    assert sorted(model.corners) == [(y, x) for y in (0, 512) for x in (0, 512, 1024, 1536)]
    # Windows of equal shape share one forward; edge windows are truncated, not shifted back.
    assert sorted(model.calls) == sorted([(3, 3, 769, 769), (1, 3, 769, 512), (3, 3, 512, 769), (1, 3, 512, 512)])


def test_scaled_down_geometry_with_a_batch() -> None:
    model = _Pointwise().eval()
    predict_sliding(model, torch.randn(2, 3, 64, 128), 3, window=48, stride=32, protocol="imas")
    assert sorted(model.calls) == sorted([(6, 3, 48, 48), (2, 3, 48, 32), (6, 3, 32, 48), (2, 3, 32, 32)])


def test_wrong_number_of_classes_raises() -> None:
    with pytest.raises(ValueError, match="expected"):
        predict_sliding(_Pointwise(3).eval(), torch.randn(1, 3, 20, 20), 4, 16, 8, "imas")
