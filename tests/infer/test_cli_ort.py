"""End to end through `cli.main` with tiny ONNX models on ONNX Runtime's CPU provider."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from imas_core.classes import CITYSCAPES_TRAIN_TO_LABEL_ID
from imas_infer.cli import main
from tests.infer.infer_helpers import (
    PALETTE,
    cli_args,
    expected_labels,
    expected_logits,
    make_onnx,
    random_image,
    read_png,
    save_image,
    write_images,
)

pytest.importorskip("onnxruntime")

SIZES = {"city/a_leftImg8bit.png": (37, 50), "city/b.jpg": (16, 24), "small.png": (10, 13), "tall.png": (45, 20)}


@pytest.fixture
def images(tmp_path: Path) -> dict[str, np.ndarray]:
    """PNG and JPEG inputs in a nested tree under `tmp_path/in`; returns the decoded pixels (JPEG is lossy)."""
    return write_images(tmp_path / "in", SIZES)


def test_end_to_end_outputs(tmp_path: Path, onnx_model: Path, images: dict, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    extra = ("--backend", "ort-cpu", "--save", "labels,color,overlay,probs", "--batch", "3", "--threads", "1")
    rc = main(cli_args(onnx_model, tmp_path / "in", out, *extra, "--report", str(tmp_path / "r.json")))
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "model: model.onnx (onnx, CPUExecutionProvider, window 16x24, batch 8, fp32)" in stdout
    assert "inputs: 4 images from" in stdout and f"outputs: {out}" in stdout
    palette = np.array(PALETTE, np.uint8)
    for rel, image in images.items():
        stem = Path(rel).with_suffix("")
        mode, labels = read_png(out / "labels" / f"{stem}.png")
        assert mode == "L" and labels.shape == image.shape[:2]
        np.testing.assert_array_equal(labels, expected_labels(image))
        mode, color = read_png(out / "color" / f"{stem}.png")
        assert mode == "RGB"
        np.testing.assert_array_equal(color, palette[labels])
        assert read_png(out / "overlay" / f"{stem}.jpg")[1].shape == image.shape
        probs = np.load(out / "probs" / f"{stem}.npy")
        logits = expected_logits(image)
        ref = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
        assert probs.dtype == np.float16 and probs.shape == (3, *image.shape[:2])
        np.testing.assert_allclose(probs.astype(np.float32), ref, atol=2e-3)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["succeeded"] == 4 and report["failed"] == 0
    assert set(report["latency_ms"]) == {"p50", "p90", "p99"} and report["images_per_s"] > 0
    assert set(report["stage_total_s"]) >= {"decode", "preprocess", "model", "stitch", "write"}
    assert report["settings"]["mode"] == "full_tiles" and report["options"]["protocol"] == "full_tiles"
    assert not list(out.rglob("*.tmp"))


def test_deprecated_protocol_fast_runs_full_tiles_with_one_warning(
    tmp_path: Path, onnx_model: Path, images: dict, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    rc = main(cli_args(onnx_model, tmp_path / "in", out, "--protocol", "fast", "--report", str(tmp_path / "r.json")))
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "imas-infer: warning: --protocol fast is deprecated, use --protocol full_tiles"
    ]
    assert "windows: full_tiles protocol, window 16x24" in captured.out
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["mode"] == "full_tiles"
    for rel, image in images.items():
        np.testing.assert_array_equal(
            read_png(out / "labels" / Path(rel).with_suffix(".png"))[1], expected_labels(image)
        )


def test_corrupt_files_are_skipped_with_exit_3(tmp_path: Path, onnx_model: Path, images: dict, capsys) -> None:
    good = tmp_path / "in" / "small.png"
    (tmp_path / "in" / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "in" / "text.png").write_text("this is not a PNG\n")
    out = tmp_path / "out"
    assert main(cli_args(onnx_model, tmp_path / "in", out, "--backend", "ort-cpu")) == 3
    err = capsys.readouterr().err
    assert "truncated.png" in err and "text.png" in err
    assert len([line for line in err.splitlines() if "skipped" in line]) == 2
    for rel in images:
        assert (out / "labels" / Path(rel).with_suffix(".png")).is_file()
    assert not (out / "labels" / "truncated.png").exists() and not (out / "labels" / "text.png").exists()


def test_dynamic_model_runs_both_protocols_and_whole_image(tmp_path: Path, images: dict) -> None:
    model = make_onnx(tmp_path / "dyn.onnx", window=None, stride=(8, 8), max_batch=None)
    for extra in (["--protocol", "imas", "--window", "12"], ["--whole-image", "--flip"], ["--window", "12x20"]):
        out = tmp_path / ("out" + "".join(extra))
        assert main(cli_args(model, tmp_path / "in", out, "--backend", "ort-cpu", *extra)) == 0, extra
        for rel, image in images.items():
            labels = read_png(out / "labels" / Path(rel).with_suffix(".png"))[1]
            np.testing.assert_array_equal(labels, expected_labels(image))


@pytest.mark.parametrize("kind", ["labels", "probs"])
def test_uint8_input_and_other_output_kinds(tmp_path: Path, images: dict, kind: str) -> None:
    model = make_onnx(tmp_path / "m.onnx", window=None, output_kind=kind, input_dtype="uint8")
    out = tmp_path / "out"
    assert main(cli_args(model, tmp_path / "in", out, "--whole-image", "--backend", "ort-cpu")) == 0
    for rel, image in images.items():
        np.testing.assert_array_equal(
            read_png(out / "labels" / Path(rel).with_suffix(".png"))[1], expected_labels(image)
        )


def test_cityscapes_ids_and_static_batch(tmp_path: Path) -> None:
    model = make_onnx(tmp_path / "c.onnx", num_classes=19, window=(16, 16), static_batch=4, max_batch=4)
    image = random_image(20, 30, seed=3)
    save_image(tmp_path / "in" / "ulm" / "ulm_000001_000019_leftImg8bit.png", image)
    out = tmp_path / "out"
    assert main(cli_args(model, tmp_path / "in", out, "--save", "cityscapes-ids,labels", "--batch", "3")) == 0
    _, ids = read_png(out / "cityscapes-ids" / "ulm" / "ulm_000001_000019_pred_labelIds.png")
    train_ids = expected_labels(image, 19)
    np.testing.assert_array_equal(ids, np.array(CITYSCAPES_TRAIN_TO_LABEL_ID, np.uint8)[train_ids])
    labels = read_png(out / "labels" / "ulm" / "ulm_000001_000019_leftImg8bit.png")[1]
    np.testing.assert_array_equal(labels, train_ids)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--window", "32"], "static 16x24 window"),
        (["--protocol", "imas"], "variable window sizes"),
        (["--backend", "tensorrt"], "cannot run model.onnx"),
        (["--backend", "torch"], "cannot run model.onnx"),
        (["--save", "cityscapes-ids"], "19 Cityscapes"),
        (["--whole-image"], "does not fit"),
    ],
)
def test_refusals_exit_2(tmp_path: Path, onnx_model: Path, images: dict, capsys, extra: list[str], match: str) -> None:
    assert main(cli_args(onnx_model, tmp_path / "in", tmp_path / "o", *extra)) == 2
    assert match in capsys.readouterr().err


def test_static_batch_and_labels_overlap_refusals(tmp_path: Path, images: dict, capsys) -> None:
    static = make_onnx(tmp_path / "s.onnx", static_batch=2, max_batch=2)
    assert main(cli_args(static, tmp_path / "in", tmp_path / "o", "--batch", "4")) == 2
    assert "exceeds the maximum batch 2" in capsys.readouterr().err
    labels = make_onnx(tmp_path / "l.onnx", output_kind="labels", stride=(16, 24))
    assert main(cli_args(labels, tmp_path / "in", tmp_path / "o")) == 2  # 37x50 needs a window moved back: overlap
    assert "export the model with logits/probs" in capsys.readouterr().err


def test_tampered_model_is_refused(tmp_path: Path, onnx_model: Path, images: dict, capsys) -> None:
    onnx_model.write_bytes(onnx_model.read_bytes() + b"\0")
    assert main(cli_args(onnx_model, tmp_path / "in", tmp_path / "o")) == 2
    assert "sha256" in capsys.readouterr().err


def test_benchmark_on_synthetic_images(tmp_path: Path, onnx_model: Path, capsys) -> None:
    rc = main(
        [
            "--model",
            str(onnx_model),
            "--benchmark",
            "--synthetic",
            "3",
            "20x30",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--report",
            str(tmp_path / "b.json"),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "benchmark: model alone" in capsys.readouterr().out
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["benchmark_model"]["iterations"] == 2 and report["succeeded"] == 3
