"""``imas-train label-next``: the ranking rules over the easiness record, the models' agreement (the training
easiness function), the ranked CSV, the contact sheet and the split lists, on tiny synthetic run folders."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from imas_core.classes import DEMO_CLASSES
from imas_core.errors import ArtifactError, DataError
from imas_train import cli
from imas_train.augment import normalise_images
from imas_train.config import dump_config, load_config
from imas_train.contact_sheet import sheet_size
from imas_train.data import build_datasets, read_list
from imas_train.data.demo import write_scenes
from imas_train.data.sources import Resolver
from imas_train.imas import easiness
from imas_train.label_next import (
    EasinessHistory,
    load_student,
    model_agreement,
    move_to_labeled,
    rank,
    read_easiness,
    scores,
    summarise,
    write_split_lists,
)
from imas_train.models import build_model
from imas_train.teacher_artifact import load_teacher, save_teacher, teacher_meta
from tests.train.test_train import REPO

H, W = 40, 48
N_UNLABELED = 6
# easiness per image (rows) and epoch 1..5 (columns): 0 stays hard, 1 was hard once (early), 2 turns hard at the end,
# 3 is easy, 4 is hard but improving fast, 5 is easy
RECORD = np.array([
    [0.10, 0.12, 0.11, 0.10, 0.12],
    [0.05, 0.70, 0.72, 0.71, 0.73],
    [0.70, 0.72, 0.71, 0.70, 0.02],
    [0.80, 0.82, 0.81, 0.80, 0.82],
    [0.05, 0.10, 0.20, 0.30, 0.40],
    [0.90, 0.90, 0.90, 0.90, 0.90],
])  # fmt: skip


def _history() -> EasinessHistory:
    return EasinessHistory(np.arange(1, 6), RECORD.copy())


def test_rules_rank_images_that_stayed_hard_first() -> None:
    summary = summarise(_history(), window=5)
    assert summary.seen.tolist() == [5] * N_UNLABELED
    np.testing.assert_allclose(summary.mean, RECORD.mean(1))
    np.testing.assert_allclose(summary.now, RECORD[:, -1])
    np.testing.assert_allclose(summary.trend[4], 0.09, atol=1e-12)  # +0.09 per epoch, least squares
    assert abs(summary.trend[0]) < 0.01 and summary.trend[2] < -0.1
    assert rank(scores(summary, "mean")).tolist()[:3] == [0, 4, 2]  # image 1, hard once, is not among them
    assert rank(scores(summary, "last")).tolist()[:2] == [2, 0]  # one bad epoch decides
    projected = rank(scores(summary, "projected")).tolist()  # the improving image 4 moves behind the stuck one
    assert projected.index(0) < projected.index(4)
    np.testing.assert_allclose(summary.projected[4], 0.21 + 3 * 0.09, atol=1e-12)  # the fitted line at epoch 6
    # the window: over the last 3 epochs image 1 looks easy and image 2 is no longer behind image 0 by much
    assert rank(scores(summarise(_history(), window=3), "mean")).tolist()[0] == 0


def test_unseen_images_rank_last_and_ties_by_index() -> None:
    values = RECORD.copy()
    values[0, 2:] = np.nan  # image 0 unseen in the last three epochs
    values[5, :] = np.nan  # image 5 never seen
    summary = summarise(EasinessHistory(np.arange(1, 6), values), window=3)
    assert summary.seen.tolist() == [0, 3, 3, 3, 3, 0]
    assert np.isnan(summary.mean[0]) and np.isnan(summary.trend[5])
    order = rank(scores(summary, "mean")).tolist()
    assert order[-2:] == [0, 5]
    assert rank(np.array([0.2, 0.1, 0.2, 0.1])).tolist() == [1, 3, 0, 2]


def test_read_easiness_averages_duplicates_and_marks_unseen(tmp_path: Path) -> None:
    folder = tmp_path / "easiness"
    folder.mkdir()
    (folder / "epoch_002.csv").write_text("index,easiness\n0,0.2\n2,0.5\n0,0.4\n")
    (folder / "epoch_001.csv").write_text("index,easiness\n1,0.7\n")
    (folder / "notes.csv").write_text("ignored\n")
    history = read_easiness(folder, num_images=4)
    assert history.epochs.tolist() == [1, 2]
    np.testing.assert_allclose(history.values[0], [np.nan, 0.3])
    np.testing.assert_allclose(history.values[1], [0.7, np.nan])
    assert np.isnan(history.values[3]).all()
    with pytest.raises(DataError, match=r"epoch_002.csv: image index 2 outside the unlabeled list's 0\.\.1"):
        read_easiness(folder, num_images=2)
    with pytest.raises(DataError, match="no easiness/epoch_XXX.csv"):
        read_easiness(tmp_path / "nowhere")
    (folder / "epoch_003.csv").write_text("image,e\n")
    with pytest.raises(DataError, match="epoch_003.csv: expected the header 'index,easiness'"):
        read_easiness(folder)


def test_move_to_labeled_keeps_lines_verbatim_and_refuses_bad_indices() -> None:
    labeled, unlabeled = move_to_labeled(["a x"], ["b", "c y", "d", "e"], [2, 0])
    assert labeled == ["a x", "d", "b"] and unlabeled == ["c y", "e"]
    with pytest.raises(DataError, match="outside the unlabeled list"):
        move_to_labeled([], ["b"], [1])
    with pytest.raises(DataError, match="repeat an index"):
        move_to_labeled([], ["b", "c"], [1, 1])


# ---------------------------------------------------------------------------------------------------------------
# A synthetic run folder: folder dataset of demo scenes, config.yaml, teacher artifact, a checkpoint's student and
# the easiness record RECORD (no training)


def _make_run(tmp_path: Path, dataset: str = "folder") -> Path:
    data, run = tmp_path / "data", tmp_path / "run"
    lists = {}
    for stream, count in (("labeled", 2), ("unlabeled", N_UNLABELED), ("val", 2)):
        names = write_scenes(data, stream, count, seed=0, height=H, width=W)
        one_token = stream == "unlabeled"  # bare image paths: the label path is derived (data.mask_dir)
        lines = [f"images/{n}.png" if one_token else f"images/{n}.png labels/{n}.png" for n in names]
        lists[stream] = data / f"{stream}.txt"
        lists[stream].write_text("# a comment line\n" * one_token + "".join(f"{line}\n" for line in lines))
    for path in (data / "labels").glob("demo_unlabeled_*.png"):  # unlabeled: nobody has drawn these yet
        path.rename(tmp_path / path.name)
    common = ["eval.window=48", f"run.output_dir={run}", "data.num_workers=0"]
    if dataset == "folder":
        overrides = [
            "data.dataset=folder", f"data.root={data}", "data.image_dir=images", "data.mask_dir=labels",
            f"data.class_names=[{', '.join(DEMO_CLASSES)}]", f"data.labeled_list={lists['labeled']}",
            f"data.unlabeled_list={lists['unlabeled']}", f"data.val_list={lists['val']}",
        ]  # fmt: skip
    else:
        overrides = [f"data.demo.num_unlabeled={N_UNLABELED}", f"data.demo.height={H}", f"data.demo.width={W}"]
    cfg = load_config(REPO / "configs" / "demo.yaml", [*overrides, *common])
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    torch.manual_seed(0)
    teacher = build_model(cfg.model)
    ds = build_datasets(cfg.data, cfg.model.num_classes)
    meta = teacher_meta(cfg, class_names=ds.class_names, palette=ds.palette, split_sha256=ds.split_sha256, epoch=5,
                        step=40, miou=0.5, miou_best=0.5, best_epoch=5, training_summary={})  # fmt: skip
    save_teacher(teacher, run / "teacher.safetensors", meta)
    torch.manual_seed(1)
    student = build_model(cfg.model)
    step = run / "state" / "step-00000040"
    step.mkdir(parents=True)
    save_file({f"model.{k}": v.contiguous() for k, v in student.state_dict().items()}, str(step / "model.safetensors"))
    (run / "state" / "latest").write_text("step-00000040")
    (run / "easiness").mkdir()
    for j in range(RECORD.shape[1]):
        rows = "".join(f"{i},{RECORD[i, j]:.6f}\n" for i in (5, 3, 1, 0, 2, 4))  # the loop writes in stream order
        (run / "easiness" / f"epoch_{j + 1:03d}.csv").write_text("index,easiness\n" + rows)
    return run


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_label_next_writes_the_ranked_csv_the_sheet_and_splits_that_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _make_run(tmp_path)
    out, splits = tmp_path / "report", tmp_path / "splits"
    argv = ["label-next", "--run", str(run), "--top", "3", "--output", str(out), "--write-splits", str(splits)]
    assert cli.main([*argv, "--rule", "mean"]) == 0
    printed = capsys.readouterr().out
    assert "ranked by rule 'mean' over epochs 1-5" in printed
    assert "label: 3 of the 3 moved images have no label yet" in printed
    assert f"data.labeled_list={splits / 'labeled.txt'} data.unlabeled_list={splits / 'unlabeled.txt'}" in printed

    rows = _rows(out / "label_next.csv")
    assert list(rows[0]) == [
        "rank", "index", "name", "image", "label_path", "easiness_now", "easiness_mean", "trend", "epochs_seen",
        "score", "easiness_models", "disagreement", "teacher_confident",
        "mix_background", "mix_road", "mix_disc", "mix_box", "mix_triangle",
    ]  # fmt: skip
    assert [int(r["index"]) for r in rows] == [0, 4, 2, 1, 3, 5]  # the mean of RECORD, lowest first
    assert [int(r["rank"]) for r in rows] == list(range(1, 7))
    first = rows[0]
    assert first["name"] == "demo_unlabeled_00000"
    assert first["image"] == str(tmp_path / "data" / "images" / "demo_unlabeled_00000.png")
    assert first["label_path"] == str(tmp_path / "data" / "labels" / "demo_unlabeled_00000.png")
    assert float(first["easiness_mean"]) == pytest.approx(RECORD[0].mean(), abs=1e-4)
    assert float(rows[1]["trend"]) == pytest.approx(0.09, abs=1e-4) and first["epochs_seen"] == "5"
    for row in rows:
        mix = [float(row[f"mix_{c}"]) for c in DEMO_CLASSES]
        assert sum(mix) == pytest.approx(1.0, abs=0.01)
        assert 0.0 <= float(row["disagreement"]) <= 1.0 and 0.0 <= float(row["easiness_models"]) <= 1.0

    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == sheet_size(3, H / W, len(DEMO_CLASSES))
        assert sheet.size[0] > 1000 and sheet.size[1] > 3 * 200  # four 2-inch panels a row at 100 dpi

    # the split files: the chosen entries moved verbatim (comments dropped), read back by the toolkit's readers
    before = [" ".join(e.tokens) for e in read_list(tmp_path / "data" / "unlabeled.txt")]
    labeled = [" ".join(e.tokens) for e in read_list(splits / "labeled.txt")]
    unlabeled = [" ".join(e.tokens) for e in read_list(splits / "unlabeled.txt")]
    assert labeled[2:] == [before[0], before[4], before[2]] and len(labeled) == 5
    assert unlabeled == [before[i] for i in (1, 3, 5)]
    cfg = load_config(run / "config.yaml", [f"data.labeled_list={splits / 'labeled.txt'}",
                                            f"data.unlabeled_list={splits / 'unlabeled.txt'}"])  # fmt: skip
    resolver = Resolver(cfg.data, cfg.model.num_classes)
    assert str(resolver(read_list(splits / "labeled.txt")[2], with_label=True).label) == first["label_path"]
    for name in ("demo_unlabeled_00000", "demo_unlabeled_00004", "demo_unlabeled_00002"):  # the person labels them
        (tmp_path / f"{name}.png").rename(tmp_path / "data" / "labels" / f"{name}.png")
    ds = build_datasets(cfg.data, cfg.model.num_classes)
    assert (len(ds.labeled), len(ds.unlabeled or [])) == (5, 3)
    image, label = ds.labeled.source.load(2, with_label=True)
    assert ds.labeled.source.name(2) == "demo_unlabeled_00000" and label is not None and label.shape == (H, W)


def test_without_a_record_the_models_easiness_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _make_run(tmp_path)
    out = tmp_path / "report"
    assert cli.main(["label-next", "--run", str(run), "--top", "2", "--output", str(out), "--no-history"]) == 0
    assert "ranked by the two models' easiness on the whole images" in capsys.readouterr().out
    rows = _rows(out / "label_next.csv")
    e = [float(r["easiness_models"]) for r in rows]
    assert e == sorted(e) and all(r["trend"] == "" for r in rows)
    assert [r["easiness_now"] for r in rows] == [r["easiness_models"] for r in rows]


def test_a_demo_run_is_ranked_but_has_no_lists_to_rewrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _make_run(tmp_path, dataset="demo")
    out = tmp_path / "report"
    assert cli.main(["label-next", "--run", str(run), "--top", "2", "--output", str(out)]) == 0
    assert "ranked by rule 'last' over epochs 1-5" in capsys.readouterr().out  # the default rule
    rows = _rows(out / "label_next.csv")
    assert [int(r["index"]) for r in rows] == [2, 0, 4, 1, 3, 5]  # RECORD's last epoch, lowest first
    assert rows[0]["image"] == "demo_unlabeled_00002" and rows[0]["label_path"] == ""
    capsys.readouterr()
    argv = ["label-next", "--run", str(run), "--top", "2", "--output", str(out), "--write-splits", str(tmp_path / "s")]
    assert cli.main(argv) == 2
    assert "the run's dataset 'demo' renders its scenes and reads no split lists" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_errors_name_the_missing_piece(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["label-next", "--run", str(tmp_path)]) == 2
    assert "no config.yaml; --run must be a training run's folder" in capsys.readouterr().err
    run = _make_run(tmp_path)
    (run / "teacher.safetensors").unlink()
    assert cli.main(["label-next", "--run", str(run)]) == 2
    assert "no teacher artifact; is the run finished? (or pass --teacher)" in capsys.readouterr().err


def test_model_agreement_is_the_training_easiness_on_whole_images() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml").model
    torch.manual_seed(0)
    teacher = build_model(cfg).eval()
    torch.manual_seed(1)
    student = build_model(cfg).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(5)]
    settings = {"num_classes": 5, "tau": 0.3, "ignore_class0": True, "window": 48, "stride": None,
                "protocol": "whole", "batch": 2, "keep_labels": True}  # fmt: skip
    same = model_agreement(teacher, teacher, iter(images), **settings)  # type: ignore[arg-type]
    assert (same.disagreement == 0).all()
    x = normalise_images(torch.from_numpy(np.stack([i.transpose(2, 0, 1) for i in images])))
    with torch.no_grad():
        logits_t, logits_s = teacher(x), student(x)
    np.testing.assert_allclose(same.easiness, easiness(logits_t, logits_t, 0.3).numpy(), atol=1e-6)
    other = model_agreement(teacher, student, iter(images), **settings)  # type: ignore[arg-type]
    np.testing.assert_allclose(other.easiness, easiness(logits_s, logits_t, 0.3).numpy(), atol=1e-6)
    assert other.labels_t is not None and other.labels_s is not None
    expected = [float((t != s).mean()) for t, s in zip(other.labels_t, other.labels_s, strict=True)]
    np.testing.assert_allclose(other.disagreement, expected)
    np.testing.assert_allclose(other.class_mix.sum(1), 1.0)
    labels = logits_t.argmax(1).numpy()
    np.testing.assert_array_equal(np.stack(other.labels_t), labels)
    np.testing.assert_allclose(other.class_mix[:, 1], (labels == 1).mean((1, 2)))


def test_split_lists_are_written_atomically(tmp_path: Path) -> None:
    paths = write_split_lists(tmp_path / "s", ["a b", "c d"], [])
    assert [p.read_text() for p in paths] == ["a b\nc d\n", ""]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["labeled.txt", "unlabeled.txt"]


def test_load_student_reads_checkpoints_artifacts_and_refuses_other_shapes(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    teacher, _ = load_teacher(run / "teacher.safetensors")
    from_run = load_student(run, teacher)  # state/latest -> model.safetensors, "model." prefix stripped
    from_step = load_student(run / "state" / "step-00000040", teacher)
    from_artifact = load_student(run / "teacher.safetensors", teacher)  # a teacher-style artifact
    for a, b in ((from_run, from_step), (from_artifact, teacher)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)
    assert any(not torch.equal(v, teacher.state_dict()[k]) for k, v in from_run.state_dict().items())
    with pytest.raises(ArtifactError, match="no model_1.safetensors"):
        load_student(run, teacher, method="cps")
    save_file({"model.other": torch.zeros(3)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ArtifactError, match="odd.safetensors: the weights do not fit the teacher's architecture"):
        load_student(tmp_path / "odd.safetensors", teacher)
