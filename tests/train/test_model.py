"""DeepLabV3+ / dilated ResNet: shapes, strides, dilations, state-dict names (docs/algorithm.md §4, style §4.3)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imas_core.errors import ConfigError
from imas_train.config import ModelConfig
from imas_train.models import build_model
from imas_train.models.resnet import ResNet

TINY = {"layers": (1, 1, 1, 1), "base_width": 16}


def _tiny_cfg(**overrides: object) -> ModelConfig:
    base = ModelConfig(
        num_classes=3,
        aux_head=True,
        depth=50,
        layers=(1, 1, 1, 1),
        base_width=16,
        aspp_channels=16,
        decoder_channels=16,
        aux_channels=16,
        low_level_channels=8,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def _conv_out(n: int, kernel: int, stride: int, pad: int, ceil: bool = False) -> int:
    span = n + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= n + pad:  # PyTorch drops a last window that starts in the padding
        out -= 1
    return out


def _expected_feature_sides(n: int, stem: str, output_stride: int) -> list[int]:
    """x1..x4 side lengths for an input side n, computed from the conv/pool formulas."""
    n = _conv_out(n, 7, 2, 3) if stem == "standard" else _conv_out(n, 3, 2, 1)
    x1 = _conv_out(n, 3, 2, 1, ceil=(stem == "deep"))
    x2 = _conv_out(x1, 3, 2, 1)
    x3 = x2 if output_stride == 8 else _conv_out(x2, 3, 2, 1)
    x4 = _conv_out(x3, 3, 2, 1) if output_stride == 32 else x3
    return [x1, x2, x3, x4]


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("stem", ["deep", "standard"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_logits_match_odd_input_size(depth: int, stem: str, output_stride: int) -> None:
    cfg = _tiny_cfg(depth=depth, stem=stem, output_stride=output_stride, multi_grid=output_stride != 32)
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        logits = model(x)
        feats = model.backbone.forward_features(x)
    assert logits.shape == (2, 3, 65, 97)
    assert torch.isfinite(logits).all()
    sides_h = _expected_feature_sides(65, stem, output_stride)
    sides_w = _expected_feature_sides(97, stem, output_stride)
    assert [tuple(f.shape[-2:]) for f in feats] == list(zip(sides_h, sides_w, strict=True))
    assert [f.shape[1] for f in feats] == list(model.backbone.channels)


@pytest.mark.parametrize(("output_stride", "sides"), [(8, [16, 8, 8, 8]), (16, [16, 8, 4, 4]), (32, [16, 8, 4, 2])])
def test_feature_strides_standard_stem_64px(output_stride: int, sides: list[int]) -> None:
    backbone = ResNet(depth=50, stem="standard", output_stride=output_stride, multi_grid=False, **TINY)
    feats = backbone.eval().forward_features(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == sides
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]  # 4 x base_width 16 x (1, 2, 4, 8)


def test_deep_stem_ceil_mode_gives_one_more_row_on_even_input() -> None:
    """docs/algorithm.md §4: a 512-px window gives 129 vs 128 after the pool; at 64 px it is 17 vs 16."""
    deep = ResNet(depth=50, stem="deep", **TINY).eval()
    standard = ResNet(depth=50, stem="standard", **TINY).eval()
    x = torch.randn(1, 3, 64, 65)
    assert deep.forward_features(x)[0].shape[-2:] == (17, 17)
    assert standard.forward_features(x)[0].shape[-2:] == (16, 17)


def test_gradient_reaches_input_in_train_mode() -> None:
    model = build_model(_tiny_cfg()).train()
    x = torch.randn(2, 3, 65, 97, requires_grad=True)
    logits, logits_aux = model.forward_with_aux(x)
    assert logits_aux is not None
    (logits.square().mean() + logits_aux.square().mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_forward_with_aux_shapes_and_slicing() -> None:
    model = build_model(_tiny_cfg()).eval()
    x = torch.randn(3, 3, 33, 41)
    with torch.no_grad():
        plain = model(x)
        logits, logits_aux = model.forward_with_aux(x)
        logits_1, logits_aux_1 = model.forward_with_aux(x, aux_batch=1)
    assert logits_aux is not None and logits_aux_1 is not None
    assert logits.shape == logits_aux.shape == (3, 3, 33, 41)
    assert logits_aux_1.shape == (1, 3, 33, 41)
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    torch.testing.assert_close(logits_1, plain, rtol=0, atol=0)
    torch.testing.assert_close(logits_aux_1, logits_aux[:1], rtol=1e-5, atol=1e-6)  # eval BN: per-sample


def test_forward_never_runs_aux_head() -> None:
    model = build_model(_tiny_cfg()).eval()
    assert model.aux is not None
    calls: list[int] = []
    model.aux.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        model(x)
        assert calls == []
        model.forward_with_aux(x)
    assert calls == [1]


def test_no_aux_head_returns_none() -> None:
    model = build_model(_tiny_cfg(aux_head=False)).eval()
    assert model.aux is None
    logits, logits_aux = model.forward_with_aux(torch.randn(2, 3, 33, 33))
    assert logits.shape == (2, 3, 33, 33) and logits_aux is None


def test_every_resize_is_bilinear_align_corners(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []
    real = F.interpolate

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(kwargs)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "interpolate", spy)
    model = build_model(_tiny_cfg()).eval()
    with torch.no_grad():
        model.forward_with_aux(torch.randn(2, 3, 33, 33))
    assert len(seen) == 4  # ASPP pool branch, decoder upsample, final upsample, aux upsample
    assert all(k.get("mode") == "bilinear" and k.get("align_corners") is True for k in seen)


def test_parameter_groups_partition_the_model() -> None:
    model = build_model(_tiny_cfg())
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert backbone and head and not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.aux.parameters()} <= head  # type: ignore[union-attr]


def test_decoder_layout_and_biases() -> None:
    model = build_model(_tiny_cfg(output_stride=8))
    rates = [b[0].dilation[0] for b in model.aspp.branches[1:]]
    assert rates == [12, 24, 36]
    assert model.low_level[0].bias is not None and model.low_level[0].out_channels == 8
    convs = [m for m in model.classifier.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3), (1, 1)]
    assert [c.bias is not None for c in convs] == [False, False, True]
    assert convs[0].in_channels == 8 + 16 and convs[-1].out_channels == 3
    assert not any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in model.modules())
    assert build_model(_tiny_cfg(output_stride=32, multi_grid=False)).aspp.branches[1][0].dilation == (3, 3)


def test_aspp_and_aux_head_layout() -> None:
    """docs/algorithm.md §4: five bias-free conv-BN-ReLU ASPP branches fused by a bias-free 1x1; aux head on x3 is
    3x3 (no bias) - BN - ReLU - 1x1 (bias)."""
    model = build_model(_tiny_cfg())
    c4, c3 = model.backbone.channels[3], model.backbone.channels[2]
    pool_conv = model.aspp.pool[1]
    branch_convs = [b[0] for b in model.aspp.branches]
    assert isinstance(model.aspp.pool[0], nn.AdaptiveAvgPool2d) and pool_conv.kernel_size == (1, 1)
    assert [c.kernel_size for c in branch_convs] == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert [c.dilation[0] for c in branch_convs[1:]] == [6, 12, 18]
    assert all(c.in_channels == c4 and c.out_channels == 16 for c in [pool_conv, *branch_convs])
    project = model.aspp.project[0]
    assert project.kernel_size == (1, 1) and (project.in_channels, project.out_channels) == (5 * 16, 16)
    assert all(c.bias is None for c in [pool_conv, *branch_convs, project])
    assert model.aux is not None
    aux_convs = [m for m in model.aux.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in aux_convs] == [(3, 3), (1, 1)]
    assert [c.bias is not None for c in aux_convs] == [False, True]
    assert (aux_convs[0].in_channels, aux_convs[0].out_channels, aux_convs[1].out_channels) == (c3, 16, 3)
    assert [type(m) for m in model.aux[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_init_kaiming_fan_out_backbone_and_default_decoder() -> None:
    """docs/algorithm.md §4: backbone convs Kaiming-normal (fan_out), BN gamma 1 / beta 0; decoder: torch defaults."""
    torch.manual_seed(0)
    model = build_model(_tiny_cfg())
    conv = model.backbone.layer4[0].conv2  # (128, 128, 3, 3): enough samples for a 5% std check
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert float(conv.weight.detach().std()) == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)
    bn = model.backbone.layer4[0].bn2
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    head = model.classifier[0][0]  # default init: kaiming_uniform(a=sqrt 5), std = 1 / sqrt(3 fan_in)
    fan_in = head.in_channels * head.kernel_size[0] * head.kernel_size[1]
    assert float(head.weight.detach().std()) == pytest.approx((1.0 / (3 * fan_in)) ** 0.5, rel=0.1)
    last = model.classifier[2]
    assert float(last.bias.detach().abs().max()) <= 1.0 / last.in_channels**0.5  # default uniform bias, not zero-init
    assert float(last.bias.detach().abs().max()) > 0


def _dilations(layer: nn.Sequential) -> list[int]:
    return [block.conv2.dilation[0] for block in layer]


@pytest.mark.parametrize(
    ("output_stride", "multi_grid", "layer3", "layer4"),
    [
        (16, True, [1] * 6, [2, 4, 8]),
        (8, True, [1, 2, 2, 2, 2, 2], [4, 8, 16]),
        (16, False, [1] * 6, [1, 2, 2]),
    ],
)
def test_full_r50_dilations_match_algorithm_table(
    output_stride: int, multi_grid: bool, layer3: list[int], layer4: list[int]
) -> None:
    backbone = ResNet(depth=50, output_stride=output_stride, multi_grid=multi_grid)
    assert _dilations(backbone.layer3) == layer3
    assert _dilations(backbone.layer4) == layer4
    assert all(b.conv2.padding[0] == b.conv2.dilation[0] for b in backbone.layer4)
    strides = [backbone.layer3[0].conv2.stride[0], backbone.layer4[0].conv2.stride[0]]
    assert strides == ([1, 1] if output_stride == 8 else [2, 1])


def test_basic_block_supports_dilation() -> None:
    backbone = ResNet(depth=18, output_stride=8, multi_grid=True, **TINY)
    assert [b.conv1.dilation[0] for b in backbone.layer3] == [1]
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in backbone.layer4] == [(4, 4)]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"output_stride": 32, "multi_grid": True}, "multi_grid"),
        ({"layers": (1, 1, 1, 4)}, "layer4"),
        ({"layers": (1, 0, 1, 1)}, "layers"),
        ({"num_classes": 0}, "num_classes"),
        ({"aux_head": False, "aux_labeled_only": True}, "aux_head"),
    ],
)
def test_bad_option_combinations_raise_config_error(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(_tiny_cfg(**overrides))


def test_build_model_loads_pretrained_backbone(tmp_path: Path) -> None:
    source = ResNet(depth=50, **TINY)
    path = tmp_path / "r50.pth"
    torch.save(source.state_dict(), path)
    model = build_model(_tiny_cfg(pretrained=path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
