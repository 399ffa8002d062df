"""Options of the three export stages. The CLI parses its flags into these, so the Python API and the CLI are one.

Tier 0 (stdlib only): building options never imports torch, onnx or TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Precision = Literal["fp32", "fp16", "int8"]
OutputKind = Literal["logits", "probs", "labels"]
InputDtype = Literal["float32", "uint8"]
Provider = Literal["cpu", "cuda"]
HardwareCompat = Literal["none", "ampere+", "same-cc"]

# Minimum argmax pixel agreement with the PyTorch teacher, per precision (README "Export parity").
# fp32 differs from torch only by kernel summation order (typically < 1e-4 max-abs on logits), so a single flipped
# pixel in 1000 already signals a real export bug. fp16 flips pixels near class boundaries; on trained models we
# see 99.5-99.9%. Post-training int8 (per-channel symmetric Q/DQ) typically keeps 97-99% with 300+ calibration images.
DEFAULT_MIN_AGREEMENT: dict[str, float] = {"fp32": 0.999, "fp16": 0.99, "int8": 0.95}
# Largest max-abs logit difference accepted by default. Enforced for fp32 only: fp16/int8 logit errors scale with
# the logit magnitude (0.05-0.5 is normal for fp16 on trained models), so agreement is the meaningful gate there.
DEFAULT_MAX_ABS: dict[str, float | None] = {"fp32": 1e-2, "fp16": None, "int8": None}
MIN_CALIBRATION_IMAGES = 300  # fewer calibration images give noisy activation ranges: warn
# Declared maximum batch when --max-batch is not given: windows per call for window models; whole images per call
# for stitched models (one 1024x2048 Cityscapes image is already 8 windows of 769x769 in one call).
DEFAULT_MAX_BATCH = {"window": 8, "stitched": 2}
# TensorRT profile batch sizes (min, opt, max) when not given: windows, or whole images for stitched models.
DEFAULT_ENGINE_BATCH = {"window": (1, 4, 8), "stitched": (1, 1, 2)}


@dataclass(frozen=True)
class ParityOptions:
    """Images and thresholds of a parity check (ONNX Runtime or TensorRT against the PyTorch teacher)."""

    images_dir: Path | None = None  # None: the demo validation set rendered at the window size
    labels_dir: Path | None = None  # ground-truth PNGs named like the images (same stem): adds mIoU
    num_images: int = 8  # images compared; all of `images_dir` when larger
    min_agreement: float | None = None  # None: DEFAULT_MIN_AGREEMENT[precision]
    max_abs_diff: float | None = None  # None: DEFAULT_MAX_ABS[precision]
    provider: Provider = "cpu"  # ONNX Runtime execution provider for the check


@dataclass(frozen=True)
class OnnxExportOptions:
    """`imas-export onnx`: teacher artifact -> ONNX (+ sidecar) with normalisation in the graph."""

    teacher: Path
    output: Path
    window: tuple[int, int] | None = None  # (H, W); None: the teacher's validation window (square)
    dynamic_hw: bool = False  # dynamic height/width too; a fixed window is the engine-friendly default
    # (H, W): export a *stitched* model that takes whole images of this size and runs the full_tiles sliding
    # window (`window`, the teacher's stride) inside the graph; None: a window model
    image_size: tuple[int, int] | None = None
    input_dtype: InputDtype = "float32"  # raw RGB 0-255 as float32, or uint8 (4x less host->device traffic)
    output_kind: OutputKind | None = None  # None: labels for stitched models, else logits
    precision: Precision = "fp32"
    calib_dir: Path | None = None  # int8: calibration images; None uses demo images (and warns loudly)
    eval_dir: Path | None = None  # int8 held-out images; None: parity.images_dir, else the last 20% of calib_dir
    calib_images: int = 500  # int8: at most this many calibration images are read
    opset: int = 17  # TensorRT 8.6+/10.x/11.x, ORT >= 1.13, JetPack 5/6; Resize align_corners exists since 11
    simplify: bool = False  # ONNX Runtime offline basic optimisation (constant folding, redundant nodes)
    max_batch: int | None = None  # declared in the sidecar (the ONNX batch is dynamic); None: DEFAULT_MAX_BATCH
    parity: ParityOptions = ParityOptions()

    @property
    def stitched(self) -> bool:
        return self.image_size is not None

    @property
    def resolved_output_kind(self) -> OutputKind:
        """`output_kind`, or its default: labels for stitched models, logits for window models."""
        if self.output_kind is not None:
            return self.output_kind
        return "labels" if self.stitched else "logits"

    @property
    def resolved_max_batch(self) -> int:
        """`max_batch`, or DEFAULT_MAX_BATCH for the kind of model (windows, or images when stitched)."""
        return self.max_batch or DEFAULT_MAX_BATCH["stitched" if self.stitched else "window"]


@dataclass(frozen=True)
class EngineOptions:
    """`imas-export trt`: ONNX -> serialized TensorRT engine (strongly typed; precision comes from the ONNX)."""

    onnx: Path
    output: Path
    min_batch: int | None = None  # profile batch sizes; None: DEFAULT_ENGINE_BATCH (images for stitched models)
    opt_batch: int | None = None
    max_batch: int | None = None
    min_hw: tuple[int, int] | None = None  # dynamic-HW ONNX only
    opt_hw: tuple[int, int] | None = None
    max_hw: tuple[int, int] | None = None
    workspace_gb: float = 4.0  # builder scratch memory limit (tactics needing more are skipped)
    timing_cache: Path | None = None  # None: `timing.cache` beside the engine
    version_compatible: bool = False  # runs on later TensorRT versions of the same major (lean runtime embedded)
    hardware_compat: HardwareCompat = "none"  # ampere+: any Ampere-or-newer GPU; same-cc: same compute capability


@dataclass(frozen=True)
class VerifyOptions:
    """`imas-export verify`: PyTorch vs ONNX Runtime vs TensorRT on the same images."""

    teacher: Path
    onnx: Path
    engine: Path | None = None
    parity: ParityOptions = ParityOptions()
