"""Which CUDA GPU is visible, read from the NVIDIA driver library with ctypes: no torch, no cuda-python needed."""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

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
