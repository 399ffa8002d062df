"""Helpers of the export tests: an independent torch reference and a plain ORT runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WINDOW = (65, 97)


def torch_logits(weights: Path, images: np.ndarray) -> np.ndarray:
    """Teacher logits for raw uint8/float RGB images, normalised here independently of the export wrapper."""
    import torch

    from imas_train.teacher_artifact import load_teacher

    model, meta = load_teacher(weights, "cpu")
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)) / 255.0
    x = (x - torch.tensor(meta.mean).view(1, 3, 1, 1)) / torch.tensor(meta.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model(x).numpy()


def random_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, height, width), dtype=np.uint8)


def ort_run(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    dtype = np.uint8 if inp.type == "tensor(uint8)" else np.float32
    return session.run(None, {inp.name: images.astype(dtype)})[0]
