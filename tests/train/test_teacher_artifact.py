"""Teacher artifact: safetensors + teacher.json round trip, checksum and config checks (docs/style.md §2)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from imas_core.artifacts import TeacherMeta, read_teacher_meta, teacher_sidecar_path, write_teacher_meta
from imas_core.atomic import sha256_file
from imas_core.constants import IMAGENET_MEAN, IMAGENET_STD
from imas_core.errors import ArtifactError
from imas_core.typed import to_dict
from imas_train.config import ModelConfig, model_config_from_dict
from imas_train.models import build_model
from imas_train.teacher_artifact import load_teacher, save_teacher


def _meta(cfg: ModelConfig) -> TeacherMeta:
    return TeacherMeta(
        model_config=to_dict(cfg),
        class_names=["a", "b", "c"],
        palette=[[0, 0, 0], [1, 2, 3], [4, 5, 6]],
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        weights_sha256="",
        epoch=7,
    )


def test_round_trip_gives_bitwise_equal_outputs(tmp_path: Path, tiny_model_cfg: ModelConfig) -> None:
    torch.manual_seed(3)
    model = build_model(tiny_model_cfg)
    model.train()
    with torch.no_grad():  # a few train-mode forwards make the BN running stats non-trivial
        for _ in range(2):
            model(torch.randn(2, 3, 33, 33))
    model.eval()
    weights = tmp_path / "run" / "teacher.safetensors"
    meta = save_teacher(model, weights, _meta(tiny_model_cfg))

    assert meta.weights_sha256 == sha256_file(weights) and meta.epoch == 7
    assert teacher_sidecar_path(weights) == tmp_path / "run" / "teacher.json"
    assert read_teacher_meta(weights) == meta
    assert sorted(p.name for p in weights.parent.iterdir()) == ["teacher.json", "teacher.safetensors"]

    loaded, loaded_meta = load_teacher(weights)
    assert loaded_meta == meta and not loaded.training
    assert model_config_from_dict(loaded_meta.model_config) == tiny_model_cfg  # tuples/lists round-trip
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_fixture_teacher_loads_with_its_metadata(tiny_teacher: Path) -> None:
    model, meta = load_teacher(tiny_teacher)
    assert (meta.window, meta.stride, meta.dataset, meta.class_names) == (65, 43, "demo", ["a", "b", "c"])
    assert model.num_classes == 3 and model.aux is not None
    bn = model.backbone.bn1
    assert bn.running_var is not None and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 65)).shape == (1, 3, 65, 65)


def test_tampered_weights_are_refused(tiny_teacher: Path) -> None:
    data = bytearray(tiny_teacher.read_bytes())
    data[-5] ^= 0xFF
    tiny_teacher.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_teacher(tiny_teacher)


def _edit_sidecar(weights: Path, **model_changes: object) -> None:
    path = teacher_sidecar_path(weights)
    raw = json.loads(path.read_text())
    raw["model_config"].update(model_changes)
    if "num_classes" in model_changes:
        raw["class_names"] = [f"c{i}" for i in range(int(model_changes["num_classes"]))]  # type: ignore[call-overload]
        raw["palette"] = [[i, i, i] for i in range(len(raw["class_names"]))]
    path.write_text(json.dumps(raw))


def test_sidecar_with_other_num_classes_is_refused(tiny_teacher: Path) -> None:
    _edit_sidecar(tiny_teacher, num_classes=4)
    with pytest.raises(ArtifactError) as info:
        load_teacher(tiny_teacher)
    text = str(info.value)
    assert "classifier.2.weight" in text and "(3, 32, 1, 1)" in text and "(4, 32, 1, 1)" in text


def test_class_names_disagreeing_with_num_classes_are_refused(tiny_teacher: Path) -> None:
    path = teacher_sidecar_path(tiny_teacher)
    raw = json.loads(path.read_text())
    raw["model_config"]["num_classes"] = 5
    path.write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="num_classes"):
        load_teacher(tiny_teacher)


def test_invalid_model_config_in_sidecar_is_an_artifact_error(tiny_teacher: Path) -> None:
    _edit_sidecar(tiny_teacher, output_stride=32)  # multi_grid stays true: not buildable
    with pytest.raises(ArtifactError, match="cannot rebuild the model"):
        load_teacher(tiny_teacher)


def test_pretrained_path_in_sidecar_is_ignored(tiny_teacher: Path) -> None:
    _edit_sidecar(tiny_teacher, pretrained="/nowhere/resnet50.pth")
    model, meta = load_teacher(tiny_teacher)
    assert meta.model_config["pretrained"] == "/nowhere/resnet50.pth" and model.num_classes == 3


def test_missing_key_with_valid_checksum_is_named(tiny_teacher: Path) -> None:
    state = load_file(str(tiny_teacher))
    del state["aspp.project.0.weight"]
    save_file(state, str(tiny_teacher))
    meta = read_teacher_meta(tiny_teacher, verify_checksum=False)
    write_teacher_meta(tiny_teacher, dataclasses.replace(meta, weights_sha256=sha256_file(tiny_teacher)))
    with pytest.raises(ArtifactError, match=r"1 missing key\(s\): aspp.project.0.weight"):
        load_teacher(tiny_teacher)


def test_save_refuses_meta_for_another_class_count(tmp_path: Path, tiny_model_cfg: ModelConfig) -> None:
    model = build_model(tiny_model_cfg)
    meta = dataclasses.replace(
        _meta(tiny_model_cfg), model_config=to_dict(dataclasses.replace(tiny_model_cfg, num_classes=4))
    )
    with pytest.raises(ArtifactError, match="classes"):
        save_teacher(model, tmp_path / "teacher.safetensors", meta)
    assert not (tmp_path / "teacher.safetensors").exists()
