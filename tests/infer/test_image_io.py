"""Input discovery (file, directory, glob, list), decoding, output naming and atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imas_core.errors import InferError
from imas_infer.image_io import blend, discover_inputs, output_path, read_rgb, write_npy, write_png
from tests.infer.infer_helpers import random_image, save_image


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for rel in ["b/z.png", "b/a.jpg", "a.png", "c/d/e.PNG"]:
        save_image(root / rel, random_image(4, 5, seed=len(rel)))
    (root / "notes.txt").write_text("not an image")
    return root


def test_directory_is_recursive_and_sorted(tree: Path) -> None:
    root, items = discover_inputs(str(tree))
    assert root == tree
    assert [i.rel.as_posix() for i in items] == ["a.png", "b/a.jpg", "b/z.png", "c/d/e.PNG"]


def test_glob_list_and_single_file(tree: Path, tmp_path: Path) -> None:
    root, items = discover_inputs(str(tree / "b" / "*"))
    assert [i.rel.as_posix() for i in items] == ["a.jpg", "z.png"] and root == tree / "b"
    _, items = discover_inputs(str(tree / "**" / "*.png"))
    assert [i.rel.as_posix() for i in items] == ["a.png", "b/z.png"]  # glob is case-sensitive; order sorted
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nimgs/c/d/e.PNG\n\nimgs/a.png\n")
    root, items = discover_inputs(str(listing))
    assert [i.rel.as_posix() for i in items] == ["c/d/e.PNG", "a.png"]  # a list keeps its own order
    assert root == tree.resolve()
    _, items = discover_inputs(str(tree / "a.png"))
    assert [i.rel.as_posix() for i in items] == ["a.png"]


def test_discovery_errors(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(InferError, match="no such file"):
        discover_inputs(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InferError, match="no images found"):
        discover_inputs(str(tmp_path / "empty"))
    save_image(tree / "a.jpg", random_image(2, 2, seed=0))  # a.png and a.jpg would both write a.png
    with pytest.raises(InferError, match="same outputs"):
        discover_inputs(str(tree))
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("nope.png\n")
    with pytest.raises(InferError, match="bad.txt:1"):
        discover_inputs(str(bad_list))


def test_read_rgb_converts_modes(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 1] = 7
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert (read_rgb(tmp_path / "g.png") == grey[..., None]).all()
    assert read_rgb(tmp_path / "a.png").shape == (3, 4, 3)
    (tmp_path / "t.png").write_bytes((tmp_path / "g.png").read_bytes()[:40])
    with pytest.raises(OSError):
        read_rgb(tmp_path / "t.png")


def test_output_names(tmp_path: Path) -> None:
    rel = Path("frankfurt/frankfurt_000000_000294_leftImg8bit.png")
    assert output_path(tmp_path, "labels", rel) == tmp_path / "labels/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    ids = output_path(tmp_path, "cityscapes-ids", rel)
    assert ids == tmp_path / "cityscapes-ids/frankfurt/frankfurt_000000_000294_pred_labelIds.png"
    # cityscapesscripts matches predictions with fnmatch("<city>_<seq>_<frame>*.png")
    import fnmatch

    assert fnmatch.fnmatch(ids.name, "frankfurt_000000_000294*.png")
    assert output_path(tmp_path, "probs", Path("x/y.jpg")) == tmp_path / "probs/x/y.npy"
    assert output_path(tmp_path, "overlay", Path("y.png")).suffix == ".jpg"
    assert output_path(tmp_path, "cityscapes-ids", Path("y.png")).name == "y_pred_labelIds.png"


def test_atomic_writes_leave_no_temporaries(tmp_path: Path) -> None:
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    write_png(tmp_path / "o" / "l.png", labels)
    write_npy(tmp_path / "o" / "p.npy", np.ones((2, 2, 2), np.float16))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["l.png", "p.npy"]
    with Image.open(tmp_path / "o" / "l.png") as img:
        assert img.mode == "L" and (np.asarray(img) == labels).all()
    assert np.load(tmp_path / "o" / "p.npy").dtype == np.float16


def test_blend() -> None:
    img = np.full((1, 2, 3), 100, np.uint8)
    col = np.full((1, 2, 3), 201, np.uint8)
    assert (blend(img, col, 0.5) == 151).all() and (blend(img, col, 0.0) == 100).all()
