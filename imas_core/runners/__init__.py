"""Choosing and opening a backend from the model file (overridable with --backend).

| file | default backend | allowed with --backend |
|---|---|---|
| `*.onnx` (+ `.onnx.json`) | `ort-cuda` if a CUDA driver and the CUDA provider exist, else `ort-cpu` | `ort-*` |
| `*.engine`, `*.plan` (+ `.json`) | `tensorrt` | `tensorrt` |
| `*.safetensors` (+ `teacher.json`) | `torch` | `torch` |

Backend modules are imported only when chosen, so the ONNX Runtime and TensorRT paths never import torch.
"""

from __future__ import annotations

import ctypes
import logging
import re
from pathlib import Path

from imas_core.artifacts import read_exported_meta
from imas_core.errors import InferError
from imas_core.runners.base import Backend, ModelInfo

logger = logging.getLogger(__name__)

__all__ = ["Backend", "ModelInfo", "backend_for", "open_backend", "parse_device"]

_BY_SUFFIX = {".onnx": "onnx", ".engine": "tensorrt", ".plan": "tensorrt", ".safetensors": "teacher"}
_ALLOWED = {"onnx": ("ort-cpu", "ort-cuda", "ort-trt"), "tensorrt": ("tensorrt",), "teacher": ("torch",)}


def model_format(model: Path) -> str:
    """ "onnx", "tensorrt" or "teacher" from the file extension."""
    fmt = _BY_SUFFIX.get(model.suffix.lower())
    if fmt is None:
        raise InferError(
            f"--model {model}: unknown model type {model.suffix!r}; expected .onnx, .engine/.plan or "
            ".safetensors (a teacher artifact)"
        )
    return fmt


def _cuda_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def backend_for(model: Path, override: str | None) -> str:
    """The backend name for `model`: `override` when given (checked against the file type), else the default."""
    fmt = model_format(model)
    if override is not None:
        if override not in _ALLOWED[fmt]:
            raise InferError(
                f"--backend {override} cannot run {model.name} ({fmt}); use one of {', '.join(_ALLOWED[fmt])}"
            )
        return override
    if fmt == "onnx":
        from imas_core.runners.onnxruntime_backend import import_onnxruntime

        has_cuda = "CUDAExecutionProvider" in import_onnxruntime().get_available_providers()
        return "ort-cuda" if has_cuda and _cuda_driver_present() else "ort-cpu"
    return _ALLOWED[fmt][0]


def parse_device(device: str | None) -> int:
    """CUDA device index of "cuda" / "cuda:N" (0 when unset); "cpu" is only meaningful for ort-cpu and torch."""
    if device is None or device in ("cuda", "cpu"):
        return 0
    match = re.fullmatch(r"cuda:(\d+)", device)
    if match is None:
        raise InferError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    return int(match.group(1))


def open_backend(
    model: Path,
    *,
    backend: str | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> Backend:
    """Load `model` with the chosen backend (see the module table).

    Raises:
        InferError: the runtime is missing, or the model or its options are unusable.
        ArtifactError: the sidecar is missing, invalid, or does not match the model file.
    """
    model = Path(model)
    if not model.is_file():
        raise InferError(f"--model {model}: no such file")
    if backend is None and device == "cpu" and model_format(model) == "onnx":
        backend = "ort-cpu"
    name = backend_for(model, backend)
    device_id = parse_device(device)
    if name.startswith("ort-"):
        if device == "cpu" and name != "ort-cpu":
            raise InferError(f"--device cpu contradicts --backend {name}")
        from imas_core.runners.onnxruntime_backend import OrtBackend

        meta = read_exported_meta(model)
        try:
            return OrtBackend(model, meta, name=name, device_id=device_id, threads=threads)
        except InferError as err:
            if backend is not None or name == "ort-cpu":
                raise
            logger.warning("%s; falling back to ort-cpu", err)  # auto-selected CUDA that does not initialise
            return OrtBackend(model, meta, name="ort-cpu", threads=threads)
    if name == "tensorrt":
        from imas_core.runners.tensorrt_backend import TENSORRT_ADVICE, TensorRTBackend
        from imas_core.runtime import import_tensorrt

        import_tensorrt(TENSORRT_ADVICE)  # a missing runtime is the first thing to report
        return TensorRTBackend(model, read_exported_meta(model), device_id=device_id)
    from imas_core.runners.torch_backend import TorchBackend

    return TorchBackend(model, device=device, threads=threads)
