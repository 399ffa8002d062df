"""imas-infer with stitched models: whole images in, the model's output taken as final, per-image size failures."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imas_core.errors import InferError
from imas_core.runners.base import ModelInfo
from imas_infer.cli import main
from imas_infer.options import InferOptions, resolve_settings
from tests.infer.infer_helpers import random_image, save_image

pytest.importorskip("onnxruntime")
SIZE = (100, 150)


def _export(teacher: Path, out: Path, **options: Any) -> Path:
    pytest.importorskip("onnx")
    from imas_export import OnnxExportOptions, ParityOptions, export_onnx

    return export_onnx(
        OnnxExportOptions(teacher=teacher, output=out, parity=ParityOptions(num_images=1), **options)
    ).path


def _run(model: Path, inputs: Path, out: Path, *extra: str) -> int:
    argv = ["--model", str(model), "--input", str(inputs), "--output", str(out), "--no-progress", "--threads", "2"]
    return main([*argv, "--backend", "ort-cpu", *extra])


def _labels(folder: Path, name: str) -> np.ndarray:
    with Image.open(folder / "labels" / name) as img:
        return np.asarray(img)


def test_stitched_model_matches_the_window_model_and_fails_wrong_sizes(
    tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stitched = _export(tiny_teacher, tmp_path / "stitched.onnx", image_size=SIZE)
    window = _export(tiny_teacher, tmp_path / "window.onnx")  # 65x65 window, logits: NumPy stitching
    inputs = tmp_path / "in"
    for i in range(5):
        save_image(inputs / f"im{i}.png", random_image(*SIZE, seed=i))
    save_image(inputs / "odd.png", random_image(80, 150, seed=9))

    assert _run(stitched, inputs, tmp_path / "s", "--batch", "2") == 3  # 5 images in batches of 2, 2, 1
    captured = capsys.readouterr()
    assert "model: stitched.onnx (onnx, CPUExecutionProvider, stitched 100x150, 6 windows in-graph, batch 2 images" in (
        captured.out
    )
    assert "done: 5/6 images" in captured.out and "30 windows in 3 model calls" in captured.out
    assert f"skipped {inputs / 'odd.png'}: 80x150 image" in captured.err and "--image-size 80 150" in captured.err
    assert not (tmp_path / "s" / "labels" / "odd.png").exists()

    assert _run(window, inputs, tmp_path / "w") == 0
    for i in range(5):
        a, b = _labels(tmp_path / "s", f"im{i}.png"), _labels(tmp_path / "w", f"im{i}.png")
        assert a.shape == SIZE and (a == b).mean() >= 0.999


def test_flip_averages_probabilities_of_a_stitched_probs_model(tiny_teacher: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _export(tiny_teacher, tmp_path / "probs.onnx", image_size=(50, 60), output_kind="probs")
    image = random_image(50, 60, seed=3)
    save_image(tmp_path / "in" / "a.png", image)
    assert _run(model, tmp_path / "in", tmp_path / "out", "--flip", "--save", "labels,probs") == 0
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    batch = np.stack([image.transpose(2, 0, 1), image[:, ::-1].transpose(2, 0, 1)]).astype(np.float32)
    plain, mirrored = session.run(None, {"image": batch})[0]
    expected = 0.5 * (plain + mirrored[..., ::-1])
    probs = np.load(tmp_path / "out" / "probs" / "a.npy")
    np.testing.assert_allclose(probs.astype(np.float32), expected, atol=1e-3)  # saved as float16
    np.testing.assert_array_equal(_labels(tmp_path / "out", "a.png"), expected.argmax(0))


def _info(**kw: object) -> ModelInfo:
    base = ModelInfo(
        path=Path("stitched.onnx"), format="onnx", num_classes=3, class_names=("a", "b", "c"), palette=(),
        window=(769, 769), default_window=(769, 769), default_stride=(512, 512), max_batch=2, max_batch_is_hard=False,
        output_kind="labels", input_dtype="uint8", precision="fp16", eval_protocol="imas", stitched=True,
        image_size=(1024, 2048), windows_in_graph=8,
    )  # fmt: skip
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def _opts(**kw: object) -> InferOptions:
    return dataclasses.replace(InferOptions(Path("stitched.onnx"), "in", Path("out")), **kw)  # type: ignore[arg-type]


def test_stitched_settings_and_their_description() -> None:
    s = resolve_settings(_opts(), _info())
    assert (s.mode, s.window, s.stride, s.batch, s.softmax, s.flip) == (
        "stitched",
        (769, 769),
        (512, 512),
        2,
        False,
        False,
    )
    assert s.describe() == (
        "windows: in the model (full_tiles protocol, window 769x769, stride 512x512), batch 2 images, flip off"
    )
    assert resolve_settings(_opts(batch=1, window=(769, 769)), _info()).batch == 1  # the model's own window is fine
    s = resolve_settings(_opts(flip=True, save=("labels", "probs")), _info(output_kind="probs"))
    assert s.flip and s.keep_probs


@pytest.mark.parametrize(
    ("options", "info", "match"),
    [
        ({"protocol": "imas"}, {}, "--protocol imas is not available"),
        ({"flip": True}, {}, "outputs final class ids, so --flip"),
        ({"save": ("probs",)}, {}, "--save probs is impossible"),
        ({"window": (512, 512)}, {}, "its window 769x769 was fixed at export"),
        ({"stride": (256, 256)}, {}, "its stride 512x512 was fixed at export"),
        ({"whole_image": True}, {}, "--whole-image does not apply"),
        ({"batch": 3}, {"max_batch_is_hard": True}, "maximum of 2 images per call"),
    ],
)
def test_stitched_refusals(options: dict, info: dict, match: str) -> None:
    with pytest.raises(InferError, match=match):
        resolve_settings(_opts(**options), _info(**info))
