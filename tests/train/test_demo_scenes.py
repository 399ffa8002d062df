"""``imas-train demo-scenes``: the demo's scenes and ground truth as PNG files that ``imas-infer --gt`` pairs and
reads, written atomically and deterministically; the defaults are configs/demo.yaml's validation scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imas_core.atomic import stale_temporaries
from imas_infer.evaluate import match_ground_truth, read_label_map
from imas_infer.image_io import discover_inputs
from imas_train import cli
from imas_train.config import load_config
from imas_train.data.demo import render
from tests.train.test_train import REPO, demo_cfg


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_defaults_are_the_demo_config_s_scenes() -> None:
    demo = load_config(REPO / "configs" / "demo.yaml").data.demo
    assert cli._DEMO_SCENES == {"val": demo.num_val, "train": demo.num_labeled}
    assert (cli._DEMO_SEED, cli._DEMO_HEIGHT, cli._DEMO_WIDTH) == (demo.seed, demo.height, demo.width)


def test_scenes_and_labels_are_written_paired_and_read_back_by_the_gt_matcher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "scenes"
    assert cli.main(["demo-scenes", "--output", str(out), "--count", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "demo-scenes: rendering 3 val scenes of 96x128 (seed 0)"
    assert lines[1].startswith(f"images: {out / 'images'} (3 RGB PNGs, demo_val_00000.png ... demo_val_00002.png)")
    assert lines[2].startswith(f"labels: {out / 'labels'} (3 PNGs of class ids 0-4")
    assert lines[-1] == (f"next: imas-infer --model runs/demo/model.onnx --input {out / 'images'} --output "
                         f"runs/demo/pred --gt {out / 'labels'} --save labels,color,overlay")  # fmt: skip
    names = [f"demo_val_{i:05d}.png" for i in range(3)]
    assert sorted(p.name for p in (out / "images").iterdir()) == names
    assert sorted(p.name for p in (out / "labels").iterdir()) == names
    assert not stale_temporaries(out / "images") and not stale_temporaries(out / "labels")

    root, items = discover_inputs(str(out / "images"))
    pairs = match_ground_truth(items, out / "labels", None)
    assert [pairs[i].name for i in range(len(items))] == [item.rel.name for item in items] == names
    for index, name in enumerate(names):  # the pixels the demo model is validated on, and their labels
        image, label = render("val", index, 0, 96, 128)
        with Image.open(out / "images" / name) as img:
            assert img.mode == "RGB" and np.array_equal(np.asarray(img), image)
        assert np.array_equal(read_label_map(out / "labels" / name), label)


def test_the_same_arguments_write_the_same_bytes_and_other_arguments_other_scenes(tmp_path: Path) -> None:
    args = ["demo-scenes", "--count", "2", "--height", "40", "--width", "48"]
    for name in ("a", "b"):
        assert cli.main([*args, "--output", str(tmp_path / name)]) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert cli.main([*args, "--seed", "1", "--output", str(tmp_path / "c")]) == 0
    assert _files(tmp_path / "c").keys() == _files(tmp_path / "a").keys() != {}
    assert _files(tmp_path / "c") != _files(tmp_path / "a")


def test_train_split_writes_the_labeled_scenes_and_bad_sizes_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "train"
    assert cli.main(["demo-scenes", "--output", str(out), "--split", "train"]) == 0
    assert len(list((out / "images").iterdir())) == 16
    image, label = render("labeled", 15, 0, 96, 128)
    with Image.open(out / "images" / "demo_labeled_00015.png") as img:
        assert np.array_equal(np.asarray(img), image)
    assert np.array_equal(read_label_map(out / "labels" / "demo_labeled_00015.png"), label)
    capsys.readouterr()
    assert cli.main(["demo-scenes", "--output", str(tmp_path / "x"), "--count", "0"]) == 2
    assert "--count must be >= 1" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_imas_infer_scores_a_demo_teacher_on_the_scenes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imas_infer.cli import main as infer
    from imas_train.train import train

    run = tmp_path / "run"
    train(demo_cfg(run, "optim.max_iters=1", "run.tensorboard=false"))
    out = run / "scenes"
    assert cli.main(["demo-scenes", "--output", str(out), "--count", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"next: imas-export onnx --teacher {run / 'teacher.safetensors'} --output {run / 'model.onnx'}" in printed
    code = infer(["--model", str(run / "teacher.safetensors"), "--input", str(out / "images"), "--output",
                  str(run / "pred"), "--gt", str(out / "labels"), "--save", "labels"])  # fmt: skip
    assert code == 0
    assert "mIoU: " in capsys.readouterr().out and len(list((run / "pred" / "labels").iterdir())) == 2
