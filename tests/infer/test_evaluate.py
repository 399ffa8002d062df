"""`--gt`: matching ground truth to inputs and agreeing with `imas_core.scores` on the same predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imas_core.classes import CITYSCAPES_TRAIN_TO_LABEL_ID
from imas_core.errors import InferError
from imas_core.scores import intersection_union, miou
from imas_infer.cli import main
from imas_infer.evaluate import gt_candidates, match_ground_truth, read_label_map
from imas_infer.image_io import InputItem
from tests.infer.infer_helpers import cli_args, make_onnx, random_image, save_image

pytest.importorskip("onnxruntime")


def _labels(h: int, w: int, seed: int, num_classes: int = 3) -> np.ndarray:
    rng = np.random.default_rng(100 + seed)
    gt = rng.integers(0, num_classes, size=(h, w)).astype(np.uint8)
    gt[rng.random((h, w)) < 0.1] = 255
    return gt


def test_candidates_cover_plain_suffix_and_cityscapes_names() -> None:
    assert gt_candidates(Path("a/x.jpg"), None) == [Path("a/x.png"), Path("x.png")]
    assert gt_candidates(Path("x.jpg"), "_gt.png") == [Path("x_gt.png")]
    city = gt_candidates(Path("ulm/ulm_1_2_leftImg8bit.png"), None)
    assert Path("ulm/ulm_1_2_gtFine_labelTrainIds.png") in city and Path("ulm/ulm_1_2_gtFine_labelIds.png") in city
    assert city.index(Path("ulm/ulm_1_2_gtFine_labelTrainIds.png")) < city.index(
        Path("ulm/ulm_1_2_gtFine_labelIds.png")
    )


def test_label_ids_are_mapped_to_train_ids(tmp_path: Path) -> None:
    label_ids = np.array([[7, 8, 0], [33, 26, 255]], np.uint8)
    Image.fromarray(label_ids).save(tmp_path / "x_gtFine_labelIds.png")
    assert read_label_map(tmp_path / "x_gtFine_labelIds.png").tolist() == [[0, 1, 255], [18, 13, 255]]
    assert CITYSCAPES_TRAIN_TO_LABEL_ID[13] == 26


def test_match_errors(tmp_path: Path) -> None:
    items = [InputItem(tmp_path / "x.png", Path("x.png"))]
    with pytest.raises(InferError, match="not a directory"):
        match_ground_truth(items, tmp_path / "nope", None)
    (tmp_path / "gt").mkdir()
    with pytest.raises(InferError, match="no ground truth found"):
        match_ground_truth(items, tmp_path / "gt", None)


def test_gt_miou_agrees_with_scores(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = make_onnx(tmp_path / "m.onnx", window=(16, 16))
    sizes = [(20, 30), (16, 16), (33, 17)]
    (tmp_path / "gt" / "s").mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        save_image(tmp_path / "in" / "s" / f"im{i}.png", random_image(h, w, seed=i))
        Image.fromarray(_labels(h, w, i)).save(tmp_path / "gt" / "s" / f"im{i}.png")
    save_image(tmp_path / "in" / "s" / "nogt.png", random_image(8, 8, seed=9))
    out = tmp_path / "out"
    rc = main(cli_args(model, tmp_path / "in", out, "--gt", str(tmp_path / "gt"), "--report", str(tmp_path / "r.json")))
    assert rc == 0
    stdout = capsys.readouterr().out
    inter_total, union_total = np.zeros(3, np.int64), np.zeros(3, np.int64)
    for i in range(len(sizes)):
        pred = np.asarray(Image.open(out / "labels" / "s" / f"im{i}.png"))
        inter, union = intersection_union(pred, np.asarray(Image.open(tmp_path / "gt" / "s" / f"im{i}.png")), 3)
        inter_total += inter
        union_total += union
    value, per_class = miou(inter_total, union_total)
    report = json.loads((tmp_path / "r.json").read_text())["evaluation"]
    assert report["images"] == 3 and report["missing_gt"] == 1
    assert report["intersection"] == inter_total.tolist() and report["union"] == union_total.tolist()
    assert report["miou"] == pytest.approx(value)
    assert [report["per_class"][n] for n in ("zero", "one", "two")] == pytest.approx(per_class.tolist())
    assert f"mIoU: {100 * value:.2f}% over 3 images; 1 input(s) had no ground truth" in stdout


def test_cityscapes_layout_and_size_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = make_onnx(tmp_path / "m.onnx", window=(16, 16))
    save_image(tmp_path / "left" / "ulm" / "ulm_000000_000001_leftImg8bit.png", random_image(16, 20, seed=1))
    save_image(tmp_path / "left" / "ulm" / "ulm_000000_000002_leftImg8bit.png", random_image(16, 20, seed=2))
    (tmp_path / "gt" / "ulm").mkdir(parents=True)
    Image.fromarray(_labels(16, 20, 1)).save(tmp_path / "gt" / "ulm" / "ulm_000000_000001_gtFine_labelTrainIds.png")
    Image.fromarray(_labels(9, 9, 2)).save(tmp_path / "gt" / "ulm" / "ulm_000000_000002_gtFine_labelTrainIds.png")
    rc = main(cli_args(model, tmp_path / "left", tmp_path / "o", "--gt", str(tmp_path / "gt")))
    captured = capsys.readouterr()
    assert rc == 3  # the image with a mismatched GT counts as failed
    assert "ulm_000000_000002_gtFine_labelTrainIds.png: ground truth is 9x9, prediction 16x20" in captured.err
    assert "over 1 images" in captured.out
