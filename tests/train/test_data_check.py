from __future__ import annotations

from pathlib import Path

import numpy as np

from imas_train.config import DataConfig
from imas_train.data import check_data
from imas_train.data.check import KINDS
from tests.train.data_fixtures import VOC_IDS, data_config, make_voc, rgb, save, write_list


def _folder(root: Path) -> None:
    """Ten images with masks; mask values {0, 1, 2, 99 (ignore), 200 (remapped to 2)}."""
    for i in range(10):
        save(root / "images" / f"im{i}.png", rgb(12, 16, i))
        mask = np.random.default_rng(i).choice(np.array([0, 1, 99, 200], np.uint8), size=(12, 16))
        save(root / "masks" / f"im{i}.png", mask)


def _cfg(root: Path, labeled: list[str], unlabeled: list[str], val: list[str]) -> DataConfig:
    return data_config(
        "folder",
        root,
        class_names=("a", "b", "c"),
        ignore_values=(99,),
        value_remap={0: 0, 1: 1, 2: 2, 200: 2},
        labeled_list=write_list(root / "l.txt", labeled),
        unlabeled_list=write_list(root / "u.txt", unlabeled),
        val_list=write_list(root / "v.txt", val),
    )


def test_clean_dataset_passes(tmp_path: Path) -> None:
    _folder(tmp_path)
    cfg = _cfg(tmp_path, ["im0", "images/im1.png masks/im1.png"], ["im2", "im3"], ["im4"])
    report = check_data(cfg, 3, max_workers=2)
    assert report.ok, report.format()
    assert report.counts == {"labeled": 2, "unlabeled": 2, "val": 1, "files": 8}
    assert report.format().startswith("data check passed")


def test_every_kind_of_problem_in_one_report(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "images" / "im1.png").unlink()  # missing image
    (tmp_path / "masks" / "im2.png").unlink()  # missing label
    data = (tmp_path / "images" / "im3.png").read_bytes()
    (tmp_path / "images" / "im3.png").write_bytes(data[: len(data) // 2])  # truncated image
    save(tmp_path / "masks" / "im4.png", np.zeros((10, 16), np.uint8))  # size mismatch
    save(tmp_path / "masks" / "im5.png", np.full((12, 16), 7, np.uint8))  # value outside classes and ignore
    save(tmp_path / "masks" / "im6.png", rgb(12, 16, 0))  # RGB label
    cfg = _cfg(
        tmp_path,
        ["im0", "im1", "im2", "im3", "im4", "im5", "im6", "im0", "a b c"],  # duplicate im0, bad line
        [],  # empty unlabeled list
        ["im7", "im0"],  # im0 also labeled: overlap
    )
    report = check_data(cfg, 3, max_workers=2)
    kinds = {p.kind for p in report.problems}
    assert kinds == {"list", "empty", "duplicate", "overlap", "missing", "unreadable", "label_mode",
                     "size_mismatch", "label_values"}, report.format()  # fmt: skip
    by_kind = {k: [p for p in report.problems if p.kind == k] for k in kinds}
    assert {Path(p.path).name for p in by_kind["missing"]} == {"im1.png", "im2.png"}
    assert by_kind["unreadable"][0].path.endswith("im3.png")
    assert by_kind["size_mismatch"][0].path.endswith("im4.png")
    assert "[7]" in by_kind["label_values"][0].message and by_kind["label_values"][0].path.endswith("im5.png")
    assert "colour image" in by_kind["label_mode"][0].message
    assert by_kind["duplicate"][0].path.endswith("l.txt:8") and "l.txt:1" in by_kind["duplicate"][0].message
    assert by_kind["list"][0].path.endswith("l.txt:9")
    text = report.format()
    assert text.startswith(f"data check found {len(report.problems)} problem(s)")
    assert [line.split(" (")[0] for line in text.splitlines() if not line.startswith(" ")][1:] == [
        k for k in KINDS if k in kinds
    ]


def test_config_and_missing_list_problems(tmp_path: Path) -> None:
    make_voc(tmp_path)
    cfg = data_config(
        "voc",
        tmp_path,
        labeled_list=write_list(tmp_path / "l.txt", [VOC_IDS[0]]),
        unlabeled_list=tmp_path / "nope.txt",
        val_list=write_list(tmp_path / "v.txt", [VOC_IDS[1], VOC_IDS[2]]),
    )
    report = check_data(cfg, 21)
    assert [(p.kind, Path(p.path).name) for p in report.problems] == [("list", "nope.txt")]
    assert report.counts["val"] == 2  # palette VOC labels pass the value check as raw indices
    wrong = check_data(cfg, 19)
    assert [p.kind for p in wrong.problems] == ["config"] and "21 classes" in wrong.problems[0].message


def test_demo_check() -> None:
    report = check_data(data_config("demo", None), 5)
    assert report.ok and report.counts == {"labeled": 24, "unlabeled": 192, "val": 24}


def test_a_missing_pretrained_file_is_a_problem(tmp_path: Path) -> None:
    _folder(tmp_path)
    cfg = _cfg(tmp_path, ["im0"], ["im2"], ["im4"])
    assert check_data(cfg, 3, pretrained=None, max_workers=1).ok
    weights = tmp_path / "pretrained" / "resnet50.pth"
    report = check_data(cfg, 3, pretrained=weights, max_workers=1)
    assert not report.ok and report.problems[0].path == str(weights)
    assert "model.pretrained" in report.format() and "null" in report.format()
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    assert check_data(cfg, 3, pretrained=weights, max_workers=1).ok
