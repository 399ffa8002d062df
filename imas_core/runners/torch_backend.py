"""PyTorch backend: the EMA teacher artifact (`teacher.safetensors` + `teacher.json`) run directly.

The only inference path that needs torch; `backends.open_backend` imports this module only when it is chosen, and
torch itself is imported inside the constructor. The model accepts any window size, so both protocols and
whole-image mode work. Stitching happens where the model runs: on a GPU in device tensors (`TorchStitcher`: window
results are softmaxed and accumulated there, and only the class ids and probabilities are copied back); on the CPU
with `NumpyStitcher`, measured 2.5x faster there.

On the CPU the intra-op thread count is ``--threads`` when given, else the training's default policy
(`imas_train.threads.default_cpu_threads` for one process), so a shared machine is not oversubscribed; `close`
gives torch its previous count back.

Before the model is built, the class count of ``teacher.json`` is compared with the classifier's output channels
in ``teacher.safetensors`` (read from the file's JSON header, no tensor loaded): a sidecar of another model is
refused naming both numbers, instead of as a list of shape mismatches.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from imas_core.artifacts import read_teacher_meta, teacher_sidecar_path
from imas_core.errors import ArtifactError, InferError
from imas_core.runners.base import Backend, ModelInfo, check_class_count
from imas_core.stitching import NumpyStitcher, Stitcher
from imas_core.tiling import Window


def _import_torch() -> Any:
    try:
        import torch  # optional: the workstation install
    except ImportError as err:
        raise InferError(
            '--backend torch needs PyTorch (pip install -e ".[workstation]" in the imas checkout); '
            "export the teacher to ONNX to run without it"
        ) from err
    return torch


_CLASSIFIER_BIAS = re.compile(r"classifier\.(\d+)\.bias")  # DeepLabV3Plus.classifier ends in the class convolution


def weights_num_classes(weights_path: Path) -> int | None:
    """The classes a teacher's weights output: the length of the classifier's last bias, from the safetensors
    header (8-byte little-endian length, then JSON); None when the file has no such tensor.

    Raises:
        ArtifactError: the file is not a readable safetensors file.
    """
    try:
        with open(weights_path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(min(length, 100_000_000)))
    except (OSError, struct.error, ValueError) as err:
        raise ArtifactError(f"{weights_path}: not a readable safetensors file ({err})") from err
    found = [(int(m.group(1)), entry) for key, entry in header.items() if (m := _CLASSIFIER_BIAS.fullmatch(key))]
    if not found:
        return None
    shape = max(found, key=lambda item: item[0])[1].get("shape", [])
    return int(shape[0]) if len(shape) == 1 else None


class TorchStitcher:
    """`stitch.NumpyStitcher` in torch tensors on the model's device."""

    def __init__(self, torch: Any, device: Any, num_classes: int, *, softmax: bool) -> None:
        self.torch, self.device, self.num_classes, self.softmax = torch, device, num_classes, softmax

    def scores(self, out: Any) -> Any:
        out = out.float()
        return out.softmax(dim=1) if self.softmax else out

    def new_canvas(self, canvas_hw: tuple[int, int]) -> tuple[Any, Any]:
        zeros = self.torch.zeros
        return zeros((self.num_classes, *canvas_hw), device=self.device), zeros(canvas_hw, device=self.device)

    def add(self, canvas: Any, scores: Any, index: int, window: Window, flipped: bool) -> None:
        total, count = canvas
        y0, y1, x0, x1 = window
        result = scores[index].flip(-1) if flipped else scores[index]
        total[:, y0:y1, x0:x1] += result
        count[y0:y1, x0:x1] += 1.0

    def finish(self, canvas: Any, image_hw: tuple[int, int], keep_probs: bool) -> tuple[np.ndarray, np.ndarray | None]:
        total, count = canvas
        h, w = image_hw
        region = total[:, :h, :w]
        labels = region.argmax(dim=0).to(self.torch.uint8).cpu().numpy()
        probs = (region / count[:h, :w]).cpu().numpy() if keep_probs else None
        return labels, probs


class TorchBackend(Backend):
    """The teacher artifact on a torch device.

    Args:
        weights_path: `teacher.safetensors`; `teacher.json` must sit beside it (checksum verified on load).
        device: "cpu", "cuda" or "cuda:N"; None picks CUDA when available.
        threads: torch intra-op threads; None: on the CPU, the toolkit's default policy
            (`imas_train.threads.default_cpu_threads`), elsewhere torch's own count.
    """

    name = "torch"

    def __init__(self, weights_path: Path, *, device: str | None = None, threads: int | None = None) -> None:
        torch = self._torch = _import_torch()
        from imas_train.teacher_artifact import load_teacher  # tier 1: imports torch
        from imas_train.threads import default_cpu_threads

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        weights_path = Path(weights_path)
        sidecar_classes = int(read_teacher_meta(weights_path, verify_checksum=False).model_config["num_classes"])
        weights_classes = weights_num_classes(weights_path)
        if weights_classes is not None:
            check_class_count(teacher_sidecar_path(weights_path), sidecar_classes, weights_classes,
                              f"the classifier in {weights_path.name} outputs")  # fmt: skip
        self.model, meta = load_teacher(Path(weights_path), self.device)
        num_classes = int(meta.model_config["num_classes"])
        self.info = ModelInfo(
            path=Path(weights_path),
            format="teacher",
            num_classes=num_classes,
            class_names=tuple(meta.class_names),
            palette=tuple((int(c[0]), int(c[1]), int(c[2])) for c in meta.palette),
            window=None,
            default_window=(meta.window, meta.window),
            default_stride=(meta.stride, meta.stride),
            max_batch=None,
            max_batch_is_hard=False,
            output_kind="logits",
            input_dtype="float32",
            precision="fp32",
            eval_protocol=meta.eval_protocol,
        )
        # Normalisation of 0-1 RGB, applied to 0-255 input: (x/255 - mean)/std = (x - 255 mean)/(255 std).
        self._mean = torch.tensor(meta.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(meta.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._threads_before: int | None = torch.get_num_threads()  # restored by close()
        if threads is None and self.device.type == "cpu":
            threads = default_cpu_threads(1)
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()  # intra-op threads this backend runs with
        on_cpu = f", {self.threads} thread(s)" if self.device.type == "cpu" else ""
        self.runtime = f"torch {torch.__version__} {self.device}{on_cpu}"

    def run_device(self, batch: np.ndarray) -> Any:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, dtype=torch.float32, non_blocking=True)
        with torch.no_grad():
            out = self.model((x - self._mean) / self._std).float()
        return out.numpy() if self.device.type == "cpu" else out  # CPU: the numpy stitcher is ~2.5x faster

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self.run_device(batch)
        return out if isinstance(out, np.ndarray) else out.cpu().numpy()

    def stitcher(self, *, softmax: bool) -> Stitcher:
        """Accumulate where the model runs: torch tensors on a GPU, numpy on the CPU (measured faster there)."""
        if self.device.type == "cpu":
            return NumpyStitcher(self.info.output_kind, self.info.num_classes, softmax=softmax)
        return TorchStitcher(self._torch, self.device, self.info.num_classes, softmax=softmax)

    def close(self) -> None:
        """Drop the model and give torch back the thread count it had before this backend."""
        self.model = None
        if self._threads_before is not None:
            self._torch.set_num_threads(self._threads_before)
            self._threads_before = None
