"""Shared fixtures: a tiny model config, a tiny saved teacher artifact, and the `gpu` marker skip.

torch is imported lazily (inside fixtures and hooks), so collecting torch-free tests never loads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imas_core.constants import IMAGENET_MEAN, IMAGENET_STD
from imas_train.config import ModelConfig

TINY_CLASS_NAMES = ["a", "b", "c"]
TINY_PALETTE = [[0, 0, 0], [200, 30, 30], [30, 200, 30]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` unless torch is importable and sees a CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    try:
        import torch

        available = bool(torch.cuda.is_available())
    except ImportError:
        available = False
    if available:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False or torch is missing)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    """R-50 layout with one block per stage, base width 16, 3 classes, aux head; ~0.1 s per forward on CPU."""
    return ModelConfig(
        num_classes=3,
        aux_head=True,
        depth=50,
        layers=(1, 1, 1, 1),
        base_width=16,
        aspp_channels=32,
        decoder_channels=32,
        aux_channels=32,
        low_level_channels=8,
    )


@pytest.fixture
def tiny_teacher(tmp_path: Path, tiny_model_cfg: ModelConfig) -> Path:
    """Save the tiny model (seed 0, non-trivial BN running stats) as `tmp_path/run/teacher.safetensors` + sidecar.

    Returns the weights path; `imas_train.teacher_artifact.load_teacher(path)` rebuilds the model.
    """
    import torch

    from imas_core.artifacts import TeacherMeta
    from imas_core.typed import to_dict
    from imas_train.models import build_model
    from imas_train.teacher_artifact import save_teacher

    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    meta = TeacherMeta(
        model_config=to_dict(tiny_model_cfg),
        class_names=list(TINY_CLASS_NAMES),
        palette=[list(rgb) for rgb in TINY_PALETTE],
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        weights_sha256="",
        window=65,
        stride=43,
        eval_protocol="imas",
        dataset="demo",
    )
    weights = tmp_path / "run" / "teacher.safetensors"
    save_teacher(model.eval(), weights, meta)
    return weights
