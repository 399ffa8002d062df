"""The real-photo accuracy benchmark from a clone to a table, on a synthetic stand-in of Clothing Co-Parsing (no
network): benchmarks/accuracy/prepare.py reads real `.mat` files (written here with scipy) and real JPEGs, calls
`imas-train make-splits`, and benchmarks/accuracy/run.py trains supervised-only and iMAS at its tiniest setting."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ACCURACY = ROOT / "benchmarks" / "accuracy"


def _load(name: str) -> ModuleType:
    """benchmarks/accuracy/<name>.py as module `accuracy_<name>` (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"accuracy_{name}", ACCURACY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


prepare = _load("prepare")
run = _load("run")
diagnose = _load("diagnose")

scipy_io = pytest.importorskip("scipy.io")  # the [dev] extra installs scipy: this never skips in CI
pytest.importorskip("torch")

LABELS = [
    "null", "accessories", "bag", "belt", "blazer", "blouse", "bodysuit", "boots", "bra", "bracelet", "cape",
    "cardigan", "clogs", "coat", "dress", "earrings", "flats", "glasses", "gloves", "hair", "hat", "heels", "hoodie",
    "intimate", "jacket", "jeans", "jumper", "leggings", "loafers", "necklace", "panties", "pants", "pumps", "purse",
    "ring", "romper", "sandals", "scarf", "shirt", "shoes", "shorts", "skin", "skirt", "sneakers", "socks",
    "stockings", "suit", "sunglasses", "sweater", "sweatshirt", "swimwear", "t-shirt", "tie", "tights", "top", "vest",
    "wallet", "watch", "wedges",
]  # fmt: skip
RAW = {"null": 0, "skin": 41, "hair": 19, "jacket": 24, "jeans": 25, "dress": 14, "boots": 7, "bag": 2}


def _fake_ccp(root: Path, annotated: int, tag_only: int) -> None:
    """A clone's layout: photos/NNNN.jpg (40x60 portrait), pixel-level and image-level .mat files, label_list.mat."""
    rng = np.random.default_rng(0)
    for d in ("photos", "annotations/pixel-level", "annotations/image-level"):
        (root / d).mkdir(parents=True)
    cells = np.empty((1, len(LABELS)), dtype=object)
    for i, name in enumerate(LABELS):
        cells[0, i] = np.array([name])
    scipy_io.savemat(root / "label_list.mat", {"label_list": cells})
    for n in range(1, annotated + tag_only + 1):
        stem = f"{n:04d}"
        gt = np.zeros((60, 40), np.uint8)  # a figure of stacked bands: hair, skin, jacket, jeans/dress, boots, a bag
        gt[5:12, 14:26], gt[12:20, 12:28] = RAW["hair"], RAW["skin"]
        gt[20:34, 10:30] = RAW["jacket"]
        gt[34:52, 12:28] = RAW["dress"] if n % 2 else RAW["jeans"]
        gt[52:58, 12:28], gt[24:32, 30:36] = RAW["boots"], RAW["bag"]
        palette = np.array([prepare.PALETTE[g] for g in prepare.group_lut(LABELS)[: len(LABELS)]], np.uint8)
        photo = np.clip(palette[gt].astype(int) + rng.integers(-20, 20, gt.shape + (3,)), 0, 255).astype(np.uint8)
        Image.fromarray(photo).save(root / "photos" / f"{stem}.jpg", quality=95)
        if n <= annotated:
            scipy_io.savemat(root / "annotations/pixel-level" / f"{stem}.mat", {"groundtruth": gt})
        else:
            scipy_io.savemat(root / "annotations/image-level" / f"{stem}.mat", {"tags": np.array([[24, 25]])})


def test_grouping_covers_every_label_once() -> None:
    members = [m for group in prepare.GROUPS.values() for m in group]
    assert sorted(members) == sorted(LABELS) and len(prepare.CLASS_NAMES) == len(prepare.PALETTE) == 8
    lut = prepare.group_lut(LABELS)
    assert [lut[RAW[k]] for k in ("null", "skin", "hair", "jacket", "jeans", "dress", "boots", "bag")] == list(range(8))
    with pytest.raises(prepare.PrepareError, match="in no group"):
        prepare.group_lut([*LABELS, "cravat"])


@pytest.mark.slow
def test_prepare_then_run_smoke(tmp_path: Path) -> None:
    src, data = tmp_path / "ccp", tmp_path / "prepared"
    _fake_ccp(src, annotated=16, tag_only=4)
    summary = prepare.prepare(src, data, short_side=32, num_val=4, seed=0, log=lambda *_: None)

    assert summary["counts"] == {"annotated": 16, "tag_only": 4, "val": 4, "train": 12}
    assert summary["splits"]["1_8"] == {"labeled": 2, "unlabeled_annotated": 10, "unlabeled_tag_only": 4}
    assert summary["splits"]["1_4"] == {"labeled": 3, "unlabeled_annotated": 9, "unlabeled_tag_only": 4}
    val = (data / "splits" / "val.txt").read_text().split()
    lab8 = (data / "splits" / "1_8" / "labeled.txt").read_text().split()
    lab4 = (data / "splits" / "1_4" / "labeled.txt").read_text().split()
    unl8 = (data / "splits" / "1_8" / "unlabeled.txt").read_text().split()
    assert not set(val) & set(lab4 + unl8) and set(lab8) <= set(lab4)  # nested, disjoint from val
    assert {"0017", "0018", "0019", "0020"} <= set(unl8) and not set(lab8) & set(unl8)
    with Image.open(data / "images" / "0001.jpg") as im:
        assert im.size == (32, 48)  # short side 32, aspect kept
    assert not (data / "masks" / "0017.png").exists()  # tag-only photos have no mask
    mask = np.asarray(Image.open(data / "masks" / "0001.png"))
    assert mask.shape == (48, 32) and set(np.unique(mask)) == set(range(8)) - {4}  # odd photos wear a dress (5)
    assert set(np.unique(np.asarray(Image.open(data / "masks" / "0002.png")))) == set(range(8)) - {5}

    results, readme = tmp_path / "results.json", tmp_path / "README.md"
    readme.write_text("# t\n\nbefore\n<!-- results:begin -->\nold\n<!-- results:end -->\nafter\n")
    argv = ["--smoke", "--data", str(data), "--runs", str(tmp_path / "runs"), "--results", str(results),
            "--readme", str(readme), "--methods", "supervised", "imas"]  # fmt: skip
    assert run.main(argv) == 0  # the runner itself; each training run is a `python -m imas_train` subprocess
    runs = {r["name"]: r for r in json.loads(results.read_text())["runs"]}
    assert set(runs) == {"supervised", "imas"}
    # equal iterations: two unlabeled epochs of 14 // 2 = 7 iterations for both; supervised's epoch is 2 // 2 = 1
    assert runs["imas"]["iterations"] == runs["supervised"]["iterations"] == 14
    for r in runs.values():
        assert 0 <= r["final"] <= r["best"] <= 100 and r["history"][-1][0] == 14 and len(r["history"]) == 2
    assert len(runs["imas"]["easiness_mean_per_epoch"]) == 1  # epoch 0 is the supervised warm-up: no easiness
    assert runs["imas"]["method_config"]["sup_only_epochs"] == 1 and runs["supervised"]["method_config"] is None
    text = readme.read_text()
    assert text.startswith("# t\n\nbefore\n") and text.endswith("after\n") and "\nold\n" not in text
    assert "| supervised | supervised | 14 |" in text and "| imas | imas | 14 |" in text
    assert (tmp_path / "miou_1_8.png").stat().st_size > 1000

    # pseudo-label diagnosis of the iMAS run: the EMA teacher of both epoch checkpoints and the final artifact, scored
    # on the 10 annotated photos of the unlabeled list (never the 4 tag-only ones)
    rows = diagnose.diagnose(Path(runs["imas"]["run_dir"]), data, "1_8")
    masks = [data / "masks" / f"{stem}.png" for stem in unl8]
    masks_bg = [np.mean(np.asarray(Image.open(m)) == 0) for m in masks if m.is_file()]
    assert [r["step"] for r in rows] == [7, 14, None] and {r["images"] for r in rows} == {10}
    assert rows[1]["conf_ratio"] == rows[2]["conf_ratio"]  # the last checkpoint's teacher is the final teacher
    for r in rows:
        assert 0 <= r["conf_ratio"] <= 1 and 0 <= r["conf_bg"] <= 1 and 0 <= r["pl_miou"] <= 1
        assert abs(r["gt_bg"] - np.mean(masks_bg)) < 1e-9


def test_st_pp_budget_counts_the_iterations_its_stages_train() -> None:
    """ST++ gets the others' budget over its three stages, counted from the lists its stages really train on."""
    from imas_train.config import StPpConfig
    from imas_train.methods.st_pp import retrain_items, supervised_items

    n_lab, n_unl, batch = 100, 1794, 8
    stage_epochs, iterations = run.st_pp_stage_epochs(n_lab, n_unl, batch=batch, total=1120)
    st = StPpConfig()
    reliable = list(range(int(st.reliable_fraction * n_unl)))
    lists = [
        supervised_items(n_lab, st.double_labeled_below),
        retrain_items(n_lab, reliable),
        retrain_items(n_lab, range(n_unl)),
    ]  # stage 1, the reliable re-training, the re-training on all
    per_epoch = [len(items) // batch for items in lists]
    assert stage_epochs == [18, 1, 1]
    assert iterations == sum(e * n for e, n in zip(stage_epochs, per_epoch, strict=True)) == 1123
    assert run.plan("st_pp", n_lab, n_unl, batch=batch, epochs=5)["iterations"] == iterations
