"""What a stopped or finished run leaves for the next one: after a divergence the last healthy checkpoint is kept
and named; a resume with another experiment is refused by key; a killed write's temporaries are removed; a
finished run resumes without a duplicate evaluation; the best model's sidecar records the time trained so far."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import imas_train.methods.imas
import imas_train.train
from imas_core.errors import TrainingError
from imas_train.cli import main
from tests.train.test_resume import SETTINGS
from tests.train.test_train import REPO, demo_cfg


def test_after_a_divergence_the_last_healthy_checkpoint_is_kept_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = demo_cfg(tmp_path / "run", *SETTINGS, "run.keep_checkpoints=1")  # pruning alone would drop step 1
    real = imas_train.methods.imas.imas_step
    calls = []

    def diverging(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # iteration 1: the loss explodes (finite), and so do the weights after the step
            out["loss"] = out["loss"] * 1e30
        if len(calls) == 3:  # iteration 2: non-finite
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(imas_train.methods.imas, "imas_step", diverging)
    state = tmp_path / "run" / "state"
    with pytest.raises(TrainingError) as caught:
        imas_train.train.train(cfg)
    message = str(caught.value)
    assert f"last good checkpoint: {state / 'step-00000001'}; resume from it with --resume" in message
    assert "step-00000002 (diverged: " in message and "exploding" in message
    assert "step-00000001 (healthy: " in message  # every checkpoint present is listed with its state
    assert sorted(p.name for p in state.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    health = json.loads((state / "step-00000002" / "manifest.json").read_text())["health"]
    assert health["loss"] > 1e29 and health["loss_step"] == 2
    monkeypatch.setattr(imas_train.methods.imas, "imas_step", real)
    assert imas_train.train.train(cfg, resume=str(state / "step-00000001")).iterations == 4


def test_resuming_with_another_experiment_is_refused_by_key(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = demo_cfg(run, *SETTINGS, "optim.max_iters=2")
    imas_train.train.train(cfg)
    changed = demo_cfg(run, *SETTINGS, "optim.max_iters=2", "data.batch_size=1", "run.seed=7", "run.log_every=5",
                       "data.num_workers=1")  # fmt: skip
    with pytest.raises(TrainingError, match=r"another experiment \(data\.batch_size: 2 -> 1, run\.seed: 2 -> 7\)"):
        imas_train.train.train(changed, resume="auto")
    method = demo_cfg(run, *SETTINGS, "optim.max_iters=2", "method=supervised")
    with pytest.raises(TrainingError, match=r"method: imas -> supervised"):
        imas_train.train.train(method, resume="auto")
    allowed = demo_cfg(run, *SETTINGS, "optim.max_iters=2", "run.seed=7", "run.log_every=5")
    assert imas_train.train.train(allowed, resume="auto", allow_config_change=True).iterations == 2
    record = json.loads((run / "run.json").read_text())
    assert record["config_changes_on_resume"] == {"run.seed": [2, 7]}  # log_every may change: not a difference


def test_the_cli_flag_allows_a_changed_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    base = ["--config", str(REPO / "configs" / "demo.yaml"), "--set", f"run.output_dir={run}", "optim.max_iters=1",
            "data.demo.num_labeled=4", "data.demo.num_unlabeled=4", "data.demo.num_val=2", "data.demo.height=40",
            "data.demo.width=48", "data.crop_size=33", "data.batch_size=2", "data.num_workers=0", "eval.window=48",
            "imas.sup_only_epochs=0", "run.tensorboard=false"]  # fmt: skip
    assert main(base) == 0
    assert main([*base, "run.seed=5", "--resume", "auto"]) == 2
    assert "run.seed: 2 -> 5" in capsys.readouterr().err
    assert main([*base, "run.seed=5", "--resume", "auto", "--allow-config-change"]) == 0


def test_stale_temporaries_go_a_finished_run_resumes_without_a_duplicate_and_best_has_its_time(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    cfg = demo_cfg(run, *SETTINGS, "optim.max_iters=2")
    imas_train.train.train(cfg)
    best = json.loads((run / "best.json").read_text())["training_summary"]
    assert best["wall_time_s"] > 0.0  # written mid-run: the time trained until then
    history = json.loads((run / "teacher.json").read_text())["training_summary"]["miou_history"]
    assert len(history) == 1
    stale = [run / ".teacher.safetensors.k2j4h6g8.tmp", run / ".best.json.abcd_123.tmp",
             run / "easiness" / ".epoch_000.csv.zz00yy11.tmp"]  # fmt: skip
    kept = [run / ".notes.tmp", run / "notes.tmp"]  # not atomic-write names: someone else's
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left by a kill")
    result = imas_train.train.train(cfg, resume="auto")  # a finished run: nothing left to train
    assert result.iterations == 2
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    summary = json.loads((run / "teacher.json").read_text())["training_summary"]
    assert summary["miou_history"] == history  # no second entry for the same evaluation
    assert summary["wall_time_s"] >= best["wall_time_s"]
