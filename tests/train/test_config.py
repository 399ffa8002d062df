"""Config loader: every shipped YAML loads, unknown keys and bad types are errors, overrides are typed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imas_core.errors import ConfigError
from imas_train.config import TrainConfig, dump_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
BASE = Path(__file__).resolve().parents[2] / "configs" / "cityscapes_os16_186.yaml"


def test_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    for n in (186, 372, 744, 1488):
        assert f"cityscapes_os16_{n}" in names and f"cityscapes_os8_{n}" in names
    for n in (92, 183, 366, 732, 1464):
        assert f"voc_classic_r101_{n}" in names
    for n in (662, 1323, 2646):
        assert f"voc_blended_r50_{n}" in names and f"voc_blended_r101_{n}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_round_trips_exactly(path: Path, tmp_path: Path) -> None:
    """Every shipped config loads, and the resolved config written next to a run loads back to an equal value."""
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    resolved = tmp_path / "config.yaml"
    resolved.write_text(dump_config(cfg))
    again = load_config(resolved)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)


def test_method_sections_are_required_only_by_their_method(tmp_path: Path) -> None:
    raw = yaml.safe_load(BASE.read_text())
    del raw["imas"]
    path = tmp_path / "no_imas.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="method 'imas' needs an imas: section"):
        load_config(path)
    assert load_config(path, ["method=supervised"]).imas is None  # the SupOnly baseline needs no imas section
    assert load_config(BASE, ["method=supervised"]).imas is not None  # another method's section is allowed
    with pytest.raises(ConfigError, match="method"):
        load_config(BASE, ["method=u3pl"])


def test_paper_defaults_cityscapes_vs_voc() -> None:
    city = load_config(BASE)
    assert (city.imas.tau, city.optim.lr, city.optim.weight_decay, city.optim.head_lr_mult) == (0.7, 0.01, 5e-4, 1.0)
    assert city.model.aux_head and city.loss.supervised == "ohem" and city.data.crop_size == 769
    assert city.imas.ema_decay == 0.996 and city.imas.unsup_weight == 3.0 and city.imas.forward_unused_weak
    os8 = load_config(BASE.with_name("cityscapes_os8_186.yaml"))
    assert os8.model.output_stride == 8 and os8.data.batch_size == 2
    voc = load_config(BASE.with_name("voc_classic_r101_1464.yaml"))
    assert (voc.imas.tau, voc.optim.lr, voc.optim.weight_decay, voc.optim.head_lr_mult) == (0.95, 0.001, 1e-4, 10.0)
    assert voc.model.depth == 101 and not voc.model.aux_head and voc.loss.supervised == "ce"


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(BASE, ["optim.lr=0.02", "data.value_remap={1: 2}"])
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_config(cfg))
    assert load_config(out) == cfg


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    raw = yaml.safe_load(BASE.read_text())
    raw["imas"]["tua"] = 0.7
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"unknown key 'tua'.*did you mean 'tau'"):
        load_config(bad)


def test_unknown_section(tmp_path: Path) -> None:
    raw = yaml.safe_load(BASE.read_text())
    raw["optimizer"] = {"lr": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load_config(bad)


def test_missing_required_key(tmp_path: Path) -> None:
    raw = yaml.safe_load(BASE.read_text())
    del raw["imas"]["tau"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="missing required key 'tau'"):
        load_config(bad)


def test_overrides_are_typed() -> None:
    cfg = load_config(BASE, ["optim.lr=0.02", "imas.tau=0.8", "model.output_stride=8", "run.compile=true"])
    assert cfg.optim.lr == 0.02 and cfg.imas.tau == 0.8 and cfg.model.output_stride == 8 and cfg.run.compile
    assert isinstance(cfg.optim.lr, float)
    cfg = load_config(BASE, ["optim.lr=1"])  # an int is a valid float
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError, match="output_stride: 12 is not one of 8, 16, 32"):
        load_config(BASE, ["model.output_stride=12"])
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(BASE, ["run.compile=yes please"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(BASE, ["data.batch_size=2.5"])
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_config(BASE, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(BASE, ["optim.lr"])


def test_tuple_and_literal_checks() -> None:
    cfg = load_config(BASE, ["imas.cutmix_side_range=[0.2, 0.5]"])
    assert cfg.imas.cutmix_side_range == (0.2, 0.5)
    with pytest.raises(ConfigError, match="expected 2 values"):
        load_config(BASE, ["imas.cutmix_side_range=[0.2]"])
    with pytest.raises(ConfigError, match="cutmix_side_range must satisfy"):
        load_config(BASE, ["imas.cutmix_side_range=[0.9, 0.2]"])
    with pytest.raises(ConfigError, match="'sgd'"):
        load_config(BASE, ["loss.supervised=sgd"])


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="tau must be in"):
        load_config(BASE, ["imas.tau=1.5"])
    with pytest.raises(ConfigError, match="unlabeled_list is required"):
        load_config(BASE, ["data.unlabeled_list="])
    load_config(BASE, ["data.unlabeled_list=", "method=supervised"])  # supervised needs no unlabeled list
    with pytest.raises(ConfigError, match="class_names has 2 names but model.num_classes is 19"):
        load_config(BASE, ["data.class_names=[a, b]"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
