"""ONNX Runtime backend: CPU, CUDA, or TensorRT execution provider. Never imports torch.

* CPU: the output is bound with I/O binding to a preallocated numpy array (reused across calls), so ONNX Runtime
  writes the result in place instead of allocating and copying a fresh array every call.
* CUDA / TensorRT EP: the input is bound from host memory (`bind_cpu_input`, one host->device copy), the output is
  bound to a preallocated device OrtValue (one device->host copy when read back).
Sessions use ORT_ENABLE_ALL graph optimisation; `threads` sets the intra-op thread count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from imas_core.artifacts import ExportedModelMeta, sidecar_path
from imas_core.errors import ArtifactError, InferError, RuntimeUnavailable
from imas_core.runners.base import Backend, ModelInfo, check_class_count, info_from_exported

logger = logging.getLogger(__name__)

_PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_METADATA_NUM_CLASSES = "imas.num_classes"  # written by imas-export into the ONNX's metadata_props (JSON)
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def import_onnxruntime() -> Any:
    try:
        import onnxruntime as ort  # optional: the [infer] extra
    except ImportError as err:
        raise InferError(
            'onnxruntime is not installed; pip install -e ".[infer]" in the imas checkout (onnxruntime-gpu)'
        ) from err
    return ort


class OrtBackend(Backend):
    """An ONNX model with its sidecar, run by ONNX Runtime.

    Args:
        model_path: the .onnx file.
        meta: its sidecar (`imas_core.artifacts.read_exported_meta`).
        name: "ort-cpu", "ort-cuda" or "ort-trt".
        device_id: CUDA device for the GPU providers.
        threads: intra-op threads; None keeps ONNX Runtime's default.
    """

    def __init__(
        self,
        model_path: Path,
        meta: ExportedModelMeta,
        *,
        name: str = "ort-cpu",
        device_id: int = 0,
        threads: int | None = None,
    ) -> None:
        if name not in _PROVIDERS:
            raise InferError(f"unknown ONNX Runtime backend {name!r}; one of {', '.join(_PROVIDERS)}")
        ort = import_onnxruntime()
        self._ort = ort
        self.name = name
        self.info = info_from_exported(model_path, meta, "onnx")
        missing = [p for p in _PROVIDERS[name][:-1] if p not in ort.get_available_providers()]
        if missing:
            raise RuntimeUnavailable(
                f"--backend {name}: this onnxruntime build lacks {', '.join(missing)} (it has "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
            )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            opts.intra_op_num_threads = threads
        providers: list[Any] = [
            (p, {"device_id": device_id}) if p != "CPUExecutionProvider" else p for p in _PROVIDERS[name]
        ]
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise InferError(f"{model_path.name}: ONNX Runtime cannot load the model ({err})") from err
        active = self.session.get_providers()
        if active[0] != _PROVIDERS[name][0]:
            raise InferError(
                f"--backend {name}: {_PROVIDERS[name][0]} could not be initialised (active: "
                f"{', '.join(active)}); check the CUDA/cuDNN installation or use --backend ort-cpu"
            )
        self.runtime = active[0]
        self.on_gpu = name != "ort-cpu"
        self._device_id = device_id
        self._check_against_sidecar(meta)
        self._out_buffers: dict[tuple[int, ...], Any] = {}

    def _check_against_sidecar(self, meta: ExportedModelMeta) -> None:
        path = self.info.path.name
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        by_name = {o.name: o for o in outputs}
        if len(inputs) != 1 or inputs[0].name != meta.input_name:
            raise ArtifactError(
                f"{path}: graph inputs {[i.name for i in inputs]}, sidecar input_name {meta.input_name!r}"
            )
        if meta.output_name not in by_name:
            raise ArtifactError(f"{path}: graph outputs {list(by_name)}, sidecar output_name {meta.output_name!r}")
        self._input, self._output = inputs[0], by_name[meta.output_name]
        in_type = _ORT_TYPES.get(self._input.type)
        if in_type is None or np.dtype(in_type) != np.dtype(meta.input_dtype):
            raise ArtifactError(f"{path}: graph input type {self._input.type}, sidecar input_dtype {meta.input_dtype}")
        self._out_dtype = np.dtype(_ORT_TYPES.get(self._output.type, np.float32))
        self._check_class_count(meta)
        shape = self._input.shape
        if len(shape) != 4 or shape[1] != 3:
            raise ArtifactError(f"{path}: graph input shape {shape}, expected (N, 3, H, W)")
        static_hw = tuple(shape[2:]) if all(isinstance(d, int) for d in shape[2:]) else None
        if static_hw != (tuple(meta.input_size) if meta.input_size else None):
            field = "image_size (stitched)" if meta.stitched else "window"
            raise ArtifactError(f"{path}: graph input height/width {shape[2:]}, sidecar {field} {meta.input_size}")
        if isinstance(shape[0], int):  # a static batch: every call must send exactly that many windows
            self.fixed_batch: int | None = shape[0]
            self.info = _with_hard_batch(self.info, shape[0])
        else:
            self.fixed_batch = None

    def _check_class_count(self, meta: ExportedModelMeta) -> None:
        """The sidecar's class count against the output's class dimension when it is static, and against the
        ``imas.num_classes`` the exporter records inside the ONNX (torch's exporter leaves the class dimension of a
        window model symbolic, so the metadata is what a bare graph says about its classes)."""
        sidecar, name = sidecar_path(self.info.path), self.info.path.name
        shape = self._output.shape
        if meta.output_kind != "labels" and len(shape) == 4 and isinstance(shape[1], int):
            check_class_count(sidecar, meta.num_classes, shape[1], f"the graph of {name} outputs")
        recorded = self.session.get_modelmeta().custom_metadata_map.get(_METADATA_NUM_CLASSES)
        try:
            recorded_classes = json.loads(recorded) if recorded is not None else None
        except ValueError:
            recorded_classes = None
        if isinstance(recorded_classes, int):
            check_class_count(sidecar, meta.num_classes, recorded_classes, f"the metadata inside {name} records")

    def _keep(self, shape: tuple[int, ...], buffer: Any) -> None:
        """Cache an output buffer per shape; a few shapes at most (the imas protocol has four tile shapes)."""
        if len(self._out_buffers) >= 4:
            del self._out_buffers[next(iter(self._out_buffers))]
        self._out_buffers[shape] = buffer

    def _output_shape(self, n: int, h: int, w: int) -> tuple[int, ...]:
        return (n, h, w) if self.info.output_kind == "labels" else (n, self.info.num_classes, h, w)

    def run(self, batch: np.ndarray) -> np.ndarray:
        n, _, h, w = batch.shape
        if self.fixed_batch is not None and n != self.fixed_batch:  # pad to the static batch, drop the extra rows
            if n > self.fixed_batch:
                raise InferError(
                    f"{self.info.path.name}: batch {n} exceeds the model's static batch {self.fixed_batch}"
                )
            padded = np.zeros((self.fixed_batch, *batch.shape[1:]), dtype=batch.dtype)
            padded[:n] = batch
            return self.run(padded)[:n]
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        shape = self._output_shape(n, h, w)
        binding = self.session.io_binding()
        binding.bind_cpu_input(self._input.name, batch)
        try:
            if self.on_gpu:
                value = self._out_buffers.get(shape)
                if value is None:
                    value = self._ort.OrtValue.ortvalue_from_shape_and_type(
                        list(shape), self._out_dtype.type, "cuda", self._device_id
                    )
                    self._keep(shape, value)
                binding.bind_ortvalue_output(self._output.name, value)
                self.session.run_with_iobinding(binding)
                out = binding.copy_outputs_to_cpu()[0]  # the one device->host copy
            else:
                out = self._out_buffers.get(shape)
                if out is None:
                    out = np.empty(shape, dtype=self._out_dtype)
                    self._keep(shape, out)
                binding.bind_output(self._output.name, "cpu", 0, self._out_dtype.type, list(shape), out.ctypes.data)
                self.session.run_with_iobinding(binding)
        except Exception as err:
            raise InferError(
                f"{self.info.path.name}: ONNX Runtime failed on a batch of shape {batch.shape} ({err})"
            ) from err
        return _as_contract(out, self.info.output_kind)

    def close(self) -> None:
        self._out_buffers = {}


def _as_contract(out: np.ndarray, output_kind: str) -> np.ndarray:
    """float32 scores or uint8 class ids, whatever the graph's own output type."""
    if output_kind == "labels":
        return out if out.dtype == np.uint8 else out.astype(np.uint8)
    return out if out.dtype == np.float32 else out.astype(np.float32)


def _with_hard_batch(info: ModelInfo, batch: int) -> ModelInfo:
    return dataclasses.replace(info, max_batch=batch, max_batch_is_hard=True)
