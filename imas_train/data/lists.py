"""Split lists: parsing, deterministic labeled/unlabeled partitions, writing, checksums (docs/algorithm.md §5.2).

Formats of the public semi-supervised segmentation codebases, one entry per line:
* one token: a VOC id (`2007_000032`), a bare file stem (folder datasets) or an image path relative to the data
  root (`leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png`); the label path is derived;
* two tokens: image path and label path, relative to the root (UniMatch style).
Blank lines and `#` comments are skipped; tokens are whitespace-separated, so paths cannot contain spaces.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from imas_core.atomic import atomic_write_text, sha256_file
from imas_core.errors import DataError

MAX_TOKENS = 2


@dataclass(frozen=True)
class ListEntry:
    """One parsed line: its tokens and where it came from (for error messages)."""

    tokens: tuple[str, ...]
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_list_text(text: str, path: Path, problems: list[tuple[str, str]] | None = None) -> list[ListEntry]:
    """Parse list text. A malformed line raises DataError naming file and line, or, when `problems` is given,
    is skipped and recorded there as `(where, message)`."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split()
        for k, tok in enumerate(tokens):  # a token starting with '#' begins a comment
            if tok.startswith("#"):
                tokens = tokens[:k]
                break
        if not tokens:
            continue
        if len(tokens) > MAX_TOKENS:
            message = (
                f"expected 1 token (image or id) or 2 tokens (image label), got {len(tokens)}: {raw.strip()!r};"
                " paths must not contain spaces"
            )
            if problems is None:
                raise DataError(f"{path}:{number}: {message}")
            problems.append((f"{path}:{number}", message))
            continue
        entries.append(ListEntry(tuple(tokens), path, number))
    return entries


def read_list(path: Path | str, problems: list[tuple[str, str]] | None = None) -> list[ListEntry]:
    """Read a split list file (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split list not found: {path}; check data.*_list in the config (not relative to data.root)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read split list ({err})") from err
    return parse_list_text(text, path, problems)


def list_sha256(paths: Mapping[str, Path | None]) -> dict[str, str]:
    """sha256 of each given list file, keyed like `paths` (None entries are skipped)."""
    return {key: sha256_file(p) for key, p in paths.items() if p is not None}


def _split_name(size: float | int, total: int) -> tuple[str, int]:
    if isinstance(size, int):
        return str(size), size
    frac = Fraction(size).limit_denominator(1000)
    # ceil reproduces every published count: Cityscapes 186/372/744/1488 of 2975, VOC 662/1323/2646/5291 of 10582
    count = math.ceil(total * size - 1e-9)
    name = f"1_{frac.denominator}" if frac.numerator == 1 else str(count)
    return name, count


def make_splits(
    items: Sequence[str],
    fractions: Sequence[float | int] = (1 / 16, 1 / 8, 1 / 4, 1 / 2),
    seed: int = 0,
) -> dict[str, tuple[list[str], list[str]]]:
    """Nested labeled/unlabeled partitions of `items` (list lines).

    Labeled = the first k items of one seeded permutation, so each smaller labeled set is a subset of every larger
    one; unlabeled = the rest. Both lists keep the input order. A float size is a fraction (k = ⌈N·f⌉, named
    `1_16` for 1/16), an int is a count (named by it).

    Returns:
        {name: (labeled, unlabeled)}.
    """
    total = len(items)
    if len(set(items)) != total:
        dupes = sorted(x for x, n in Counter(items).items() if n > 1)[:5]
        raise DataError(f"make_splits: duplicate items, e.g. {dupes}")
    order = np.random.default_rng(seed).permutation(total)
    rank = np.empty(total, dtype=np.int64)
    rank[order] = np.arange(total)
    out: dict[str, tuple[list[str], list[str]]] = {}
    for size in fractions:
        name, count = _split_name(size, total)
        if not 1 <= count <= total:
            raise DataError(f"make_splits: split {name} needs {count} labeled items but there are {total}")
        labeled = [x for x, r in zip(items, rank, strict=True) if r < count]
        unlabeled = [x for x, r in zip(items, rank, strict=True) if r >= count]
        out[name] = (labeled, unlabeled)
    return out


def write_splits(out_dir: Path | str, splits: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, str]:
    """Write `<out_dir>/<name>/labeled.txt` and `unlabeled.txt` atomically for each split.

    Returns:
        {"<name>/labeled.txt": sha256, "<name>/unlabeled.txt": sha256, ...}.
    """
    out_dir = Path(out_dir)
    hashes = {}
    for name, (labeled, unlabeled) in splits.items():
        for kind, lines in (("labeled", labeled), ("unlabeled", unlabeled)):
            path = out_dir / name / f"{kind}.txt"
            atomic_write_text(path, "".join(f"{line}\n" for line in lines))
            hashes[f"{name}/{kind}.txt"] = sha256_file(path)
    return hashes
