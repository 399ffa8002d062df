"""The ST / ST++ pipeline end to end on the shrunk demo: stage folders and sidecars, the standard artifact, and a
resume after a kill during pseudo-labelling or during a re-training that ends on the same artifact, bit for bit."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

import imas_train.pseudo_label
import imas_train.train
from imas_core.errors import TrainingError, TrainingStopped
from imas_train.cli import main
from imas_train.config import TrainConfig
from imas_train.pseudo_label import read_label_png
from imas_train.teacher_artifact import load_teacher
from tests.train.resume_helpers import Killed
from tests.train.test_train import REPO, demo_cfg

# 4 labeled (doubled: 4 iterations/epoch), 6 unlabeled (3 reliable): 3 x 4 + 1 x 3 + 1 x 7 = 22 iterations
SETTINGS = ("method=st_pp", "st_pp.stage_epochs=[3,1,1]", "data.demo.num_unlabeled=6", "run.tensorboard=false",
            "run.easiness_csv=false", "run.keep_checkpoints=2")  # fmt: skip
STAGES = ["stage1_supervised", "reliability", "pseudo_labels_1", "stage2_retrain", "pseudo_labels_2", "stage3_retrain"]


def _cfg(run: Path, *extra: str) -> TrainConfig:
    return demo_cfg(run, *SETTINGS, *extra)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted ST++ run, the reference of the resume tests."""
    run = tmp_path_factory.mktemp("st_pp") / "full"
    result = imas_train.train.train(_cfg(run))
    assert result.iterations == 22 and result.teacher_path == run / "teacher.safetensors"
    return run


def test_pipeline_writes_every_stage_and_the_standard_artifact(full: Path) -> None:
    state = json.loads((full / "st_pp.json").read_text())
    assert state["complete"] and [s["name"] for s in state["stages"]] == STAGES
    assert all(s["complete"] for s in state["stages"])
    for name in STAGES:
        assert json.loads((full / name / "stage.json").read_text())["complete"] is True
    snapshots = sorted(p.name for p in (full / "stage1_supervised" / "snapshots").iterdir())
    assert snapshots == ["epoch_001.safetensors", "epoch_002.safetensors", "epoch_003.safetensors"]  # K = 3 of E = 3
    rel = json.loads((full / "reliability" / "stage.json").read_text())
    assert len(rel["reliable"]) == 3 and sorted(rel["reliable"] + rel["unreliable"]) == list(range(6))
    scores = {i: s for i, _, s in rel["scores"]}
    assert min(scores[i] for i in rel["reliable"]) >= max(scores[i] for i in rel["unreliable"])
    first = json.loads((full / "pseudo_labels_1" / "stage.json").read_text())
    second = json.loads((full / "pseudo_labels_2" / "stage.json").read_text())
    assert [i for i, _ in first["items"]] == rel["reliable"] and [i for i, _ in second["items"]] == rel["unreliable"]
    assert first["settings"]["scales"] == [0.5, 0.75, 1.0, 1.5, 2.0] and first["settings"]["flip"] is True
    for index, name in first["items"]:
        mask = read_label_png(full / "pseudo_labels_1" / name)
        assert mask.shape == (40, 48) and mask.max() < 5  # every pixel labelled, no ignore
        assert name == f"demo_unlabeled_{index:05d}.png"  # the procedural scene's index names its mask
    model, meta = load_teacher(full / "teacher.safetensors")  # what imas-export / imas-infer read
    assert meta.training_summary["method"] == "st_pp" and meta.training_summary["iterations"] == 22
    assert meta.training_summary["st_pp"]["final_stage"] == "stage3_retrain"
    assert (full / "teacher.safetensors").read_bytes() == (full / "stage3_retrain" / "teacher.safetensors").read_bytes()
    assert (full / "best.safetensors").is_file() and (full / "config.yaml").is_file()
    with pytest.raises(TrainingError, match="already holds a run"):  # a new run into it is refused
        imas_train.train.train(_cfg(full))


def test_killed_during_pseudo_labelling_and_during_retraining_resumes_to_the_same_artifact(
    full: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "split"
    cfg = _cfg(run, "run.checkpoint_every=2")  # mid-epoch checkpoints (not an experiment key: same weights as `full`)
    real_png, real_generator = imas_train.pseudo_label.label_png, imas_train.train.step_generator
    calls = {"png": 0, "step": 0}

    def sigterm_on_fifth(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["png"] += 1
        if calls["png"] == 5:  # pseudo_labels_2's second image: a real SIGTERM, handled by the stop machinery
            os.kill(os.getpid(), signal.SIGTERM)
        return real_png(*args, **kwargs)

    # 1. SIGTERM while pseudo-labelling the unreliable half: stops after the image in progress
    with monkeypatch.context() as patch:
        patch.setattr(imas_train.pseudo_label, "label_png", sigterm_on_fifth)
        with pytest.raises(TrainingStopped, match="while pseudo-labelling"):
            imas_train.train.train(cfg)
    written = sorted(p.name for p in (run / "pseudo_labels_2").glob("*.png"))
    assert len(written) == 2 and json.loads((run / "pseudo_labels_2" / "stage.json").read_text())["complete"] is False
    assert not (run / "stage3_retrain").exists()
    stamp = {n: (run / "pseudo_labels_2" / n).stat().st_mtime_ns for n in written}

    # 2. resumed, then killed (an exception standing in for SIGKILL) in the last re-training, at its iteration 3
    labelled: list[int] = []

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        labelled.append(1)
        return real_png(*args, **kwargs)

    def generator(seed: int, rank: int, step: int):  # type: ignore[no-untyped-def]
        calls["step"] += 1
        if calls["step"] == 4:  # the pipeline resumes after stage 2: these are stage 3's iterations
            raise Killed(f"killed before iteration {step}")
        return real_generator(seed, rank, step)

    with monkeypatch.context() as patch:
        patch.setattr(imas_train.pseudo_label, "label_png", counting)
        patch.setattr(imas_train.train, "step_generator", generator)
        with pytest.raises(Killed, match="iteration 3"):
            imas_train.train.train(cfg, resume="auto")
    assert len(labelled) == 1  # only the missing one of the 3 unreliable images was labelled
    assert {n: (run / "pseudo_labels_2" / n).stat().st_mtime_ns for n in written} == stamp
    state = json.loads((run / "st_pp.json").read_text())
    assert state["current"] == "stage3_retrain" and not state["complete"]
    assert (run / "stage3_retrain" / "state" / "latest").read_text().strip() == "step-00000002"

    # 3. resumed to the end: the same pseudo-masks and the same final artifact, bit for bit
    resumed = imas_train.train.train(cfg, resume="auto")
    assert resumed.iterations == 22
    assert json.loads((run / "stage3_retrain" / "run.json").read_text())["resumed_from"].endswith("step-00000002")
    assert (run / "teacher.safetensors").read_bytes() == (full / "teacher.safetensors").read_bytes()
    for folder in ("pseudo_labels_1", "pseudo_labels_2"):
        for png in sorted((full / folder).glob("*.png")):
            assert np.array_equal(read_label_png(run / folder / png.name), read_label_png(png))


def test_st_through_the_cli_labels_every_unlabeled_image(tmp_path: Path) -> None:
    run = tmp_path / "st"
    base = ["data.demo.num_labeled=4", "data.demo.num_unlabeled=6", "data.demo.num_val=3", "data.demo.height=40",
            "data.demo.width=48", "data.crop_size=33", "data.batch_size=2", "data.num_workers=0", "eval.window=48",
            "run.tensorboard=false", "run.easiness_csv=false", f"run.output_dir={run}"]  # fmt: skip
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--set", *base, "method=st_pp", "st_pp.plus=false",
            "st_pp.stage_epochs=[1,1]", "st_pp.tta_scales=[1.0]"]  # fmt: skip
    assert main(argv) == 0
    state = json.loads((run / "st_pp.json").read_text())
    assert [s["name"] for s in state["stages"]] == ["stage1_supervised", "pseudo_labels_1", "stage2_retrain"]
    items = json.loads((run / "pseudo_labels_1" / "stage.json").read_text())["items"]
    assert [i for i, _ in items] == list(range(6))
    assert not (run / "stage1_supervised" / "snapshots").exists()  # ST takes no K checkpoints
    _, meta = load_teacher(run / "teacher.safetensors")
    assert meta.training_summary["iterations"] == 4 + 7  # 4 x 2 / 2 labeled; (4 x 2 + 6) / 2 re-training
