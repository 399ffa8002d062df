"""Numbers in configs: YAML 1.2 exponents without a dot are floats (``lr: 1e-3``), and out-of-range values are
refused by name when the config is loaded, not deep inside training."""

from __future__ import annotations

from pathlib import Path

import pytest

from imas_core.errors import ConfigError
from imas_train.cli import main
from imas_train.config import dump_config, load_config
from tests.train.test_train import REPO

DEMO = REPO / "configs" / "demo.yaml"


def test_exponent_floats_in_yaml_and_overrides(tmp_path: Path) -> None:
    text = DEMO.read_text()
    assert "  lr: 0.01\n" in text and "  weight_decay: 0.0001\n" in text
    edited = tmp_path / "demo.yaml"
    edited.write_text(
        text.replace("  lr: 0.01\n", "  lr: 1e-3\n").replace("weight_decay: 0.0001", "weight_decay: 1E-4")
    )
    cfg = load_config(edited)
    assert cfg.optim.lr == 0.001 and type(cfg.optim.lr) is float and cfg.optim.weight_decay == 0.0001
    assert load_config(tmp_path / "demo.yaml", ["optim.lr=2e-2", "imas.tau=9.5e-1"]).optim.lr == 0.02
    assert load_config(DEMO, ["data.scale_range=[5e-1, 1.5e+0]"]).data.scale_range == (0.5, 1.5)
    (tmp_path / "resolved.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "resolved.yaml") == cfg  # written back as a plain float
    with pytest.raises(ConfigError, match="optim: epochs: expected an integer, got '1e1'"):
        load_config(DEMO, ["optim.epochs=1e1"])  # integers never come from strings
    with pytest.raises(ConfigError, match="optim: lr: expected a number, got '1_0e-3'"):
        load_config(DEMO, ["optim.lr=1_0e-3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-0.01", "optim.lr must be a finite number > 0, got -0.01"),
        ("optim.lr=0", "optim.lr must be a finite number > 0, got 0.0"),
        ("optim.lr=.nan", "optim.lr must be a finite number > 0, got nan"),
        ("optim.lr=.inf", "optim.lr must be a finite number > 0, got inf"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay must be a finite number >= 0, got -0.0001"),
        ("optim.momentum=1.0", "optim.momentum must be in [0, 1), got 1.0"),
        ("optim.head_lr_mult=0", "optim.head_lr_mult must be a finite number > 0"),
        ("optim.epochs=0", "optim.epochs must be >= 1, got 0"),
        ("optim.max_iters=0", "optim.max_iters must be null or >= 1, got 0"),
        ("imas.ema_decay=1.5", "imas.ema_decay must be in [0, 1], got 1.5"),
        ("imas.unsup_weight=-3", "imas.unsup_weight must be a finite number >= 0"),
        ("loss.ohem_thresh=0", "loss.ohem_thresh must be in (0, 1]"),
        ("data.scale_range=[1.5, 0.5]", "data.scale_range must be 0 < lo <= hi"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("run.checkpoint_every=0", "run.checkpoint_every must be >= 1"),
        ("run.keep_checkpoints=0", "run.keep_checkpoints must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused_by_name(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [override])
    assert message in str(info.value)


def test_a_negative_lr_ends_in_one_line_with_exit_code_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["--config", str(DEMO), "--set", "optim.lr=-1e-3"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "imas-train: error: --set optim.lr=-1e-3: optim.lr must be a finite number > 0, got -0.001"
