"""Strict loading of a local ImageNet weight file into the ResNet encoder (docs/algorithm.md §4, docs/style.md §4.3).

Nothing is ever downloaded. ``.safetensors`` files are read with safetensors; anything else with
``torch.load(..., weights_only=True)``, never with unrestricted pickle. Only ``fc.*`` may be left over, and only the
BatchNorm ``num_batches_tracked`` counters may be absent (torchvision's files omit them); every other difference
raises ``WeightsError`` naming the keys, the shapes, or the stem the file was saved with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from imas_core.errors import WeightsError

_COUNTER = "num_batches_tracked"
_SHOW = 10  # keys listed per category in an error message


@dataclass(frozen=True)
class WeightsReport:
    """What `load_backbone_weights` did.

    Attributes:
        path: the file that was read.
        loaded: number of tensors copied into the backbone.
        dropped: keys of the file that were ignored (the classifier, ``fc.*``).
        stem: the stem the file was saved with: "deep", "standard" or "unknown".
    """

    path: Path
    loaded: int
    dropped: tuple[str, ...]
    stem: str


def detect_stem(state: Mapping[str, Any]) -> str:
    """'standard' for a 7x7 ``conv1.weight``, 'deep' for ``conv1.0.weight``, otherwise 'unknown'."""
    conv1 = state.get("conv1.weight")
    if isinstance(conv1, Tensor) and conv1.dim() == 4 and tuple(conv1.shape[-2:]) == (7, 7):
        return "standard"
    if "conv1.0.weight" in state:
        return "deep"
    return "unknown"


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a local weight file and normalise its keys: unwrap 'state_dict'/'model', strip 'module.'."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"backbone weight file not found: {path} (expected a local ImageNet file there; nothing is downloaded,"
            " so fetch it yourself or set model.pretrained to null)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, or a pickle that needs arbitrary code to unpickle
        raise WeightsError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from err
    while isinstance(raw, Mapping):
        nested = next((raw[k] for k in ("state_dict", "model") if isinstance(raw.get(k), Mapping)), None)
        if nested is None:
            break
        raw = nested
    if not isinstance(raw, Mapping):
        raise WeightsError(f"{path}: expected a mapping of tensors, got {type(raw).__name__}")
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        name = str(key)
        while name.startswith("module."):
            name = name[len("module.") :]
        if not isinstance(value, Tensor):
            raise WeightsError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        state[name] = value
    return state


def _listing(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
    return f"{len(keys)} {label} key(s): {shown}"


def load_backbone_weights(backbone: nn.Module, path: Path) -> WeightsReport:
    """Load a local ImageNet file into `backbone` strictly (only ``fc.*`` is dropped).

    Args:
        backbone: the ResNet encoder; its ``stem`` attribute ("deep" or "standard") is used in error messages.
        path: a ``.safetensors`` file, or a torch file readable with ``weights_only=True``.

    Returns:
        A WeightsReport with the number of loaded tensors, the dropped keys and the file's stem.

    Raises:
        WeightsError: missing file, unreadable file, wrong stem, missing or unexpected keys, or a shape mismatch.
    """
    path = Path(path)
    state = read_state_dict(path)
    dropped = tuple(sorted(k for k in state if k.startswith("fc.")))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    file_stem = detect_stem(state)
    model_stem = str(getattr(backbone, "stem", "unknown"))
    if "unknown" not in (file_stem, model_stem) and file_stem != model_stem:
        described = {"standard": "a 7x7 conv1.weight (standard stem)", "deep": "conv1.0.weight (deep stem)"}
        raise WeightsError(
            f"{path}: file has {described[file_stem]} but model.stem={model_stem!r}; set model.stem: {file_stem}"
            " or use a file saved with the other stem"
        )
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_COUNTER)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [_listing("missing", missing)] if missing else []
        parts += [_listing("unexpected", unexpected)] if unexpected else []
        raise WeightsError(f"{path}: does not fit the {model_stem}-stem backbone; " + "; ".join(parts))
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise WeightsError(
                f"{path}: {key} has shape {tuple(value.shape)} in the file but {tuple(expected[key].shape)} in"
                " the model (wrong depth or base_width?)"
            )
    result = backbone.load_state_dict(state, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith(_COUNTER)] + list(result.unexpected_keys)
    if leftover:  # unreachable after the checks above; kept so a silent partial load is impossible
        raise WeightsError(f"{path}: keys not loaded: {', '.join(leftover[:_SHOW])}")
    return WeightsReport(path=path, loaded=len(state), dropped=dropped, stem=file_stem)
