"""`imas-infer` inputs and outputs: 16-bit images are scaled to 8 bits (value >> 8) and said so once, never clipped;
an output folder that cannot be written is refused before the model is even opened."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imas_infer
from imas_infer.cli import main
from imas_infer.image_io import decode_rgb
from tests.infer.infer_helpers import cli_args, expected_labels, random_image, read_png, save_image
from tests.infer.png16 import gradient16, save_grey16, save_rgb16

pytest.importorskip("onnxruntime")


def test_16bit_pngs_are_scaled_by_their_high_byte(tmp_path: Path) -> None:
    grey, rgb = gradient16(9, 11), gradient16(9, 11, channels=3)
    assert Image.open(save_grey16(tmp_path / "g.png", grey)).mode == "I;16"
    image, bits = decode_rgb(tmp_path / "g.png")
    np.testing.assert_array_equal(image, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2))
    assert bits == 16 and image.dtype == np.uint8
    image, bits = decode_rgb(save_rgb16(tmp_path / "c.png", rgb))  # Pillow itself keeps the high byte here
    np.testing.assert_array_equal(image, (rgb >> 8).astype(np.uint8))
    assert bits == 16
    assert decode_rgb(save_image(tmp_path / "8.png", random_image(4, 5, seed=0)))[1] == 8
    Image.fromarray(np.full((2, 3), 70000, np.int32), "I").save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match=r"values outside 0\.\.65535"):
        decode_rgb(tmp_path / "wide.tif")  # a 32-bit range cannot be scaled by one rule: refused, not clipped
    Image.fromarray(np.zeros((2, 3), np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="floating-point image"):
        decode_rgb(tmp_path / "float.tif")


def test_16bit_inputs_are_segmented_as_8bit_and_noted_once(
    tmp_path: Path, onnx_model: Path, capsys: pytest.CaptureFixture
) -> None:
    grey, rgb = gradient16(16, 24), gradient16(16, 24, channels=3)
    save_grey16(tmp_path / "in" / "a_grey16.png", grey)
    save_rgb16(tmp_path / "in" / "b_rgb16.png", rgb)
    rc = main(cli_args(onnx_model, tmp_path / "in", tmp_path / "out", "--backend", "ort-cpu", "--threads", "1"))
    assert rc == 0
    scaled = {
        "a_grey16": np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2),
        "b_rgb16": (rgb >> 8).astype(np.uint8),
    }
    for stem, image in scaled.items():
        np.testing.assert_array_equal(read_png(tmp_path / "out" / "labels" / f"{stem}.png")[1], expected_labels(image))
    notes = [line for line in capsys.readouterr().err.splitlines() if "16-bit" in line]
    first = tmp_path / "in" / "a_grey16.png"
    assert notes == [f"imas-infer: note: 16-bit images are scaled to 8 bits (value >> 8); first one: {first}"]


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening the model fails the test: the output check must come first."""

    def open_backend(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was opened before the output folder was checked")

    monkeypatch.setattr(imas_infer, "open_backend", open_backend)


def _refused(tmp_path: Path, output: Path, capsys: pytest.CaptureFixture) -> str:
    save_image(tmp_path / "in" / "a.png", random_image(16, 24, seed=0))
    assert main(cli_args(tmp_path / "model.onnx", tmp_path / "in", output)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imas-infer: error: ")
    return err


def test_an_output_that_is_a_file_is_refused_before_the_model(
    tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "taken").write_text("not a folder")
    err = _refused(tmp_path, tmp_path / "taken", capsys)
    assert f"--output {tmp_path / 'taken'} is an existing file, not a folder" in err
    err = _refused(tmp_path, tmp_path / "taken" / "out", capsys)  # a folder below a file cannot be created
    assert f"--output {tmp_path / 'taken' / 'out'} is not writable: Not a directory" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0o500 folder: only the file cases apply")
def test_a_read_only_output_folder_is_refused_before_the_model(
    tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        err = _refused(tmp_path, out, capsys)
    finally:
        out.chmod(0o700)
    assert f"--output {out} is not writable: Permission denied" in err
