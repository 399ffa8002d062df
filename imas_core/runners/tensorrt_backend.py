"""TensorRT backend (TensorRT 10.x/11.x Python API + cuda-python runtime bindings). Never imports torch.

TensorRT and cuda-python are imported when a backend is created, so this module imports on any machine. Setup,
once per engine: check the sidecar against the running TensorRT version and the GPU's compute capability (refusing
with the `imas-export trt` rebuild command), deserialize the plan, allocate device buffers and pinned host staging
buffers for the largest batch the profile allows, and bind the device buffers with `set_tensor_address`.

Per call there are exactly two transfers on one CUDA stream: the batch host->device, and the result device->host
(`execute_async_v3` in between). For a window engine, stitching then accumulates in numpy on the host, so every
window's (C, h, w) scores cross to the host. An engine built from a *stitched* ONNX (`imas-export onnx --image-size`)
runs the sliding window on the GPU inside the engine: the buffers are (N, 3, H, W) whole images in and (N, H, W)
uint8 labels out, bound once, and the label map is the only device->host copy.

Version-compatible engines (`imas-export trt --version-compatible`) embed a lean runtime, which is host code:
`Runtime.engine_host_code_allowed` is set for them (from the sidecar's `tensorrt.version_compatible`) before
deserialising, as TensorRT requires. Only load engines you built or received from a trusted source.
"""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from imas_core.artifacts import ExportedModelMeta, sidecar_path
from imas_core.errors import ArtifactError, InferError
from imas_core.runners.base import Backend, check_class_count, info_from_exported
from imas_core.runtime import import_cudart, import_tensorrt, parse_compute_capability, parse_version

TENSORRT_ADVICE = (
    'install it on the GPU host (pip install -e ".[trt]" in the imas checkout, or JetPack\'s wheel on a Jetson), '
    "or run the ONNX model with --backend ort-cuda / ort-cpu"
)
MIN_TENSORRT = (10, 0)  # the named-tensor API (num_io_tensors, set_tensor_address, execute_async_v3)


def rebuild_command(engine: Path, meta: ExportedModelMeta) -> str:
    """The `imas-export trt` command that rebuilds `engine` on this machine, with the recorded build options."""
    onnx_name = meta.tensorrt.get("onnx_name")
    if onnx_name:
        onnx = engine.with_name(str(onnx_name))
    else:  # guess: model.fp16.engine from model.fp16.onnx or model.onnx
        onnx = engine.with_suffix(".onnx")
        if not onnx.exists() and engine.with_suffix("").suffix in (".fp16", ".fp32", ".int8"):
            onnx = engine.with_suffix("").with_suffix(".onnx")
    parts = ["imas-export trt", f"--onnx {onnx}", f"--output {engine}"]
    if meta.max_batch:
        parts.append(f"--max-batch {meta.max_batch}")
    if meta.tensorrt.get("version_compatible"):
        parts.append("--version-compatible")
    if meta.tensorrt.get("hardware_compat", "none") != "none":
        parts.append(f"--hardware-compat {meta.tensorrt['hardware_compat']}")
    return " ".join(parts)


def check_engine_compat(
    engine: Path,
    meta: ExportedModelMeta,
    runtime_version: str,
    compute_capability: tuple[int, int],
) -> None:
    """Refuse an engine built for another TensorRT version or GPU generation.

    The version must match exactly unless the engine is version-compatible (then same major, runtime not older);
    the compute capability must match unless the engine is hardware-compatible ("ampere+": any cc >= 8.0).

    Raises:
        InferError: naming both values and the rebuild command.
    """
    if meta.kind != "tensorrt":
        raise ArtifactError(f"{engine.name}: sidecar kind is {meta.kind!r}, expected 'tensorrt'")
    if parse_version(runtime_version)[:2] < MIN_TENSORRT:
        raise InferError(f"TensorRT {runtime_version} is too old; imas needs >= {'.'.join(map(str, MIN_TENSORRT))}")
    built = meta.tensorrt.get("version") or meta.tensorrt.get("trt_version")
    hint = f"rebuild it on this machine: {rebuild_command(engine, meta)}"
    if built is None:
        raise ArtifactError(f"{sidecar_name(engine)}: tensorrt.version missing; {hint}")
    run_v, built_v = parse_version(runtime_version), parse_version(built)
    if meta.tensorrt.get("version_compatible"):
        ok = run_v[0] == built_v[0] and run_v >= built_v
    else:
        ok = run_v[:3] == built_v[:3]
    if not ok:
        raise InferError(f"{engine.name}: built with TensorRT {built}, this runtime is {runtime_version}; {hint}")
    built_cc = parse_compute_capability(meta.tensorrt.get("compute_capability"))
    if built_cc is None:
        raise ArtifactError(f"{sidecar_name(engine)}: tensorrt.compute_capability missing; {hint}")
    compat = str(meta.tensorrt.get("hardware_compat", "none"))
    ok = compute_capability >= (8, 0) if compat == "ampere+" else compute_capability == built_cc
    if not ok:
        gpu = meta.tensorrt.get("gpu", "?")
        raise InferError(
            f"{engine.name}: built for compute capability {built_cc[0]}.{built_cc[1]} ({gpu}), this GPU "
            f"is {compute_capability[0]}.{compute_capability[1]}; {hint}"
        )


def sidecar_name(engine: Path) -> str:
    return engine.name + ".json"


def _within(hw: tuple[int, int] | None, lo: tuple[int, ...], hi: tuple[int, ...]) -> bool:
    """True when a (H, W) window fits the profile's input height/width range."""
    return hw is not None and lo[2] <= hw[0] <= hi[2] and lo[3] <= hw[1] <= hi[3]


class TensorRTBackend(Backend):
    """A serialized engine with its sidecar.

    Args:
        engine_path: the .engine / .plan file (the raw plan).
        meta: its sidecar (`imas_core.artifacts.read_exported_meta`).
        device_id: CUDA device to run on.
    """

    name = "tensorrt"

    def __init__(self, engine_path: Path, meta: ExportedModelMeta, *, device_id: int = 0) -> None:
        trt = import_tensorrt(TENSORRT_ADVICE)
        self._cudart = import_cudart()
        self._device_buffers: list[int] = []
        self._host_buffers: list[int] = []
        self._stream: Any = None
        try:
            self._load(trt, Path(engine_path), meta, device_id)
        except BaseException:
            self.close()
            raise

    def _load(self, trt: Any, engine_path: Path, meta: ExportedModelMeta, device_id: int) -> None:
        cudart = self._cudart
        self._check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        props = self._check(cudart.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
        cc = (int(props.major), int(props.minor))
        gpu = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        check_engine_compat(engine_path, meta, trt.__version__, cc)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if meta.tensorrt.get("version_compatible"):  # the plan embeds the lean runtime (host code); trusted sidecar
            self._runtime.engine_host_code_allowed = True
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise InferError(
                f"{engine_path.name}: TensorRT could not deserialize the engine; {rebuild_command(engine_path, meta)}"
            )
        self.context = self.engine.create_execution_context()
        self.runtime = f"TensorRT {trt.__version__} on {gpu} (sm {cc[0]}{cc[1]})"
        self._setup_tensors(trt, engine_path, meta)

    def _check(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise InferError(f"CUDA {what} failed: {self._cudart.cudaGetErrorString(err)[1]}")
        return values[0] if len(values) == 1 else values

    def _setup_tensors(self, trt: Any, path: Path, meta: ExportedModelMeta) -> None:
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        inputs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [meta.input_name] or meta.output_name not in outputs:
            raise ArtifactError(
                f"{path.name}: engine inputs {inputs} / outputs {outputs}, sidecar "
                f"{meta.input_name!r} / {meta.output_name!r}"
            )
        self._in, self._out = meta.input_name, meta.output_name
        self._in_dtype = np.dtype(trt.nptype(e.get_tensor_dtype(self._in)))
        self._out_dtype = np.dtype(trt.nptype(e.get_tensor_dtype(self._out)))
        if self._in_dtype != np.dtype(meta.input_dtype):
            raise ArtifactError(f"{path.name}: engine input {self._in_dtype}, sidecar input_dtype {meta.input_dtype}")
        shape = tuple(e.get_tensor_shape(self._in))
        lo, opt, hi = (tuple(d) for d in e.get_tensor_profile_shape(self._in, 0)) if -1 in shape else (shape,) * 3
        static_hw = shape[2:] if -1 not in shape[2:] else None
        if (tuple(meta.input_size) if meta.input_size else None) != static_hw:
            field = "image_size (stitched)" if meta.stitched else "window"
            raise ArtifactError(f"{path.name}: engine input {shape}, sidecar {field} {meta.input_size}")
        out_shape = tuple(e.get_tensor_shape(self._out))
        if meta.output_kind != "labels" and len(out_shape) == 4 and out_shape[1] != -1:
            check_class_count(
                sidecar_path(path), meta.num_classes, int(out_shape[1]), f"the engine {path.name} outputs"
            )
        self._min_shape, self._max_shape = lo, hi
        self.fixed_batch = shape[0] if shape[0] != -1 else None
        info = info_from_exported(path, meta, "tensorrt")
        default_window = info.default_window if static_hw is None else info.window
        if static_hw is None and not _within(default_window, lo, hi):  # the teacher's window is outside the profile
            default_window = (opt[2], opt[3])
        self.info = dataclasses.replace(info, max_batch=hi[0], max_batch_is_hard=True, default_window=default_window)
        # Buffers for the largest profile shape, bound once; set_input_shape only changes what is read/written.
        classes = () if meta.output_kind == "labels" else (meta.num_classes,)
        in_bytes = int(np.prod(hi)) * self._in_dtype.itemsize
        out_bytes = hi[0] * int(np.prod(classes, dtype=np.int64)) * hi[2] * hi[3] * self._out_dtype.itemsize
        self._d_in, self._d_out = self._malloc(in_bytes), self._malloc(out_bytes)
        self._h_in, self._h_out = self._pinned(in_bytes), self._pinned(out_bytes)
        self.context.set_tensor_address(self._in, self._d_in)
        self.context.set_tensor_address(self._out, self._d_out)
        self._stream = self._check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._bound: tuple[int, ...] | None = None

    def _malloc(self, nbytes: int) -> int:
        ptr = int(self._check(self._cudart.cudaMalloc(nbytes), "cudaMalloc"))
        self._device_buffers.append(ptr)
        return ptr

    def _pinned(self, nbytes: int) -> np.ndarray:
        ptr = int(self._check(self._cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        self._host_buffers.append(ptr)
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))

    def run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if self.fixed_batch is not None and n < self.fixed_batch:
            padded = np.zeros((self.fixed_batch, *batch.shape[1:]), dtype=batch.dtype)
            padded[:n] = batch
            return self.run(padded)[:n]
        shape = tuple(batch.shape)
        if any(s < lo or s > hi for s, lo, hi in zip(shape, self._min_shape, self._max_shape, strict=True)):
            raise InferError(
                f"{self.info.path.name}: input {shape} outside the engine profile {self._min_shape}..{self._max_shape}"
            )
        if shape != self._bound:
            if not self.context.set_input_shape(self._in, shape):
                raise InferError(f"{self.info.path.name}: TensorRT rejected input shape {shape}")
            self._bound = shape
        out_shape = tuple(self.context.get_tensor_shape(self._out))
        host_in = self._h_in[: batch.nbytes].view(self._in_dtype).reshape(shape)
        np.copyto(host_in, batch, casting="unsafe")
        out_bytes = int(np.prod(out_shape)) * self._out_dtype.itemsize
        cudart, stream = self._cudart, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(cudart.cudaMemcpyAsync(self._d_in, host_in.ctypes.data, batch.nbytes, h2d, stream), "copy in")
        if not self.context.execute_async_v3(int(stream)):
            raise InferError(f"{self.info.path.name}: execute_async_v3 failed (see the TensorRT log above)")
        self._check(cudart.cudaMemcpyAsync(self._h_out.ctypes.data, self._d_out, out_bytes, d2h, stream), "copy out")
        self._check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        out = self._h_out[:out_bytes].view(self._out_dtype).reshape(out_shape)
        if self.info.output_kind == "labels":
            return out if out.dtype == np.uint8 else out.astype(np.uint8)
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        for ptr in self._device_buffers:
            cudart.cudaFree(ptr)
        for ptr in self._host_buffers:
            cudart.cudaFreeHost(ptr)
        self._device_buffers, self._host_buffers = [], []
        self.context = self.engine = None
