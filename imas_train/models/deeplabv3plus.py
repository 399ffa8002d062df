"""DeepLabV3+ decoder and optional auxiliary head on a dilated ResNet (docs/algorithm.md §4).

Every bilinear resize uses ``align_corners=True`` (ASPP pooling branch, decoder upsample, final upsample), which
ONNX exports as ``Resize`` with ``coordinate_transformation_mode=align_corners``. The decoder and the aux head keep
PyTorch's default initialisation.

Two decoder variants (``model.decoder``):

* ``imas`` (docs/algorithm.md §4): 1x1 ASPP projection, no dropout, classifier on the 304-ch concat, aux 3x3 without
  bias.
* ``u2pl`` (shared/methods/U2PL.md §5): 3x3 ASPP projection + Dropout2d(0.1); classifier convs with bias, each followed
  by Dropout2d(0.1); aux 3x3 with bias + Dropout2d(0.1). The low-level width is ``low_level_channels`` (256 there).

With ``model.rep_head`` a representation head (same layout as the classifier, ending in ``rep_channels``) reads the
classifier's input concat; `forward_with_rep` returns it (U2PL's contrastive loss). `forward` never runs it, so the
exported graph is the same with or without it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imas_train.models.resnet import ResNet

ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}  # atrous rates per output stride


def _resize(x: Tensor, like: Tensor) -> Tensor:
    """Bilinear resize of `x` to the spatial size of `like`, align_corners=True (trace-safe: shape from a tensor)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


def _conv_bn_relu(
    cin: int, cout: int, kernel: int, dilation: int = 1, bias: bool = False, dropout: float = 0.0
) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if dropout > 0.0:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


def _head(cin: int, channels: int, cout: int, *, u2pl: bool) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU blocks and a 1x1 conv to `cout`: the classifier (and the representation head)."""
    dropout = 0.1 if u2pl else 0.0
    return nn.Sequential(
        _conv_bn_relu(cin, channels, 3, bias=u2pl, dropout=dropout),
        _conv_bn_relu(channels, channels, 3, bias=u2pl, dropout=dropout),
        nn.Conv2d(channels, cout, 1),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: image pooling, 1x1 and three 3x3 atrous branches, fused by a 1x1 conv."""

    def __init__(self, cin: int, channels: int, rates: tuple[int, int, int], *, u2pl: bool = False) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, channels, 1))
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, channels, 1)] + [_conv_bn_relu(cin, channels, 3, dilation=r) for r in rates]
        )
        if u2pl:  # 3x3 projection + dropout (U2PL.md §5)
            self.project = _conv_bn_relu(5 * channels, channels, 3, dropout=0.1)
        else:
            self.project = _conv_bn_relu(5 * channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, h, w) -> (B, channels, h, w)."""
        outs = [_resize(self.pool(x), x)] + [branch(x) for branch in self.branches]
        fused: Tensor = self.project(torch.cat(outs, dim=1))
        return fused


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ segmentation model.

    Args:
        backbone: the encoder; its ``forward_features`` gives [x1, x2, x3, x4].
        num_classes: C, the number of output channels.
        aux_head: add the auxiliary head on x3 (Cityscapes).
        aspp_channels: inner and output channels of the ASPP (256).
        low_level_channels: channels of the projected x1 (48).
        decoder_channels: channels of the two 3x3 classifier convs (256).
        aux_channels: hidden channels of the aux head (256).
        decoder: "imas" or "u2pl" (see the module docstring).
        rep_channels: output channels of the representation head; None = no representation head.
    """

    def __init__(
        self,
        backbone: ResNet,
        num_classes: int,
        aux_head: bool,
        aspp_channels: int = 256,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        aux_channels: int = 256,
        decoder: str = "imas",
        rep_channels: int | None = None,
    ) -> None:
        super().__init__()
        if decoder not in ("imas", "u2pl"):
            raise ValueError(f"decoder must be 'imas' or 'u2pl', got {decoder!r}")
        u2pl = decoder == "u2pl"
        self.backbone = backbone
        self.num_classes = num_classes
        c1, _, c3, c4 = backbone.channels
        self.aspp = ASPP(c4, aspp_channels, ASPP_RATES[backbone.output_stride], u2pl=u2pl)
        self.low_level = _conv_bn_relu(c1, low_level_channels, 1, bias=True)
        self.classifier = _head(low_level_channels + aspp_channels, decoder_channels, num_classes, u2pl=u2pl)
        self.aux: nn.Sequential | None = None
        if aux_head:
            self.aux = nn.Sequential(
                _conv_bn_relu(c3, aux_channels, 3, bias=u2pl, dropout=0.1 if u2pl else 0.0),
                nn.Conv2d(aux_channels, num_classes, 1),
            )
        self.rep: nn.Sequential | None = None
        if rep_channels is not None:
            self.rep = _head(low_level_channels + aspp_channels, decoder_channels, rep_channels, u2pl=u2pl)

    def _features(self, x1: Tensor, x4: Tensor) -> Tensor:
        """The classifier's input: projected low-level features and upsampled ASPP context, (B, 304 | 512, h, w)."""
        return torch.cat([self.low_level(x1), _resize(self.aspp(x4), x1)], dim=1)

    def _decode(self, x: Tensor, x1: Tensor, x4: Tensor) -> Tensor:
        return _resize(self.classifier(self._features(x1, x4)), x)

    def forward(self, x: Tensor) -> Tensor:
        """Main logits; never runs the aux head.

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            (B, C, H, W) logits at the input size.
        """
        x1, _, _, x4 = self.backbone.forward_features(x)
        return self._decode(x, x1, x4)

    def forward_with_aux(self, x: Tensor, aux_batch: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Main and auxiliary logits from one backbone pass (training only).

        Args:
            x: (B, 3, H, W) normalised images.
            aux_batch: run the aux head on the first `aux_batch` images only (``model.aux_labeled_only``);
                None = all B images.

        Returns:
            logits (B, C, H, W) and logits_aux (aux_batch or B, C, H, W), both at the input size; logits_aux is
            None when the model has no aux head.
        """
        x1, _, x3, x4 = self.backbone.forward_features(x)
        logits = self._decode(x, x1, x4)
        if self.aux is None:
            return logits, None
        if aux_batch is not None:
            if not 0 < aux_batch <= x.shape[0]:
                raise ValueError(f"aux_batch must be in [1, {x.shape[0]}], got {aux_batch}")
            x3 = x3[:aux_batch]
        logits_aux = self.aux(x3)
        return logits, _resize(logits_aux, x)

    def forward_with_rep(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Decoder-resolution logits, representation and aux logits from one backbone pass (U2PL training).

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            logits (B, C, h, w) and rep (B, rep_channels, h, w) at the decoder resolution (H/4 x W/4), and aux
            logits (B, C, h3, w3) at layer 3's resolution or None; callers upsample with align_corners=True.

        Raises:
            ValueError: the model has no representation head (``model.rep_head: false``).
        """
        if self.rep is None:
            raise ValueError("forward_with_rep needs a representation head (model.rep_head: true)")
        x1, _, x3, x4 = self.backbone.forward_features(x)
        features = self._features(x1, x4)
        logits_aux = self.aux(x3) if self.aux is not None else None
        return self.classifier(features), self.rep(features), logits_aux

    def forward_with_features(self, x: Tensor, with_aux: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """Logits, the classifier's last-conv input and aux logits from one backbone pass (CCT training).

        ``classify(features, x)`` equals ``logits``: the same ops as `forward`, split before the final 1x1 conv.

        Args:
            x: (B, 3, H, W) normalised images.
            with_aux: run the aux head (when the model has one).

        Returns:
            logits (B, C, H, W) at the input size; features (B, decoder_channels, H/4, W/4), the output of the
            classifier's 3x3 blocks; aux logits (B, C, H, W) or None.
        """
        x1, _, x3, x4 = self.backbone.forward_features(x)
        features: Tensor = self.classifier[:-1](self._features(x1, x4))
        logits_aux = _resize(self.aux(x3), x) if with_aux and self.aux is not None else None
        return self.classify(features, x), features, logits_aux

    def classify(self, features: Tensor, like: Tensor) -> Tensor:
        """The classifier's final 1x1 conv on `features`, resized to `like`'s spatial size (align_corners=True)."""
        return _resize(self.classifier[-1](features), like)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the encoder (optimizer group 'backbone')."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the decoder, the aux and the representation head (optimizer group 'head')."""
        for module in (self.aspp, self.low_level, self.classifier, self.aux, self.rep):
            if module is not None:
                yield from module.parameters()
