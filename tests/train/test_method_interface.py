"""The method interface: a method defined outside the package trains through the unchanged loop."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from imas_core.errors import ConfigError
from imas_train import methods
from tests.train.example_method import SelfTraining
from tests.train.test_train import demo_cfg


def test_methods_are_chosen_by_name() -> None:
    assert {"supervised", "imas", "u2pl", "cps"} <= set(methods.METHODS)
    for name, cls in methods.METHODS.items():
        assert cls.name == name and "loss" in cls.log_keys


def test_a_new_method_trains_with_no_edit_of_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imas_train.teacher_artifact import load_teacher
    from imas_train.train import train

    loaded: list[dict] = []

    class Recording(SelfTraining):
        def load_state(self, state):  # type: ignore[no-untyped-def]
            loaded.append(dict(state))
            super().load_state(state)

    monkeypatch.setitem(methods.METHODS, "self_training", Recording)
    run = tmp_path / "run"
    cfg = dataclasses.replace(demo_cfg(run, "optim.max_iters=3", "run.checkpoint_every=2"), method="self_training")
    first = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_iters=2))
    assert train(first).iterations == 2
    saved = json.loads((run / "state" / "step-00000002" / "method_state.json").read_text())
    assert saved["confident_pixels"] >= 0
    result = train(cfg, resume="auto")  # continues at iteration 2 with the method's JSON state restored
    assert result.iterations == 3
    assert loaded == [saved]  # the method's JSON state came back from the checkpoint
    _, meta = load_teacher(result.teacher_path)
    assert meta.training_summary["method"] == "self_training"
    assert meta.training_summary["artifact_model"] == "student"


def test_an_unknown_method_is_refused(tmp_path: Path) -> None:
    cfg = dataclasses.replace(demo_cfg(tmp_path / "run"), method="u3pl")
    with pytest.raises(ConfigError, match="unknown method 'u3pl'"):
        methods.build_method(cfg)
