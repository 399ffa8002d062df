"""The teacher artifact: ``teacher.safetensors`` + ``teacher.json`` (docs/style.md §2, docs/design.md).

The weights are a flat safetensors state dict (no pickle). The sidecar records the model config, the classes, the
normalisation and the sha256 of the weights; loading verifies that checksum, rebuilds the model from the sidecar
alone and loads strictly. This is separate from the resume checkpoints (`imas_train.checkpoint`); `teacher_meta`
builds the sidecar of a training run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from imas_core.artifacts import TeacherMeta, read_teacher_meta, teacher_sidecar_path, write_teacher_meta
from imas_core.atomic import atomic_write_bytes, sha256_file
from imas_core.constants import IMAGENET_MEAN, IMAGENET_STD
from imas_core.errors import ArtifactError, ConfigError, WeightsError
from imas_core.tiling import default_stride
from imas_train.config import TrainConfig, model_config_from_dict, to_dict
from imas_train.models import DeepLabV3Plus, build_model

_SHOW = 10  # keys listed per category in an error message


def teacher_meta(
    cfg: TrainConfig,
    *,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    split_sha256: Mapping[str, str],
    epoch: int,
    step: int,
    miou: float,
    miou_best: float | None,
    best_epoch: int | None,
    training_summary: dict[str, Any],
) -> TeacherMeta:
    """The sidecar of a model trained with `cfg` (``weights_sha256`` is filled in by `save_teacher`).

    Args:
        cfg: the experiment: model config (saved with ``pretrained`` None: the artifact holds every weight),
            evaluation window/stride/protocol, dataset.
        class_names, palette, split_sha256: from the datasets.
        epoch, step: the epoch the model was evaluated at and the iterations trained.
        miou: this model's val mIoU (``miou_final``); miou_best, best_epoch: the run's best so far.
        training_summary: free-form facts about the run (method, what the model is, world size, history).
    """
    return TeacherMeta(
        model_config=to_dict(dataclasses.replace(cfg.model, pretrained=None)),
        class_names=list(class_names),
        palette=[list(rgb) for rgb in palette],
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        weights_sha256="",
        window=cfg.eval.window,
        stride=cfg.eval.stride or default_stride(cfg.eval.window),
        eval_protocol=cfg.eval.protocol,
        dataset=cfg.data.dataset,
        epoch=epoch,
        step=step,
        miou_final=miou,
        miou_best=miou_best,
        best_epoch=best_epoch,
        split_sha256=dict(split_sha256),
        training_summary=training_summary,
    )


def save_teacher(model: nn.Module, weights_path: Path, meta: TeacherMeta) -> TeacherMeta:
    """Write the model's state dict as safetensors and its sidecar, both atomically.

    Args:
        model: the (unwrapped) teacher; all parameters and buffers are saved, moved to the CPU.
        weights_path: destination, conventionally ``<run>/teacher.safetensors``; the sidecar goes to
            ``<run>/teacher.json``.
        meta: the sidecar; its ``weights_sha256`` is replaced by the checksum of the written file.

    Returns:
        The meta as written, with ``weights_sha256`` filled in.
    """
    from safetensors.torch import save

    weights_path = Path(weights_path)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != meta.model_config.get("num_classes"):
        raise ArtifactError(
            f"{weights_path.name}: model has {num_classes} classes but meta.model_config.num_classes="
            f"{meta.model_config.get('num_classes')}"
        )
    tensors: dict[str, Tensor] = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(weights_path, save(tensors))
    final = dataclasses.replace(meta, weights_sha256=sha256_file(weights_path))
    write_teacher_meta(weights_path, final)
    return final


def load_teacher(weights_path: Path, device: str | torch.device = "cpu") -> tuple[DeepLabV3Plus, TeacherMeta]:
    """Rebuild the teacher from ``teacher.safetensors`` and its sidecar.

    Args:
        weights_path: the safetensors file; ``teacher.json`` must sit beside it.
        device: where to put the model.

    Returns:
        The model in eval() mode on `device` (``model_config.pretrained`` is ignored), and its sidecar.

    Raises:
        ArtifactError: missing or invalid sidecar, checksum mismatch, or weights that do not fit the recorded config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = Path(weights_path)
    sidecar = teacher_sidecar_path(weights_path)
    meta = read_teacher_meta(weights_path)  # verifies the sha256
    try:
        cfg = model_config_from_dict(meta.model_config, where=f"{sidecar}: model_config")
        model = build_model(dataclasses.replace(cfg, pretrained=None))
    except (ConfigError, WeightsError) as err:
        raise ArtifactError(f"{sidecar}: cannot rebuild the model: {err}") from err
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{weights_path}: not a readable safetensors file ({err})") from err
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        parts = [f"{len(missing)} missing key(s): {', '.join(missing[:_SHOW])}"] if missing else []
        parts += [f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:_SHOW])}"] if unexpected else []
        raise ArtifactError(f"{weights_path.name} does not fit the model in {sidecar.name}; " + "; ".join(parts))
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        shapes = "; ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong)
        raise ArtifactError(
            f"{weights_path.name} does not fit model_config in {sidecar.name} "
            f"(num_classes={cfg.num_classes}); {len(wrong)} shape mismatch(es): {shapes[:2000]}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta
