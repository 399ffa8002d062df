"""The torch backend on the tiny teacher artifact: outputs, device stitching, and agreement with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imas_core.stitching import NumpyStitcher
from imas_core.tiling import Window
from imas_infer.cli import main
from tests.infer.infer_helpers import random_image, save_image

torch = pytest.importorskip("torch")


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    for i, (h, w) in enumerate([(40, 50), (33, 21)]):
        save_image(tmp_path / "in" / f"im{i}.png", random_image(h, w, seed=i))
    return tmp_path / "in"


def test_run_matches_the_normalised_teacher(tiny_teacher: Path) -> None:
    from imas_core.runners import open_backend
    from imas_train.teacher_artifact import load_teacher

    batch = np.random.default_rng(0).integers(0, 256, size=(2, 3, 24, 40)).astype(np.float32)
    with open_backend(tiny_teacher, device="cpu") as backend:
        assert backend.name == "torch" and backend.window is None and backend.info.default_window == (65, 65)
        assert backend.info.default_stride == (43, 43) and backend.num_classes == 3
        out = backend.run(batch)
    model, meta = load_teacher(tiny_teacher)
    x = (torch.from_numpy(batch) / 255.0 - torch.tensor(meta.mean).view(1, 3, 1, 1)) / torch.tensor(meta.std).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        ref = model(x).numpy()
    assert out.shape == (2, 3, 24, 40) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_torch_stitcher_equals_numpy_stitcher() -> None:
    from imas_core.runners.torch_backend import TorchStitcher

    scores = np.random.default_rng(1).normal(size=(4, 4, 8, 10)).astype(np.float32)
    windows = [Window(0, 8, 0, 10), Window(3, 11, 4, 14), Window(0, 8, 4, 14), Window(3, 11, 0, 10)]
    results = []
    for stitcher, data in (
        (NumpyStitcher("logits", 4, softmax=True), scores.copy()),
        (TorchStitcher(torch, "cpu", 4, softmax=True), torch.from_numpy(scores.copy())),
    ):
        prepared = stitcher.scores(data)
        canvas = stitcher.new_canvas((12, 15))
        for i, win in enumerate(windows):
            stitcher.add(canvas, prepared, i, win, flipped=i == 1)
        results.append(stitcher.finish(canvas, (11, 14), keep_probs=True))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-6)


def test_cli_torch_backend_both_protocols(tiny_teacher: Path, inputs: Path, tmp_path: Path) -> None:
    for protocol in ("imas", "full_tiles"):
        out = tmp_path / protocol
        rc = main(
            [
                "--model",
                str(tiny_teacher),
                "--input",
                str(inputs),
                "--output",
                str(out),
                "--protocol",
                protocol,
                "--window",
                "32",
                "--stride",
                "21",
                "--save",
                "labels,probs",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--no-progress",
            ]
        )
        assert rc == 0
        for i, (h, w) in enumerate([(40, 50), (33, 21)]):
            probs = np.load(out / "probs" / f"im{i}.npy").astype(np.float32)
            labels = np.asarray(Image.open(out / "labels" / f"im{i}.png"))
            assert probs.shape == (3, h, w) and labels.shape == (h, w)
            np.testing.assert_allclose(probs.sum(0), 1.0, atol=3e-3)
            assert (probs.argmax(0) == labels).mean() > 0.99  # float16 ties aside


def test_torch_and_onnxruntime_agree(tiny_teacher: Path, inputs: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    try:
        from imas_export import OnnxExportOptions, ParityOptions, export_onnx
    except ImportError:
        pytest.skip("imas_export is not available")
    onnx_path = tmp_path / "dyn" / "model.onnx"
    export_onnx(
        OnnxExportOptions(
            teacher=tiny_teacher, output=onnx_path, window=(32, 32), dynamic_hw=True, parity=ParityOptions(num_images=1)
        )
    )
    labels = {}
    for name, model, backend in (("torch", tiny_teacher, "torch"), ("ort", onnx_path, "ort-cpu")):
        rc = main(
            [
                "--model",
                str(model),
                "--input",
                str(inputs),
                "--output",
                str(tmp_path / name),
                "--backend",
                backend,
                "--protocol",
                "imas",
                "--window",
                "32",
                "--stride",
                "21",
                "--no-progress",
            ]
        )
        assert rc == 0
        labels[name] = [np.asarray(Image.open(tmp_path / name / "labels" / f"im{i}.png")) for i in range(2)]
    for a, b in zip(labels["torch"], labels["ort"], strict=True):
        assert (a == b).mean() > 0.999


def test_a_teacher_sidecar_with_another_class_count_is_refused_by_both_numbers(tiny_teacher: Path) -> None:
    import json

    from imas_core.errors import ArtifactError
    from imas_core.runners import open_backend

    sidecar = tiny_teacher.with_suffix(".json")
    meta = json.loads(sidecar.read_text())  # the weights' sha256 is unchanged: only the sidecar lies
    meta["model_config"]["num_classes"] = 5
    meta["class_names"], meta["palette"] = [f"c{i}" for i in range(5)], [[i, i, i] for i in range(5)]
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"teacher\.json: the sidecar says 5 classes, but the classifier in "
                                            r"teacher\.safetensors outputs 3"):  # fmt: skip
        open_backend(tiny_teacher, device="cpu")
