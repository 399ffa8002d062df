"""`imas-infer` applies the EXIF orientation of its inputs (phone and dash-cam JPEGs), as viewers do: the label map,
colour map and overlay of an image with orientation 6 have the turned shape, and `--no-exif-orientation` reads the
stored pixels. A ground-truth mask drawn on the stored pixels is turned with its image (`imas_core.images`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from imas_infer import InferOptions, infer
from imas_infer.cli import main
from tests.infer.infer_helpers import cli_args, expected_labels, random_image, read_png

pytest.importorskip("onnxruntime")


def _phone_jpeg(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 20x30 JPEG tagged orientation 6 (shown rotated 90 degrees clockwise, 30x20); (stored, shown) pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(random_image(20, 30, seed=3)).save(path, format="JPEG", quality=95, exif=exif)
    with Image.open(path) as img:
        stored = np.asarray(img.convert("RGB"))
        shown = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    return stored, shown


def test_a_jpeg_with_orientation_6_gives_outputs_of_the_turned_shape(tmp_path: Path, onnx_model: Path) -> None:
    stored, shown = _phone_jpeg(tmp_path / "in" / "phone.jpg")
    assert shown.shape == (30, 20, 3)
    assert main(cli_args(onnx_model, tmp_path / "in", tmp_path / "out", "--save", "labels,color,overlay")) == 0
    mode, labels = read_png(tmp_path / "out" / "labels" / "phone.png")
    assert mode == "L" and labels.shape == (30, 20)
    np.testing.assert_array_equal(labels, expected_labels(shown))
    assert read_png(tmp_path / "out" / "color" / "phone.png")[1].shape == (30, 20, 3)
    with Image.open(tmp_path / "out" / "overlay" / "phone.jpg") as overlay:
        assert overlay.size == (20, 30)  # (W, H): what a viewer shows
    off = ("--no-exif-orientation",)
    assert main(cli_args(onnx_model, tmp_path / "in", tmp_path / "raw", *off)) == 0
    np.testing.assert_array_equal(read_png(tmp_path / "raw" / "labels" / "phone.png")[1], expected_labels(stored))


def test_ground_truth_drawn_on_the_stored_pixels_is_turned_with_the_image(tmp_path: Path, onnx_model: Path) -> None:
    stored, _ = _phone_jpeg(tmp_path / "in" / "phone.jpg")
    (tmp_path / "gt").mkdir()
    Image.fromarray(expected_labels(stored)).save(tmp_path / "gt" / "phone.png")  # 20x30, like the stored pixels
    options = InferOptions(model=onnx_model, input=str(tmp_path / "in"), output=tmp_path / "out", gt=tmp_path / "gt")
    result = infer(options)
    assert result.summary.succeeded == 1 and result.evaluation is not None
    assert result.evaluation.miou == pytest.approx(1.0)  # a 1x1 convolution: turned GT == labels of turned image
