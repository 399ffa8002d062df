from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imas_core.classes import cityscapes_label_to_train_table
from imas_core.errors import DataError
from imas_train.data import build_datasets
from imas_train.data.labels import folder_rule, read_label, read_label_raw
from imas_train.data.lists import ListEntry
from imas_train.data.sources import FileSource, Resolver, pair_folder
from tests.train.data_fixtures import (
    CITY_NAMES,
    VOC_IDS,
    city_image_rel,
    data_config,
    make_cityscapes,
    make_voc,
    palette_png,
    rgb,
    save,
    write_list,
)

TABLE = np.array(cityscapes_label_to_train_table(), np.uint8)


def _entry(*tokens: str) -> ListEntry:
    return ListEntry(tuple(tokens), Path("list.txt"), 7)


def test_cityscapes_label_table() -> None:
    label_ids = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
    assert [TABLE[i] for i in label_ids] == list(range(19))
    assert all(TABLE[i] == 255 for i in set(range(256)) - set(label_ids))


def test_cityscapes_train_ids_derived_from_image_path(tmp_path: Path) -> None:
    raws = make_cityscapes(tmp_path)
    resolver = Resolver(data_config("cityscapes", tmp_path), 19)
    sample = resolver(_entry(city_image_rel(CITY_NAMES[0])), with_label=True)
    assert sample.label == tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    assert sample.name == "aachen_000000_000019_leftImg8bit"
    image, label = FileSource([sample]).load(0, with_label=True)
    assert image.shape == (32, 64, 3) and label is not None
    np.testing.assert_array_equal(label, raws[0])


def test_cityscapes_label_ids_converted_on_the_fly(tmp_path: Path) -> None:
    raws = make_cityscapes(tmp_path, label_ids=True)
    resolver = Resolver(data_config("cityscapes", tmp_path), 19)
    sample = resolver(_entry(city_image_rel(CITY_NAMES[1])), with_label=True)
    assert sample.label is not None and sample.label.name.endswith("_gtFine_labelIds.png")
    _, label = FileSource([sample]).load(0, with_label=True)
    np.testing.assert_array_equal(label, TABLE[raws[1]])
    assert set(np.unique(label)) <= {0, 1, 13, 18, 255}  # 7, 8, 26, 33 -> trainIds; 0, 1, 255 -> ignore


def test_cityscapes_explicit_second_token_overrides(tmp_path: Path) -> None:
    raws = make_cityscapes(tmp_path, label_ids=True)
    resolver = Resolver(data_config("cityscapes", tmp_path), 19)
    city, name = "aachen", CITY_NAMES[0]
    ids = resolver(_entry(city_image_rel(name), f"gtFine/train/{city}/{name}_gtFine_labelIds.png"), with_label=True)
    np.testing.assert_array_equal(FileSource([ids]).load(0, with_label=True)[1], TABLE[raws[0]])
    # the same file named as trainIds is decoded as raw indices, and 26/33 are not valid trainIds
    custom = tmp_path / "my_labels" / "x.png"
    save(custom, raws[0])
    as_train = resolver(_entry(city_image_rel(name), "my_labels/x.png"), with_label=True)
    with pytest.raises(DataError, match=r"x\.png: label value\(s\) \[26, 33\]"):
        FileSource([as_train]).load(0, with_label=True)


def test_cityscapes_underivable_path_names_list_line(tmp_path: Path) -> None:
    resolver = Resolver(data_config("cityscapes", tmp_path), 19)
    with pytest.raises(DataError, match=r"list\.txt:7: cannot derive the Cityscapes label"):
        resolver(_entry("images/foo.png"), with_label=True)
    assert resolver(_entry("images/foo.png"), with_label=False).label is None


def test_voc_palette_png_read_as_raw_indices(tmp_path: Path) -> None:
    raws = make_voc(tmp_path)
    path = tmp_path / "SegmentationClassAug" / f"{VOC_IDS[0]}.png"
    with Image.open(path) as img:
        assert img.mode == "P"
        luminance = np.array(img.convert("L"))
    np.testing.assert_array_equal(read_label_raw(path), raws[0])
    assert not np.array_equal(luminance, raws[0])  # what convert("L") would have produced: corrupted labels
    resolver = Resolver(data_config("voc", tmp_path), 21)
    for tokens in [(VOC_IDS[0],), (f"JPEGImages/{VOC_IDS[0]}.jpg",)]:
        sample = resolver(_entry(*tokens), with_label=True)
        assert sample.image == tmp_path / "JPEGImages" / f"{VOC_IDS[0]}.jpg"
        np.testing.assert_array_equal(FileSource([sample]).load(0, with_label=True)[1], raws[0])


def test_voc_fallback_to_segmentation_class_and_value_check(tmp_path: Path) -> None:
    make_voc(tmp_path, aug=False)
    resolver = Resolver(data_config("voc", tmp_path), 21)
    sample = resolver(_entry(VOC_IDS[1]), with_label=True)
    assert sample.label == tmp_path / "SegmentationClass" / f"{VOC_IDS[1]}.png"
    palette_png(sample.label, np.full((30, 40), 21, np.uint8))
    with pytest.raises(DataError, match=r"\[21\].*0\.\.20 or 255"):
        FileSource([sample]).load(0, with_label=True)


def test_rgb_and_16bit_labels_refused(tmp_path: Path) -> None:
    rgb_label = save(tmp_path / "rgb.png", rgb(8, 8, 0))
    with pytest.raises(DataError, match="colour image"):
        read_label_raw(rgb_label)
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((8, 8), 300, np.uint16)).save(wide)
    with pytest.raises(DataError, match="8-bit"):
        read_label_raw(wide)


def test_folder_ignore_values_and_remap(tmp_path: Path) -> None:
    rule = folder_rule(3, ignore_values=(99,), value_remap={0: 0, 128: 1, 200: 2})
    path = save(tmp_path / "m.png", np.array([[0, 128, 200, 99, 255]], np.uint8))
    np.testing.assert_array_equal(read_label(path, rule), [[0, 1, 2, 255, 255]])
    save(path, np.array([[0, 128, 7]], np.uint8))
    with pytest.raises(DataError, match=r"m\.png: label value\(s\) \[7\]"):
        read_label(path, rule)
    plain = folder_rule(3, ignore_values=(254,))
    np.testing.assert_array_equal(plain.apply(np.array([[0, 2, 254, 255]], np.uint8), "x"), [[0, 2, 255, 255]])


def test_folder_resolution_by_stem_path_and_pairs(tmp_path: Path) -> None:
    for name in ("a", "b"):
        save(tmp_path / "imgs" / "sub" / f"{name}.jpg", rgb(10, 12, 0))
        save(tmp_path / "lbls" / "sub" / f"{name}_mask.png", np.ones((10, 12), np.uint8))
    save(tmp_path / "imgs" / "c.png", rgb(10, 12, 1))  # no mask: not paired
    cfg = data_config("folder", tmp_path, image_dir="imgs", mask_dir="lbls", mask_suffix="_mask.png",
                      class_names=("bg", "fg"))  # fmt: skip
    resolver = Resolver(cfg, 2)
    sample = resolver(_entry("imgs/sub/a.jpg"), with_label=True)
    assert sample.label == tmp_path / "lbls" / "sub" / "a_mask.png"
    assert resolver(_entry("c"), with_label=False).image == tmp_path / "imgs" / "c.png"
    assert pair_folder(tmp_path, "imgs", "lbls", "_mask.png") == [
        "imgs/sub/a.jpg lbls/sub/a_mask.png",
        "imgs/sub/b.jpg lbls/sub/b_mask.png",
    ]


def test_build_datasets_cityscapes_and_unlabeled_never_reads_labels(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, label_ids=True)
    lists = tmp_path / "splits"
    cfg = data_config(
        "cityscapes",
        tmp_path,
        labeled_list=write_list(lists / "l.txt", [city_image_rel(CITY_NAMES[0])]),
        unlabeled_list=write_list(lists / "u.txt", [city_image_rel(n) for n in CITY_NAMES[1:]]),
        val_list=write_list(lists / "v.txt", [city_image_rel(CITY_NAMES[2])]),
    )
    ds = build_datasets(cfg, 19)
    assert len(ds.labeled) == 1 and ds.unlabeled is not None and len(ds.unlabeled) == 2 and len(ds.val) == 1
    assert set(ds.split_sha256) == {"labeled", "unlabeled", "val"} and len(ds.class_names) == 19
    batch = ds.labeled[(0, 123)]
    assert batch["image"].shape == (3, 24, 24) and batch["label"].dtype == torch.int64
    val = ds.val[0]
    assert val["image"].shape == (3, 32, 64) and val["name"] == "bremen_000000_000019_leftImg8bit"
    shutil.rmtree(tmp_path / "gtFine")  # unlabeled GT is never loaded
    assert set(ds.unlabeled[(1, 5)]) == {"image_w", "image_s", "valid", "index"}


def test_build_datasets_errors(tmp_path: Path) -> None:
    make_voc(tmp_path)
    lists = tmp_path / "splits"
    cfg = data_config(
        "voc",
        tmp_path,
        labeled_list=write_list(lists / "l.txt", [VOC_IDS[0], "2099_000001"]),
        val_list=write_list(lists / "v.txt", [VOC_IDS[1]]),
    )
    with pytest.raises(DataError, match="2 file"):  # image and label of the unknown id
        build_datasets(cfg, 21)
    with pytest.raises(DataError, match="21 classes but model.num_classes is 19"):
        build_datasets(cfg, 19)
    empty = data_config("voc", tmp_path, labeled_list=write_list(lists / "e.txt", ["# none"]), val_list=cfg.val_list)
    with pytest.raises(DataError, match="no entries"):
        build_datasets(empty, 21)


def test_build_datasets_demo() -> None:
    ds = build_datasets(data_config("demo", None, crop_size=32), 5)
    assert ds.class_names[0] == "background" and ds.split_sha256 == {} and ds.unlabeled is not None
    assert len(ds.labeled) == 24 and len(ds.unlabeled) == 192 and len(ds.val) == 24
    assert ds.val[0]["image"].shape == (3, 96, 128)
