"""Backbone state-dict names and strict loading of local weight files (docs/algorithm.md §4, docs/style.md §4.3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imas_core.errors import WeightsError
from imas_train.models.resnet import ResNet
from imas_train.models.weights import detect_stem, load_backbone_weights, read_state_dict

TINY = {"depth": 50, "layers": (1, 1, 1, 1), "base_width": 16}


def _bn(name: str, channels: int) -> dict[str, tuple[int, ...]]:
    stats = {f"{name}.{k}": (channels,) for k in ("weight", "bias", "running_mean", "running_var")}
    return stats | {f"{name}.num_batches_tracked": ()}


# torchvision resnet50 (fc removed), written out by hand: stem, layer1.0 and layer4.2.
R50_STANDARD_STEM = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
R50_DEEP_STEM = {
    "conv1.0.weight": (64, 3, 3, 3),
    **_bn("conv1.1", 64),
    "conv1.3.weight": (64, 64, 3, 3),
    **_bn("conv1.4", 64),
    "conv1.6.weight": (128, 64, 3, 3),
    **_bn("bn1", 128),
}


def _r50_layer1_0(cin: int) -> dict[str, tuple[int, ...]]:
    return {
        "layer1.0.conv1.weight": (64, cin, 1, 1),
        **_bn("layer1.0.bn1", 64),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        **_bn("layer1.0.bn2", 64),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        **_bn("layer1.0.bn3", 256),
        "layer1.0.downsample.0.weight": (256, cin, 1, 1),
        **_bn("layer1.0.downsample.1", 256),
    }


R50_LAYER4_2 = {
    "layer4.2.conv1.weight": (512, 2048, 1, 1),
    **_bn("layer4.2.bn1", 512),
    "layer4.2.conv2.weight": (512, 512, 3, 3),
    **_bn("layer4.2.bn2", 512),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    **_bn("layer4.2.bn3", 2048),
}
# Keys per stage: 18 per bottleneck (3 convs + 3 BNs x 5) plus 6 for the downsample of block 0.
R50_KEYS_PER_LAYER = {"layer1": 60, "layer2": 78, "layer3": 114, "layer4": 60}
R50_PARAMS_NO_FC = 25_557_032 - (2048 * 1000 + 1000)  # torchvision's published count minus fc
R18_PARAMS_NO_FC = 11_689_512 - (512 * 1000 + 1000)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("stem", "stem_table", "cin"), [("standard", R50_STANDARD_STEM, 64), ("deep", R50_DEEP_STEM, 128)]
)
def test_r50_state_dict_names_and_shapes(stem: str, stem_table: dict, cin: int) -> None:
    shapes = _shapes(ResNet(depth=50, stem=stem))  # type: ignore[arg-type]
    table = stem_table | _r50_layer1_0(cin) | R50_LAYER4_2
    assert {k: shapes.get(k) for k in table} == table
    assert {k for k in shapes if not k.startswith("layer")} == set(stem_table)
    per_layer = {name: sum(k.startswith(name + ".") for k in shapes) for name in R50_KEYS_PER_LAYER}
    assert per_layer == R50_KEYS_PER_LAYER
    assert len(shapes) == len(stem_table) + sum(R50_KEYS_PER_LAYER.values())
    assert not any(k.startswith("fc.") for k in shapes)


def test_standard_r50_and_r18_parameter_counts_match_torchvision() -> None:
    n50 = sum(p.numel() for p in ResNet(depth=50, stem="standard").parameters())
    n18 = sum(p.numel() for p in ResNet(depth=18, stem="standard", multi_grid=False).parameters())
    assert (n50, n18) == (R50_PARAMS_NO_FC, R18_PARAMS_NO_FC)
    r18 = _shapes(ResNet(depth=18, stem="standard", multi_grid=False))
    assert r18["layer1.0.conv2.weight"] == (64, 64, 3, 3) and "layer1.0.downsample.0.weight" not in r18
    assert r18["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)


def _randomised(backbone: ResNet, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in backbone.state_dict().items():
        state[k] = v.clone() if v.dtype == torch.int64 else torch.randn(v.shape, generator=gen)
    return state


def _assert_loaded(backbone: ResNet, state: dict[str, torch.Tensor]) -> None:
    loaded = backbone.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("stem", ["deep", "standard"])
def test_wrapped_torch_file_loads_exactly_and_drops_fc(tmp_path: Path, stem: str) -> None:
    state = _randomised(ResNet(stem=stem, **TINY), seed=1)  # type: ignore[arg-type]
    wrapped = {"module." + k: v for k, v in state.items()} | {"module.fc.weight": torch.zeros(10, 512)}
    path = tmp_path / f"{stem}.pth"
    torch.save({"state_dict": wrapped, "epoch": 3}, path)
    target = ResNet(stem=stem, **TINY)  # type: ignore[arg-type]
    report = load_backbone_weights(target, path)
    _assert_loaded(target, state)
    assert (report.loaded, report.dropped, report.stem) == (len(state), ("fc.weight",), stem)


def test_safetensors_file_without_counters_loads_exactly(tmp_path: Path) -> None:
    state = _randomised(ResNet(**TINY), seed=2)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # like torchvision files
    path = tmp_path / "r50.safetensors"
    save_file(state | {"fc.bias": torch.zeros(10)}, path)
    target = ResNet(**TINY)
    report = load_backbone_weights(target, path)
    _assert_loaded(target, state)
    assert report.loaded == len(state) and report.dropped == ("fc.bias",) and report.stem == "deep"


@pytest.mark.parametrize(
    ("file_stem", "model_stem", "message"),
    [
        ("standard", "deep", "file has a 7x7 conv1.weight (standard stem) but model.stem='deep'"),
        ("deep", "standard", "file has conv1.0.weight (deep stem) but model.stem='standard'"),
    ],
)
def test_wrong_stem_is_named(tmp_path: Path, file_stem: str, model_stem: str, message: str) -> None:
    path = tmp_path / "w.pth"
    torch.save(ResNet(stem=file_stem, **TINY).state_dict(), path)  # type: ignore[arg-type]
    with pytest.raises(WeightsError) as info:
        load_backbone_weights(ResNet(stem=model_stem, **TINY), path)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path: Path) -> None:
    state = ResNet(**TINY).state_dict()
    state["layer2.0.conv2.weight"] = torch.zeros(32, 32, 1, 1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        load_backbone_weights(ResNet(**TINY), path)
    text = str(info.value)
    assert "layer2.0.conv2.weight" in text and "(32, 32, 1, 1)" in text and "(32, 32, 3, 3)" in text


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    state = ResNet(**TINY).state_dict()
    del state["layer3.0.conv1.weight"], state["layer4.0.bn3.running_var"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    target = ResNet(**TINY)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_backbone_weights(target, path)
    text = str(info.value)
    assert "2 missing key(s)" in text and "layer3.0.conv1.weight" in text and "layer4.0.bn3.running_var" in text
    assert "1 unexpected key(s): extra.weight" in text
    _assert_loaded(target, before)  # nothing was partially loaded


def test_missing_file_says_nothing_is_downloaded(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(WeightsError, match="nothing is downloaded") as info:
        load_backbone_weights(ResNet(**TINY), path)
    assert str(path) in str(info.value)


def test_arbitrary_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "cfg": Path("x")}, path)  # needs full unpickling
    with pytest.raises(WeightsError, match="cannot read weights"):
        read_state_dict(path)


@pytest.mark.skipif(not os.environ.get("IMAS_TEST_R50_WEIGHTS"), reason="set IMAS_TEST_R50_WEIGHTS to a local file")
def test_real_r50_file_loads() -> None:
    path = Path(os.environ["IMAS_TEST_R50_WEIGHTS"])
    stem = detect_stem(read_state_dict(path))
    assert stem in ("deep", "standard")
    backbone = ResNet(depth=50, stem=stem)  # type: ignore[arg-type]
    report = load_backbone_weights(backbone, path)
    assert report.loaded >= len([k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")])
    assert set(report.dropped) <= {"fc.weight", "fc.bias"}
