"""Export the EMA teacher: ONNX with normalisation in the graph, reduced precision, TensorRT engines, parity checks.

The Python API is the CLI: `imas-export onnx|trt|verify` parse their flags into the option dataclasses below and
call these three functions. Each imports its heavy dependencies (torch, onnx, TensorRT) only when called, so
`imas-export trt` never loads torch. (The verify implementation lives in `verification.py`: a submodule named
`verify` would replace this `verify` function as a package attribute once imported.)

    from imas_export import OnnxExportOptions, export_onnx
    result = export_onnx(OnnxExportOptions(teacher=Path("runs/x/teacher.safetensors"), output=Path("model.onnx")))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imas_export.options import EngineOptions, OnnxExportOptions, ParityOptions, VerifyOptions
from imas_export.stages import Stage, StageCallback

if TYPE_CHECKING:
    from imas_export.onnx_export import OnnxExportResult
    from imas_export.trt_build import EngineBuildResult
    from imas_export.verification import VerifyResult

__all__ = [
    "EngineOptions",
    "OnnxExportOptions",
    "ParityOptions",
    "Stage",
    "VerifyOptions",
    "build_engine",
    "export_onnx",
    "verify",
]


def export_onnx(options: OnnxExportOptions, on_stage: StageCallback | None = None) -> OnnxExportResult:
    """Teacher artifact -> ONNX + sidecar, written only after the parity check passed (`imas-export onnx`)."""
    from imas_export.onnx_export import export_onnx as run

    return run(options, on_stage)


def build_engine(options: EngineOptions, on_stage: StageCallback | None = None) -> EngineBuildResult:
    """Checked ONNX -> strongly typed TensorRT engine + sidecar and timing cache (`imas-export trt`)."""
    from imas_export.trt_build import build_engine as run

    return run(options, on_stage)


def verify(options: VerifyOptions, on_stage: StageCallback | None = None) -> VerifyResult:
    """PyTorch vs ONNX Runtime vs TensorRT parity on the same images (`imas-export verify`)."""
    from imas_export.verification import verify as run

    return run(options, on_stage)
