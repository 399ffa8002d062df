"""`imas-train` command line: exit codes and messages (main() called in-process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imas_train.cli import main

REPO = Path(__file__).resolve().parents[2]


def _folder_config(tmp_path: Path) -> Path:
    """A folder dataset with one good sample, one mask holding an out-of-range class and one missing image."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, value in (("good", 1), ("bad", 9)):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(root / "masks" / f"{name}.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "labeled.txt").write_text("good\nbad\n")
    (lists / "unlabeled.txt").write_text("missing\n")
    (lists / "val.txt").write_text("good\n")
    cfg = {
        "model": {"num_classes": 3, "aux_head": False},
        "data": {"dataset": "folder", "root": str(root), "class_names": ["a", "b", "c"], "crop_size": 33,
                 "batch_size": 2, "scale_mode": "relative", "labeled_list": str(lists / "labeled.txt"),
                 "unlabeled_list": str(lists / "unlabeled.txt"), "val_list": str(lists / "val.txt")},
        "loss": {"supervised": "ce"},
        "optim": {"lr": 0.01, "weight_decay": 0.0001, "head_lr_mult": 1.0, "epochs": 1},
        "imas": {"tau": 0.9},
        "eval": {"protocol": "whole"},
        "run": {"output_dir": str(tmp_path / "run")},
    }  # fmt: skip
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_check_data_reports_problems_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", "--config", str(_folder_config(tmp_path))]) == 3
    out = capsys.readouterr().out
    assert "problem" in out and "bad.png" in out and "missing" in out


def test_check_data_passes_on_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", "--config", str(REPO / "configs" / "demo.yaml")]) == 0
    assert "data check passed" in capsys.readouterr().out


def test_unknown_key_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--config", str(REPO / "configs" / "demo.yaml"), "--set", "optim.lrr=0.1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("imas-train: error:") and "did you mean 'lr'" in err


def test_missing_config_is_an_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_make_splits_writes_nested_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "all.txt"
    listing.write_text("".join(f"img_{i:02d}\n" for i in range(32)))
    assert (
        main(["make-splits", "--list", str(listing), "--out", str(tmp_path / "splits"), "--fractions", "1/8", "6"]) == 0
    )
    labeled = (tmp_path / "splits" / "1_8" / "labeled.txt").read_text().split()
    assert len(labeled) == 4 and set(labeled) <= set((tmp_path / "splits" / "6" / "labeled.txt").read_text().split())
    assert len((tmp_path / "splits" / "6" / "unlabeled.txt").read_text().split()) == 26
    assert "sha256" in capsys.readouterr().out
    assert main(["make-splits", "--list", str(listing), "--out", str(tmp_path / "x"), "--fractions", "2.5"]) == 2


def test_a_set_typo_is_blamed_on_the_set_not_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    config = REPO / "configs" / "demo.yaml"
    assert main(["--config", str(config), "--set", "optim.epochs=2", "optim.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "--set optim.lrr=0.1: " in err and "did you mean 'lr'" in err and str(config) not in err
    assert main(["--config", str(config), "--set", "optim.lr=-1"]) == 2
    assert "--set optim.lr=-1: " in capsys.readouterr().err
    assert main(["--config", str(config), "--set", "optim.lr=["]) == 2
    assert capsys.readouterr().err.startswith("imas-train: error: --set optim.lr=[: the value is not valid YAML")


def test_a_typo_in_the_file_is_still_blamed_on_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["optim"]["lrr"] = raw["optim"].pop("lr")
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(config), "--set", "optim.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: optim: unknown key 'lrr'" in err and "--set" not in err


def test_make_splits_errors_name_its_own_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-splits", "--list", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--list: file not found" in err and "config" not in err


def test_check_data_names_a_missing_pretrained_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "resnet18.pth"
    config = str(REPO / "configs" / "demo.yaml")
    assert main(["check-data", "--config", config, "--set", f"model.pretrained={weights}"]) == 3
    assert f"{weights}: model.pretrained: backbone weight file not found" in capsys.readouterr().out
