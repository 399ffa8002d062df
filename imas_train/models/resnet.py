"""Dilated ResNet encoder in plain torch, with torchvision's state_dict names
(docs/algorithm.md §4, docs/style.md §4.3).

Two stems:
* ``deep`` (faithful): three 3x3 convs in an ``nn.Sequential`` named ``conv1`` (ReLUs in slots 2 and 5, so the keys
  are ``conv1.{0,3,6}.weight`` and ``conv1.{1,4}.*``), then ``bn1`` over 2*width channels, and a ceil-mode max pool.
* ``standard``: torchvision's 7x7 ``conv1`` + ``bn1`` and a floor-mode max pool.

Output stride 8/16/32 comes from dilation (torchvision's ``replace_stride_with_dilation`` over layer2-4). Multi-grid
(2, 2, 4) scales layer4's dilations: block 0 uses the previous dilation x grid[0], block k >= 1 the new dilation x
grid[k]. There is no ``fc`` layer.

Stochastic depth (``drop_path_rate`` p_max, method ``dual_teacher``'s student; shared/methods/DualTeacher.md §5): a
`DropPath` on the residual branch of every block (after the last BN, before the addition; never on the shortcut),
rate p_l = linspace(0, p_max, N)[l] over the N blocks in order. It has no parameters or buffers (the state dict is
the same for every rate) and is the identity in eval mode, so exported models never depend on it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

BLOCK_COUNTS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
MULTI_GRID = (2, 2, 4)  # layer4 dilation multipliers of the reference (one per block)
# Which of layer2/3/4 trade their stride for dilation, per output stride.
DILATE_FLAGS = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}


class DropPath(nn.Module):
    """Per-sample stochastic depth of a residual branch (timm's rule), identity in eval mode or at rate 0.

    In train mode each sample's branch is kept with probability 1 - p and then scaled by 1 / (1 - p), or zeroed. The
    keep draws come from `generator` when one is set (a CPU generator: B float64 uniforms per call, so a resumed
    run repeats them), else from torch's global generator.

    Attributes:
        p: the drop probability in [0, 1).
        generator: optional CPU generator of the keep draws (`set_drop_path_generator`).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = float(p)
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep_prob = 1.0 - self.p
        draws = torch.rand(x.shape[0], generator=self.generator, dtype=torch.float64)
        scale = (draws < keep_prob).to(torch.float64) / keep_prob
        return x * scale.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


def drop_path_rates(p_max: float, num_blocks: int) -> list[float]:
    """p_l = linspace(0, p_max, N)[l] for the N residual blocks in order (0 for a single block)."""
    if not 0.0 <= p_max < 1.0:
        raise ValueError(f"drop path rate must be in [0, 1), got {p_max}")
    if num_blocks < 1:
        return []
    return torch.linspace(0.0, p_max, num_blocks, dtype=torch.float64).tolist()


def set_drop_path_rate(model: nn.Module, p_max: float) -> None:
    """Set every `DropPath` under `model`, in module order, to linspace(0, p_max, N) (0 = off)."""
    paths = [m for m in model.modules() if isinstance(m, DropPath)]
    for module, rate in zip(paths, drop_path_rates(p_max, len(paths)), strict=True):
        module.p = rate


def set_drop_path_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Give every `DropPath` under `model` (wrappers included) the generator of its keep draws."""
    for module in model.modules():
        if isinstance(module, DropPath):
            module.generator = generator


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual (ResNet-18/34); both convs use `dilation`."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath()  # stochastic depth of the residual branch; rate set by the ResNet

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out: Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.drop_path(self.bn2(self.conv2(out)))
        out = self.relu(out + identity)
        return out


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck, v1.5: the stride and the dilation sit on the 3x3 conv (ResNet-50/101)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath()  # stochastic depth of the residual branch; rate set by the ResNet

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out: Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.drop_path(self.bn3(self.conv3(out)))
        out = self.relu(out + identity)
        return out


class ResNet(nn.Module):
    """ResNet encoder returning the four stage outputs.

    Args:
        depth: 18 or 34 (BasicBlock), 50 or 101 (Bottleneck).
        stem: "deep" (three 3x3 convs, ceil-mode pool) or "standard" (7x7 conv, floor-mode pool).
        output_stride: 8, 16 or 32; the input-to-x4 downsampling factor.
        multi_grid: scale layer4's dilations by (2, 2, 4); needs a dilated layer4 (output stride 8 or 16) and at
            most three layer4 blocks.
        base_width: channels of the first stage (64 for every real ResNet); all widths scale with it.
        layers: block counts per stage; None = the standard counts for `depth`.
        drop_path_rate: stochastic depth p_max over all blocks (0 = off; training only, see the module docstring).
    """

    def __init__(
        self,
        depth: int = 50,
        stem: Literal["deep", "standard"] = "deep",
        output_stride: int = 16,
        multi_grid: bool = True,
        base_width: int = 64,
        layers: tuple[int, int, int, int] | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth not in BLOCK_COUNTS:
            raise ValueError(f"depth must be one of {sorted(BLOCK_COUNTS)}, got {depth}")
        if stem not in ("deep", "standard"):
            raise ValueError(f"stem must be 'deep' or 'standard', got {stem!r}")
        if output_stride not in DILATE_FLAGS:
            raise ValueError(f"output_stride must be one of {sorted(DILATE_FLAGS)}, got {output_stride}")
        counts = tuple(layers) if layers is not None else BLOCK_COUNTS[depth]
        if len(counts) != 4 or any(n < 1 for n in counts):
            raise ValueError(f"layers must be four block counts >= 1, got {layers}")
        if multi_grid and output_stride == 32:
            raise ValueError("multi_grid needs a dilated layer4 (output_stride 8 or 16), got output_stride 32")
        if multi_grid and counts[3] > len(MULTI_GRID):
            raise ValueError(f"multi_grid {MULTI_GRID} covers at most 3 layer4 blocks, got {counts[3]}")

        self.depth, self.stem, self.output_stride = depth, stem, output_stride
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if depth in (18, 34) else Bottleneck
        width = base_width
        self.conv1: nn.Module
        if stem == "deep":
            self.conv1 = nn.Sequential(
                _conv3x3(3, width, stride=2),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                _conv3x3(width, width),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                _conv3x3(width, 2 * width),
            )
            self.bn1 = nn.BatchNorm2d(2 * width)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
            self._inplanes = 2 * width
        else:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=False)
            self._inplanes = width
        self.relu = nn.ReLU(inplace=True)

        self._dilation = 1
        flags = DILATE_FLAGS[output_stride]
        self.layer1 = self._make_layer(block, width, counts[0], stride=1, dilate=False, grid=None)
        self.layer2 = self._make_layer(block, 2 * width, counts[1], stride=2, dilate=flags[0], grid=None)
        self.layer3 = self._make_layer(block, 4 * width, counts[2], stride=2, dilate=flags[1], grid=None)
        grid = MULTI_GRID if multi_grid else None
        self.layer4 = self._make_layer(block, 8 * width, counts[3], stride=2, dilate=flags[2], grid=grid)
        self.channels = tuple(m * width * block.expansion for m in (1, 2, 4, 8))  # of x1..x4
        set_drop_path_rate(self, drop_path_rate)
        self._init_weights()

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
        dilate: bool,
        grid: tuple[int, ...] | None,
    ) -> nn.Sequential:
        previous = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        grids = grid if grid is not None else (1,) * blocks
        cout = planes * block.expansion
        downsample = None
        if stride != 1 or self._inplanes != cout:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )
        mods: list[nn.Module] = [block(self._inplanes, planes, stride, previous * grids[0], downsample)]
        self._inplanes = cout
        mods += [block(cout, planes, 1, self._dilation * grids[k], None) for k in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Stage outputs of an image batch.

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            [x1, x2, x3, x4]: x1 at stride 4 (`channels[0]` channels), x2 at stride 8, x3 at stride
            min(16, output_stride), x4 at `output_stride`; each side is rounded up by the convs and the pool.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x1 = self.layer1(x)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return [x1, x2, x3, x4]

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> x4, (B, channels[3], H/os, W/os)."""
        return self.forward_features(x)[-1]
