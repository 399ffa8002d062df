"""Smoke tests of `train()` on a shrunken configs/demo.yaml: every file a run promises is written and valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imas_train.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def demo_cfg(run_dir: Path, *overrides: str) -> TrainConfig:
    """configs/demo.yaml shrunk to seconds: 33-px crops of 40x48 scenes, batch 2+2, L = 2 iterations per epoch.

    The shipped demo warms up on L_x for one epoch; these runs take the iMAS iteration from epoch 0 on.
    """
    base = [
        "data.demo.num_labeled=4", "data.demo.num_unlabeled=4", "data.demo.num_val=3",
        "data.demo.height=40", "data.demo.width=48", "data.crop_size=33", "data.batch_size=2",
        "data.num_workers=0", "optim.epochs=2", "eval.window=48", "run.log_every=1",
        "imas.sup_only_epochs=0", f"run.output_dir={run_dir}",
    ]  # fmt: skip
    return load_config(REPO / "configs" / "demo.yaml", [*base, *overrides])


def test_demo_config_loads() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.method == "imas" and cfg.data.dataset == "demo" and cfg.eval.protocol == "whole"


def test_two_step_train_writes_every_artifact(tmp_path: Path) -> None:
    from imas_train.teacher_artifact import load_teacher
    from imas_train.train import train

    run = tmp_path / "run"
    cfg = demo_cfg(run, "optim.max_iters=2", "run.checkpoint_every=1")
    result = train(cfg)
    assert result.iterations == 2 and result.teacher_path == run / "teacher.safetensors"
    model, meta = load_teacher(run / "teacher.safetensors")  # verifies the sha256
    assert not model.training and meta.model_config["pretrained"] is None
    assert meta.class_names[0] == "background" and meta.eval_protocol == "whole" and meta.window == 48
    assert meta.step == 2 and meta.miou_final == pytest.approx(result.miou_final)
    assert meta.training_summary["method"] == "imas" and meta.training_summary["iterations"] == 2
    load_teacher(run / "best.safetensors")
    assert load_config(run / "config.yaml") == cfg  # the resolved config round-trips
    assert json.loads((run / "run.json").read_text())["world_size"] == 1
    rows = (run / "easiness" / "epoch_000.csv").read_text().splitlines()
    assert rows[0] == "index,easiness" and len(rows) == 1 + 2 * 2  # L x B images, one row each
    assert all(0.0 <= float(r.split(",")[1]) <= 1.0 for r in rows[1:])
    for png in ("easiness.png", "miou.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "state" / "latest").read_text().strip() == "step-00000002"


def test_supervised_method_exports_the_student(tmp_path: Path) -> None:
    from imas_train.teacher_artifact import load_teacher
    from imas_train.train import train

    run = tmp_path / "sup"
    cfg = demo_cfg(run, "method=supervised", "optim.max_iters=2", "run.tensorboard=false")
    result = train(cfg)
    assert result.iterations == 2  # L = N_l / B = 2: the epoch is one pass over the labeled set
    _, meta = load_teacher(run / "teacher.safetensors")
    assert meta.training_summary["artifact_model"] == "student"
    assert not (run / "easiness").exists() and (run / "miou.png").is_file()


def test_supervised_warmup_epoch_then_imas(tmp_path: Path) -> None:
    """The shipped demo's `imas.sup_only_epochs: 1`: epoch 0 trains on L_x only, epoch 1 is iMAS."""
    from imas_train.train import train

    run = tmp_path / "warm"
    result = train(demo_cfg(run, "imas.sup_only_epochs=1", "run.tensorboard=false"))
    assert result.iterations == 4
    assert not (run / "easiness" / "epoch_000.csv").exists()  # no unlabeled stream, no easiness in the warm-up
    rows = (run / "easiness" / "epoch_001.csv").read_text().splitlines()
    assert rows[0] == "index,easiness" and len(rows) == 1 + 2 * 2
    assert (run / "easiness.png").is_file() and (run / "miou.png").is_file()
