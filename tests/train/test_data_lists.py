from __future__ import annotations

from pathlib import Path

import pytest

from imas_core.atomic import sha256_file
from imas_core.errors import DataError
from imas_train.data.lists import list_sha256, make_splits, parse_list_text, read_list, write_splits

LIST_TEXT = """# a comment line
2007_000032

leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png
img/a.png   lbl/a.png
   img/b.png lbl/b.png  # inline comment
"""


def test_parse_one_and_two_tokens_skipping_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_text(LIST_TEXT)
    entries = read_list(path)
    assert [e.tokens for e in entries] == [
        ("2007_000032",),
        ("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",),
        ("img/a.png", "lbl/a.png"),
        ("img/b.png", "lbl/b.png"),
    ]
    assert [e.line for e in entries] == [2, 4, 5, 6]
    assert entries[2].where == f"{path}:5"


def test_too_many_tokens_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    with pytest.raises(DataError, match=r"bad\.txt:2: expected 1 token"):
        parse_list_text("a.png\na.png b.png c.png\n", path)
    problems: list[tuple[str, str]] = []
    entries = parse_list_text("a.png\na b c\nd e f\ng.png\n", path, problems)
    assert [e.tokens for e in entries] == [("a.png",), ("g.png",)]
    assert [w for w, _ in problems] == [f"{path}:2", f"{path}:3"]


def test_missing_list_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split list not found"):
        read_list(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    ("total", "expected"),
    [(2975, {"1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488}), (10582, {"1_16": 662, "1_8": 1323, "1_4": 2646})],
)
def test_split_sizes_match_published_counts(total: int, expected: dict[str, int]) -> None:
    items = [f"img_{i:05d}" for i in range(total)]
    splits = make_splits(items, fractions=(1 / 16, 1 / 8, 1 / 4, 1 / 2), seed=0)
    for name, count in expected.items():
        labeled, unlabeled = splits[name]
        assert len(labeled) == count
        assert len(unlabeled) == total - count


def test_splits_deterministic_nested_disjoint() -> None:
    items = [f"x{i}" for i in range(100)]
    a = make_splits(items, fractions=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 30), seed=3)
    assert a == make_splits(items, fractions=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 30), seed=3)
    assert a["1_16"][0] != make_splits(items, fractions=(1 / 16,), seed=4)["1_16"][0]
    assert len(a["30"][0]) == 30
    names = ["1_16", "1_8", "1_4", "30", "1_2"]
    for small, large in zip(names, names[1:], strict=False):
        assert set(a[small][0]) <= set(a[large][0])
    for labeled, unlabeled in a.values():
        assert not set(labeled) & set(unlabeled)
        assert sorted(labeled + unlabeled) == sorted(items)
        assert labeled == [x for x in items if x in set(labeled)]  # input order kept


def test_splits_reject_duplicates_and_bad_sizes() -> None:
    with pytest.raises(DataError, match="duplicate"):
        make_splits(["a", "b", "a"])
    with pytest.raises(DataError, match="needs 5"):
        make_splits(["a", "b"], fractions=(5,))


def test_write_splits_atomic_with_hashes(tmp_path: Path) -> None:
    splits = make_splits([f"id{i}" for i in range(16)], fractions=(1 / 4, 1 / 2), seed=0)
    hashes = write_splits(tmp_path / "splits", splits)
    labeled = tmp_path / "splits" / "1_4" / "labeled.txt"
    assert labeled.read_text().splitlines() == splits["1_4"][0]
    assert (tmp_path / "splits" / "1_2" / "unlabeled.txt").read_text().splitlines() == splits["1_2"][1]
    assert hashes["1_4/labeled.txt"] == sha256_file(labeled)
    assert set(hashes) == {"1_4/labeled.txt", "1_4/unlabeled.txt", "1_2/labeled.txt", "1_2/unlabeled.txt"}
    assert not list((tmp_path / "splits").rglob("*.tmp"))
    assert [e.tokens[0] for e in read_list(labeled)] == splits["1_4"][0]
    assert list_sha256({"labeled": labeled, "unlabeled": None}) == {"labeled": sha256_file(labeled)}
