"""DeepLabV3+ on a dilated ResNet, built from a ModelConfig (docs/algorithm.md §4)."""

from __future__ import annotations

import logging

from imas_core.errors import ConfigError
from imas_train.config import ModelConfig
from imas_train.models.deeplabv3plus import DeepLabV3Plus
from imas_train.models.resnet import BLOCK_COUNTS, MULTI_GRID, ResNet
from imas_train.models.weights import WeightsReport, load_backbone_weights

_log = logging.getLogger(__name__)

__all__ = ["DeepLabV3Plus", "ResNet", "WeightsReport", "build_model", "check_model_config", "load_backbone_weights"]


def check_model_config(cfg: ModelConfig) -> None:
    """Raise ConfigError for option combinations the model cannot build."""
    if cfg.num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1, got {cfg.num_classes}")
    if cfg.depth not in BLOCK_COUNTS:
        raise ConfigError(f"model.depth must be one of {sorted(BLOCK_COUNTS)}, got {cfg.depth}")
    if cfg.stem not in ("deep", "standard"):
        raise ConfigError(f"model.stem must be 'deep' or 'standard', got {cfg.stem!r}")
    if cfg.output_stride not in (8, 16, 32):
        raise ConfigError(f"model.output_stride must be 8, 16 or 32, got {cfg.output_stride}")
    counts = cfg.layers if cfg.layers is not None else BLOCK_COUNTS[cfg.depth]
    if len(counts) != 4 or any(n < 1 for n in counts):
        raise ConfigError(f"model.layers must be four block counts >= 1, got {cfg.layers}")
    if cfg.multi_grid and cfg.output_stride == 32:
        raise ConfigError("model.multi_grid needs a dilated layer4: use output_stride 8 or 16, or multi_grid: false")
    if cfg.multi_grid and counts[3] > len(MULTI_GRID):
        raise ConfigError(
            f"model.multi_grid {MULTI_GRID} covers at most {len(MULTI_GRID)} layer4 blocks, got {counts[3]}"
        )
    widths = {
        "base_width": cfg.base_width,
        "aspp_channels": cfg.aspp_channels,
        "low_level_channels": cfg.low_level_channels,
        "decoder_channels": cfg.decoder_channels,
        "aux_channels": cfg.aux_channels,
        "rep_channels": cfg.rep_channels,
    }
    for name, value in widths.items():
        if value < 1:
            raise ConfigError(f"model.{name} must be >= 1, got {value}")
    if cfg.aux_labeled_only and not cfg.aux_head:
        raise ConfigError("model.aux_labeled_only needs model.aux_head: true")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {cfg.drop_path_rate}")


def build_model(cfg: ModelConfig) -> DeepLabV3Plus:
    """Build the segmentation model and, when `cfg.pretrained` is set, load that local file into the backbone.

    Raises:
        ConfigError: an invalid option combination (e.g. multi_grid with output_stride 32).
        WeightsError: `cfg.pretrained` is missing or does not fit the backbone.
    """
    check_model_config(cfg)
    backbone = ResNet(
        depth=cfg.depth,
        stem=cfg.stem,
        output_stride=cfg.output_stride,
        multi_grid=cfg.multi_grid,
        base_width=cfg.base_width,
        layers=cfg.layers,
        drop_path_rate=cfg.drop_path_rate,
    )
    if cfg.pretrained is not None:
        report = load_backbone_weights(backbone, cfg.pretrained)
        _log.info(
            "loaded %d backbone tensors from %s (%s stem; dropped %d)",
            report.loaded,
            report.path,
            report.stem,
            len(report.dropped),
        )
    return DeepLabV3Plus(
        backbone,
        num_classes=cfg.num_classes,
        aux_head=cfg.aux_head,
        aspp_channels=cfg.aspp_channels,
        low_level_channels=cfg.low_level_channels,
        decoder_channels=cfg.decoder_channels,
        aux_channels=cfg.aux_channels,
        decoder=cfg.decoder,
        rep_channels=cfg.rep_channels if cfg.rep_head else None,
    )
