"""Runtime probes: which CUDA GPU is visible, the optional TensorRT and cuda-python imports, version parsing.

The GPU is read from the NVIDIA driver library with ctypes: no torch, no cuda-python needed. TensorRT and
cuda-python are imported only when called, and their absence raises `RuntimeUnavailable` with the caller's advice.
"""

from __future__ import annotations

import ctypes
import re
import sys
from dataclasses import dataclass
from typing import Any

from imas_core.errors import RuntimeUnavailable

__all__ = ["GpuInfo", "gpu_info", "import_cudart", "import_tensorrt", "parse_compute_capability", "parse_version"]

_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


@dataclass(frozen=True)
class GpuInfo:
    """Device 0 as CUDA numbers it (CUDA_VISIBLE_DEVICES applies)."""

    name: str
    compute_capability: str  # "8.6", "8.7" (Jetson Orin), ...
    count: int


def gpu_info() -> GpuInfo | None:
    """Name and compute capability of the first visible CUDA device, or None without a driver or a device."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None or lib.cuInit(0) != 0:
        return None
    count, device = ctypes.c_int(0), ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    if lib.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetName(name, 256, device)
    lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)
    return GpuInfo(
        name=name.value.decode(errors="replace"), compute_capability=f"{major.value}.{minor.value}", count=count.value
    )


def import_tensorrt(advice: str) -> Any:
    """The `tensorrt` module; `RuntimeUnavailable` ("TensorRT is not installed; <advice>") when it is missing."""
    try:
        import tensorrt as trt  # optional: GPU hosts and Jetsons only
    except ImportError as err:
        raise RuntimeUnavailable(f"TensorRT is not installed; {advice}") from err
    return trt


def import_cudart() -> Any:
    """cuda-python's runtime bindings (both the >= 12.6 and the older module layout)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError as err:
            raise RuntimeUnavailable(
                'cuda-python is not installed; pip install -e ".[trt]" in the imas checkout'
            ) from err
    return cudart


def parse_version(text: str) -> tuple[int, int, int, int]:
    """'10.3.0.26' -> (10, 3, 0, 26); '11' -> (11, 0, 0, 0); '11.0.0b1' -> (11, 0, 0, 1). Missing parts are 0."""
    parts = [int(p) for p in re.findall(r"\d+", str(text))[:4]]
    padded = parts + [0] * (4 - len(parts))
    return padded[0], padded[1], padded[2], padded[3]


def parse_compute_capability(value: Any) -> tuple[int, int] | None:
    """'8.6', [8, 6], 'sm_86' or 86 -> (8, 6); None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    digits = re.findall(r"\d+", str(value))
    if len(digits) >= 2:
        return int(digits[0]), int(digits[1])
    number = int(digits[0])
    return number // 10, number % 10
