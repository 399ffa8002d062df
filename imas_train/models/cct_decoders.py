"""CCT's auxiliary decoders: a perturbation of the encoder output followed by a copy of the main decoder's layout
(shared/methods/CCT.md §5). Training only: they are a separate network of ``method: cct`` and never part of the
segmentation model that is evaluated, saved as the artifact or exported.

The main decoder of the DeepLabV3+ port is the classifier's final 1x1 conv plus a bilinear resize to the input
(align_corners=True); each auxiliary decoder is ``perturbation -> own 1x1 conv -> bilinear resize``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imas_train.cct import (
    context_masking,
    feature_drop,
    feature_noise,
    foreground,
    guided_cutout,
    object_masking,
    spatial_dropout,
    vat_perturbation,
)

__all__ = ["PERTURBATIONS", "AuxDecoder", "CctAuxDecoders", "PerturbationSettings"]

# every kind, in the official decoder order (CCT.md §3 "aux decoders K")
PERTURBATIONS = ("vat", "dropout", "cutout", "context_masking", "object_masking", "feature_drop", "feature_noise")


@dataclass(frozen=True)
class PerturbationSettings:
    """The perturbations' parameters (CCT.md §3 "perturbation params"; the same in both references)."""

    drop_rate: float = 0.5  # Dropout2d p
    erase: float = 0.4  # guided cutout box side / bounding-box side
    cutout_min_vertices: int = 50  # contours with at most this many vertices are not cut
    vat_xi: float = 1e-6
    vat_eps: float = 2.0
    noise_amplitude: float = 0.3  # N ~ U(-a, a)
    feature_drop_range: tuple[float, float] = (0.7, 0.9)  # thr = max(a) * U(lo, hi)
    background: int = 0  # the class the prediction-guided masks treat as "not an object"


class AuxDecoder(nn.Module):
    """One auxiliary decoder: `kind` perturbation, then its own 1x1 conv in_channels -> C and a bilinear resize."""

    def __init__(self, kind: str, in_channels: int, num_classes: int, settings: PerturbationSettings) -> None:
        super().__init__()
        if kind not in PERTURBATIONS:
            raise ValueError(f"unknown CCT perturbation {kind!r}; one of {', '.join(PERTURBATIONS)}")
        self.kind = kind
        self.settings = settings
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def decode(self, z: Tensor, size: tuple[int, int]) -> Tensor:
        """The decoder without perturbation, in z's dtype (float64 for VAT's power iteration)."""
        weight, bias = self.conv.weight, self.conv.bias
        if z.dtype == torch.float64:
            weight, bias = weight.double(), None if bias is None else bias.double()
            return F.interpolate(F.conv2d(z, weight, bias), size=size, mode="bilinear", align_corners=True)
        return F.interpolate(self.conv(z), size=size, mode="bilinear", align_corners=True)

    def perturb(self, z: Tensor, labels: Tensor, fg: Tensor, generator: torch.Generator) -> Tensor:
        """P_k(z): `labels` (B, H, W) the main argmax, `fg` its foreground at z's resolution (`foreground`)."""
        s, kind = self.settings, self.kind
        if kind == "dropout":
            return spatial_dropout(z, generator, s.drop_rate)
        if kind == "feature_drop":
            return feature_drop(z, generator, s.feature_drop_range)
        if kind == "feature_noise":
            return feature_noise(z, generator, s.noise_amplitude)
        if kind == "context_masking":
            return context_masking(z, fg)
        if kind == "object_masking":
            return object_masking(z, fg)
        if kind == "cutout":
            return guided_cutout(z, labels, generator, s.erase, s.cutout_min_vertices, s.background)
        size = (labels.shape[-2], labels.shape[-1])  # vat
        return z + vat_perturbation(z, lambda v: self.decode(v, size), generator, s.vat_xi, s.vat_eps)

    def forward(self, z: Tensor, labels: Tensor, fg: Tensor, generator: torch.Generator) -> Tensor:
        """(B, C, H, W) logits at the labels' resolution from the perturbed z."""
        return self.decode(self.perturb(z, labels, fg, generator), (labels.shape[-2], labels.shape[-1]))


class CctAuxDecoders(nn.Module):
    """The K auxiliary decoders, in `kinds` order; `forward` returns their logits as a tuple.

    Args:
        kinds: one perturbation name per decoder (`PERTURBATIONS`).
        in_channels: channels of the encoder output z (the model's ``decoder_channels``).
        num_classes: C.
        settings: perturbation parameters.
    """

    def __init__(self, kinds: Sequence[str], in_channels: int, num_classes: int,
                 settings: PerturbationSettings | None = None) -> None:  # fmt: skip
        super().__init__()
        if not kinds:
            raise ValueError("CCT needs at least one auxiliary decoder")
        self.settings = settings or PerturbationSettings()
        self.decoders = nn.ModuleList([AuxDecoder(k, in_channels, num_classes, self.settings) for k in kinds])

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(str(d.kind) for d in self.decoders)

    def forward(self, z: Tensor, main_logits: Tensor, generator: torch.Generator) -> tuple[Tensor, ...]:
        """Logits of every auxiliary decoder on its perturbed copy of z.

        Args:
            z: (B, c, h, w) encoder output of the unlabeled images (with grad: the encoder learns from these).
            main_logits: (B, C, H, W) the main decoder's logits on the same images; only their argmax is used
                (detached) for the prediction-guided masks.
            generator: every draw, decoder after decoder.

        Returns:
            K tensors (B, C, H, W).
        """
        labels = main_logits.detach().argmax(dim=1)
        fg = foreground(labels, z.shape[-2:], self.settings.background)
        return tuple(decoder(z, labels, fg, generator) for decoder in self.decoders)
