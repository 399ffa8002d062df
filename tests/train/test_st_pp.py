"""ST / ST++ oracles (shared/methods/STPlusPlus.md §7) and the pieces of the pipeline, on tiny CPU inputs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imas_core.constants import IGNORE_INDEX
from imas_core.errors import ConfigError
from imas_train.augment import WeakAugment, resize_shape, to_chw_uint8
from imas_train.colour_pool import colour_strong, cutout
from imas_train.config import load_config
from imas_train.data import LabeledDataset, iters_per_epoch
from imas_train.data.demo import DemoSource
from imas_train.methods.st_pp import (
    LABELED,
    PSEUDO,
    MixedDataset,
    retrain_items,
    snapshot_epochs,
    supervised_items,
)
from imas_train.optim import set_lrs
from imas_train.pseudo_label import (
    label_png,
    multiscale_flip_probs,
    read_label_png,
    reliability_score,
    split_reliable,
)
from imas_train.st_pp import plan_stages
from tests.train.test_train import REPO

# ---------------------------------------------------------------------------------------------- oracle 1: stability


def test_reliability_identical_predictions_score_one_and_disjoint_ones_zero() -> None:
    m = torch.tensor([[0, 1], [2, 2]])
    assert reliability_score([m, m, m], 3) == 1.0
    other = torch.tensor([[1, 2], [0, 0]])  # no pixel in common with m
    assert reliability_score([other, other, m], 3) == 0.0


def test_reliability_class_only_in_an_earlier_map_lowers_and_absent_classes_are_skipped() -> None:
    ref = torch.tensor([[0, 0], [1, 1]])
    extra = torch.tensor([[0, 0], [1, 3]])  # class 3 only in M_1: IoU 0; class 2 absent from both: skipped (NaN)
    # class 0: 2/2; class 1: 1/2; class 3: 0/1 -> mean 0.5 (not 0.375, which counting class 2 as 0 would give)
    assert reliability_score([extra, ref], 5) == pytest.approx(0.5)
    # the mean, not the sum, over the K - 1 earlier checkpoints
    assert reliability_score([extra, ref, ref], 5) == pytest.approx((0.5 + 1.0) / 2)


# -------------------------------------------------------------------------------------------------- oracle 2: split


def test_split_keeps_the_floor_half_by_score_with_ties_in_input_order() -> None:
    ids = [10, 11, 12, 13, 14, 15, 16]
    scores = [0.2, 0.9, 0.5, 0.9, 0.1, 0.5, 0.7]
    reliable, unreliable = split_reliable(ids, scores, 0.5)
    assert reliable == [11, 13, 16] and unreliable == [12, 15, 10, 14]


# ---------------------------------------------------------------------------------- oracles 3 and 4: the id lists


def test_retraining_list_oversamples_the_labeled_ids() -> None:
    items = retrain_items(3, list(range(100, 110)))
    assert len(items) == 3 * 4 + 10 == 22
    assert [items.count((LABELED, i)) for i in range(3)] == [4, 4, 4]
    assert [i for k, i in items if k == PSEUDO] == list(range(100, 110))


def test_supervised_list_is_doubled_below_200_labeled_images() -> None:
    assert len(supervised_items(183, 200)) == 366 and len(supervised_items(200, 200)) == 200


def test_checkpoints_at_a_third_two_thirds_and_the_end() -> None:
    assert snapshot_epochs(80, 3) == [26, 53, 80] and snapshot_epochs(240, 3) == [80, 160, 240]
    with pytest.raises(ConfigError, match="checkpoints=3"):
        snapshot_epochs(2, 3)


# ---------------------------------------------------------------------------------------------------- oracle 5: TTA


def _per_pixel_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(3, 4, 1).eval()


@pytest.mark.parametrize("protocol", ["whole", "imas", "full_tiles"])
def test_tta_sums_ten_probability_maps(protocol: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()
    image = torch.randn(1, 3, 21, 30)
    probs = multiscale_flip_probs(model, image, (0.5, 0.75, 1.0, 1.5, 2.0), num_classes=4, window=16,
                                  protocol=protocol)  # fmt: skip
    assert probs.shape == (1, 4, 21, 30)
    torch.testing.assert_close(probs.sum(1), torch.full((1, 21, 30), 10.0), rtol=0, atol=1e-4)


def test_tta_of_an_equivariant_model_keeps_the_single_pass_argmax() -> None:
    model = _per_pixel_model(1)  # 1x1 convolution: flip-equivariant
    image = torch.randn(1, 3, 12, 17)
    single = model(image).argmax(1)
    flipped = multiscale_flip_probs(model, image, (1.0,), num_classes=4, window=32)
    assert torch.equal(flipped.argmax(1), single)
    flat = torch.randn(1, 3, 1, 1).expand(1, 3, 12, 17).contiguous()  # any scale of a flat image is the same image
    tta = multiscale_flip_probs(model, flat, (0.5, 0.75, 1.0, 1.5, 2.0), num_classes=4, window=32)
    assert torch.equal(tta.argmax(1), model(flat).argmax(1))


def test_label_png_round_trip_keeps_class_ids(tmp_path: Path) -> None:
    label = np.random.default_rng(0).integers(0, 5, (7, 9)).astype(np.uint8)
    path = tmp_path / "m.png"
    path.write_bytes(label_png(label, [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]))
    assert Image.open(path).mode == "P" and np.array_equal(read_label_png(path), label)


# ------------------------------------------------------------------------------- oracles 6 and 7: SDA and Cutout


def _weak() -> WeakAugment:
    return WeakAugment(crop_size=33, scale_mode="relative", scale_range=(0.75, 1.25), base_size=(40, 48),
                       long_side_range=(20, 80))  # fmt: skip


def _mixed(tmp_path: Path, strong_aug: str) -> tuple[MixedDataset, DemoSource, DemoSource, dict[int, Path]]:
    labeled = DemoSource("labeled", 3, seed=0, height=40, width=48)
    unlabeled = DemoSource("unlabeled", 4, seed=0, height=40, width=48)
    masks = {}
    for i in range(4):
        masks[i] = tmp_path / f"u{i}.png"
        pseudo = np.random.default_rng(i).integers(0, 5, (40, 48)).astype(np.uint8)
        masks[i].write_bytes(label_png(pseudo, [(0, 0, 0)] * 5))
    items = retrain_items(3, [0, 1, 2, 3])
    return MixedDataset(items, labeled, _weak(), unlabeled=unlabeled, masks=masks, strong_aug=strong_aug), \
        labeled, unlabeled, masks  # fmt: skip


def test_labeled_items_never_get_sda_and_equal_the_supervised_dataset(tmp_path: Path) -> None:
    mixed, labeled, _, _ = _mixed(tmp_path, "pseudo")
    plain = LabeledDataset(labeled, _weak())
    for position in range(6):  # labeled × 2 comes first
        kind, index = mixed.items[position]
        assert kind == LABELED
        a, b = mixed[(position, 1234 + position)], plain[(index, 1234 + position)]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) and not a["pseudo"]


def test_pseudo_items_get_colour_sda_and_cutout_to_ignore(tmp_path: Path) -> None:
    mixed, _, unlabeled, masks = _mixed(tmp_path, "pseudo")
    cut = 0
    for seed in range(12):
        position = 6 + seed % 4
        index = mixed.items[position][1]
        out = mixed[(position, seed)]
        assert out["pseudo"] and int(out["index"]) == index
        # the same draws, by hand: weak view, colour SDA, Cutout
        rng = np.random.default_rng(seed)
        view = _weak()(unlabeled.load(index, with_label=False)[0], read_label_png(masks[index]), rng)
        coloured = colour_strong(view.image, rng)
        image, box = cutout(coloured, rng)
        assert torch.equal(out["image"], to_chw_uint8(image))
        label = out["label"].numpy()
        assert (label[box] == IGNORE_INDEX).all() and np.array_equal(label[~box], view.label[~box].astype(np.int64))
        assert np.array_equal(image[~box], coloured[~box])  # outside the box the image is the SDA view
        cut += int(box.any())
        if box.any():
            rows, cols = np.where(box)
            area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert box.sum() == area and 1 <= area <= 0.4 * 33 * 33  # a rectangle; sides truncated
    assert 0 < cut < 12  # Cutout p = 0.5
    none, *_ = _mixed(tmp_path, "none")
    out = none[(6, 5)]
    rng = np.random.default_rng(5)
    view = _weak()(unlabeled.load(0, with_label=False)[0], read_label_png(masks[0]), rng)
    assert torch.equal(out["image"], to_chw_uint8(view.image))  # flag off: the weak view only


# ------------------------------------------------------------------------------------- oracles 8 and 9: LR, resize


def test_lr_after_k_iterations_is_poly_with_ten_times_on_the_head() -> None:
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "base_lr": lr, "lr": lr} for lr in (0.001, 0.01)]
    opt = torch.optim.SGD(groups, lr=0.001)
    set_lrs(opt, 0, 6560)
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.01]  # the first step uses the base LR
    set_lrs(opt, 100, 6560)
    expected = 0.001 * (1 - 100 / 6560) ** 0.9
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)
    assert opt.param_groups[1]["lr"] == pytest.approx(10 * expected)


def test_voc_resize_long_side_in_200_800_inclusive_keeping_the_aspect() -> None:
    draw = random.Random(0)
    longs = set()
    for _ in range(20000):
        h, w = resize_shape("long_side", 375, 500, draw, scale_range=(0.5, 2.0), base_size=(1, 1),
                            long_side_range=(200, 800))  # fmt: skip
        longs.add(w)
        assert abs(h - w * 375 / 500) <= 0.5
    assert min(longs) == 200 and max(longs) == 800


# ---------------------------------------------------------------------------------------------- configs and plan


def test_demo_pipeline_totals_the_other_methods_1200_iterations() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml", ["method=st_pp"])
    st, d, b = cfg.st_pp, cfg.data.demo, cfg.data.batch_size
    assert st is not None and st.plus and st.checkpoints == 3 and st.reliable_fraction == 0.5
    stages = [s for s in plan_stages(cfg) if s.kind == "train"]
    reliable = d.num_unlabeled // 2
    lists = [supervised_items(d.num_labeled, st.double_labeled_below), retrain_items(d.num_labeled, range(reliable)),
             retrain_items(d.num_labeled, range(d.num_unlabeled))]  # fmt: skip
    total = sum(s.epochs * iters_per_epoch(len(items), 1, b) for s, items in zip(stages, lists, strict=True))
    assert total == 1200
    assert snapshot_epochs(stages[0].epochs, st.checkpoints) == [10, 20, 30]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*st_pp*.yaml")))
def test_st_pp_configs_load_with_the_published_settings(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert cfg.method == "st_pp" and cfg.st_pp is not None and cfg.st_pp.stage == "pipeline"
    assert cfg.loss.supervised == "ce" and not cfg.model.aux_head and cfg.data.batch_size == 16
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.head_lr_mult == 10 and cfg.model.stem == "standard"
    voc = cfg.data.dataset == "voc"
    assert (cfg.data.crop_size, cfg.optim.epochs, cfg.optim.lr) == ((321, 80, 0.001) if voc else (721, 240, 0.004))
    assert cfg.st_pp.tta_scales == (0.5, 0.75, 1.0, 1.5, 2.0) and cfg.st_pp.tta_flip


def test_stage_epochs_must_match_the_number_of_trainings() -> None:
    with pytest.raises(ConfigError, match="st_pp.stage_epochs must list 2"):
        load_config(REPO / "configs" / "demo.yaml", ["method=st_pp", "st_pp.plus=false"])
    with pytest.raises(ConfigError, match="reliable_fraction"):
        load_config(REPO / "configs" / "demo.yaml", ["method=st_pp", "st_pp.reliable_fraction=1.0"])


# ------------------------------------------------------------------------------------- labelling and run folder


def test_labelling_resumes_only_with_the_same_model_and_settings(tmp_path: Path) -> None:
    from imas_core.errors import TrainingStopped
    from imas_train.pseudo_label import write_pseudo_labels

    source = DemoSource("unlabeled", 3, seed=0, height=24, width=32)
    model = _per_pixel_model(2)
    settings = {"num_classes": 4, "window": 32, "stride": None, "protocol": "whole", "scales": [1.0], "flip": True}
    common = {"palette": [(0, 0, 0)] * 4, "device": torch.device("cpu")}
    folder = tmp_path / "pseudo"
    stops = iter([None, "SIGTERM"])
    with pytest.raises(TrainingStopped, match="SIGTERM while pseudo-labelling"):
        write_pseudo_labels(model, source, [2, 0, 1], folder, settings=settings, model_sha256="a",
                            stop=lambda: next(stops), **common)  # fmt: skip
    first = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert sorted(first) == ["demo_unlabeled_00000.png", "demo_unlabeled_00002.png"]
    done = write_pseudo_labels(model, source, [2, 0, 1], folder, settings=settings, model_sha256="a", **common)
    assert done["complete"] and done["items"] == [[2, "demo_unlabeled_00002.png"], [0, "demo_unlabeled_00000.png"],
                                                  [1, "demo_unlabeled_00001.png"]]  # fmt: skip
    assert {n: (folder / n).stat().st_mtime_ns for n in first} == first  # kept, not relabelled
    counted: list[int] = []
    write_pseudo_labels(model, source, [2, 0, 1], folder, settings={**settings, "scales": [0.5, 1.0]},
                        model_sha256="a", progress=counted.append, **common)  # fmt: skip
    assert counted == [1, 1, 1]  # other settings: every image labelled again (no "already there" batch)


def test_a_new_run_into_a_pipeline_folder_is_refused_or_overwritten(tmp_path: Path) -> None:
    from imas_core.errors import TrainingError
    from imas_train.config import dump_config
    from imas_train.st_pp import _claim

    run = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "demo.yaml", ["method=st_pp", f"run.output_dir={run}"])
    (run / "stage1_supervised" / "state").mkdir(parents=True)
    (run / "st_pp.json").write_text("{}")
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "model.onnx").write_text("the user's")
    stages = plan_stages(cfg)
    with pytest.raises(TrainingError, match=r"already holds a run \(config.yaml, stage1_supervised, st_pp.json\)"):
        _claim(cfg, run, stages, None, False, False)
    other = load_config(REPO / "configs" / "demo.yaml", ["method=st_pp", f"run.output_dir={run}", "run.seed=7"])
    with pytest.raises(TrainingError, match="run.seed: 2 -> 7"):
        _claim(other, run, stages, "auto", False, False)
    _claim(other, run, stages, "auto", False, True)  # --allow-config-change
    _claim(cfg, run, stages, None, True, False)  # --overwrite
    assert sorted(p.name for p in run.iterdir()) == ["model.onnx"]


def test_the_pipeline_refuses_several_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imas_core.errors import TrainingError
    from imas_train.train import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(REPO / "configs" / "demo.yaml", ["method=st_pp", f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(TrainingError, match="runs as one process"):
        train(cfg)
    assert not (tmp_path / "run").exists()
