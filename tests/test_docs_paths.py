"""Every repository path that README.md and docs/*.md name exists in a clone.

Checked, in every document: paths in backticks whose first folder is a top-level entry of the repository
(`configs/demo.yaml`, `imas_train/methods/`), the same paths as words of fenced code blocks (the commands a reader
copies), bare config names in backticks (`demo.yaml`, looked up in configs/), and Markdown link targets (relative to
their document). Alternatives in braces are expanded (`cityscapes_os16_{186,372}.yaml` is two files) and a `*`
must match at least one file. `tests/x.py::test_name` also needs ``def test_name`` in that file.

Skipped: what a run or the user creates (runs/, data/, pretrained/, splits/, exports/, out/), placeholders (`<run>`,
`$X`, `~`), absolute paths and paths outside the repository (`../shared/...`). "In a clone" means tracked by git, or
new and not ignored (what a commit would add); without git, present on disk.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
USER_FOLDERS = ("runs/", "data/", "pretrained/", "splits/", "exports/", "out/")
PLACEHOLDERS = set("<>$~")
_BACKTICKS = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


@lru_cache(maxsize=1)
def clone_files() -> frozenset[str]:
    """Files a clone of this checkout would have: tracked, plus untracked files git does not ignore."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        return frozenset(line for line in out.splitlines() if line)
    except (OSError, subprocess.SubprocessError):  # no git (an unpacked archive): what is on disk
        skip = {".venv", "runs", "data", "pretrained", ".git"}
        return frozenset(
            p.relative_to(ROOT).as_posix()
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
        )


def expand_braces(text: str) -> list[str]:
    """`a_{1,2}_{x,y}` -> the four names, as a shell expands them (nested braces too); unbalanced: as it is."""
    start = text.find("{")
    if start < 0:
        return [text]
    depth, options, begin = 0, [], start + 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                options.append(text[begin:i])
                head, tail = text[:start], text[i + 1 :]
                return [name for option in options for name in expand_braces(head + option + tail)]
        elif text[i] == "," and depth == 1:
            options.append(text[begin:i])
            begin = i + 1
    return [text]


def exists_in_clone(rel: str) -> bool:
    """A file, or a folder holding files, at `rel` ('*' matches within a name) in a clone."""
    rel = rel.rstrip("/")
    files = clone_files()
    if "*" in rel:
        return any(fnmatch.fnmatchcase(f, rel) or fnmatch.fnmatchcase(f, rel + "/*") for f in files)
    return rel in files or any(f.startswith(rel + "/") for f in files)


def skipped(path: str) -> bool:
    """Paths not checked: placeholders, absolute, outside the repository, or made by a run or the user."""
    return (
        bool(PLACEHOLDERS & set(path))
        or path.startswith(("/", "..", "http:", "https:", "#", "mailto:"))
        or path.startswith(USER_FOLDERS)
    )


def _repo_path(text: str, top: set[str]) -> str | None:
    """`text` as a path relative to the repository root when it names one, else None."""
    if not text or any(c.isspace() for c in text) or skipped(text):
        return None
    first = text.split("/", 1)[0]
    if "/" in text and first in top:
        return text
    if "/" not in text and text.endswith(".yaml") and text != "config.yaml":  # as in the configs table; not a run's
        return f"configs/{text}"
    return None


def named_paths() -> list[tuple[str, int, str, str]]:
    """(document, line, path relative to the repository root, test name or "") for every checked path."""
    top = {f.split("/", 1)[0] for f in clone_files() if "/" in f}  # top-level folders
    found: list[tuple[str, int, str, str]] = []
    for doc in DOCS:
        name = doc.relative_to(ROOT).as_posix()
        fenced = False
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            words = line.split() if fenced else [m.group(1).strip() for m in _BACKTICKS.finditer(line)]
            for word in words:
                text, _, test = word.strip("\"',;()").partition("::")
                for alternative in expand_braces(text):
                    path = _repo_path(alternative, top)
                    if path is not None:
                        found.append((name, number, path, test))
            for match in _LINK.finditer(line):
                target = match.group(1).split("#", 1)[0]
                if not target or skipped(match.group(1)):
                    continue
                resolved = (doc.parent / target).resolve()
                if ROOT in resolved.parents:
                    found.append((name, number, resolved.relative_to(ROOT).as_posix(), ""))
    return found


def test_the_extraction_finds_the_paths_the_docs_name() -> None:
    paths = {p for _, _, p, _ in named_paths()}
    assert {"configs/demo.yaml", "docs/algorithm.md", "imas_core/atomic.py", "imas_train/methods/"} <= paths
    assert {"configs/voc_classic_r101_92.yaml", "configs/cityscapes_suponly_186.yaml"} <= paths  # the configs table
    assert not any(p.startswith(("runs/", "data/", "../")) for p in paths)


def test_every_named_path_exists_in_a_clone() -> None:
    missing = [f"{doc}:{line}: {path}" for doc, line, path, _ in named_paths() if not exists_in_clone(path)]
    assert not missing, "paths named in the docs that a clone does not have:\n" + "\n".join(missing)


def test_every_named_test_exists() -> None:
    missing = []
    for doc, line, path, test in named_paths():
        if not test or not (ROOT / path).is_file():
            continue
        source = (ROOT / path).read_text(encoding="utf-8")
        if not re.search(rf"^\s*def {re.escape(test)}\(", source, flags=re.MULTILINE):
            missing.append(f"{doc}:{line}: {path}::{test}")
    assert not missing, "tests named in the docs that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("configs/demo.yaml", ["configs/demo.yaml"]), ("runs/demo/model.onnx", []), ("<run>/config.yaml", []),
     ("../shared/ALGORITHM.md", []), ("/proc/self/status", []), ("demo.yaml", ["configs/demo.yaml"]),
     ("config.yaml", []),
     ("configs/voc_r{50,101}_{1,2}.yaml", ["configs/voc_r50_1.yaml", "configs/voc_r50_2.yaml",
                                            "configs/voc_r101_1.yaml", "configs/voc_r101_2.yaml"]),
     ("voc_{a,b_{1,2}}.yaml", ["configs/voc_a.yaml", "configs/voc_b_1.yaml", "configs/voc_b_2.yaml"])],
)  # fmt: skip
def test_what_counts_as_a_repository_path(text: str, expected: list[str]) -> None:
    top = {"configs", "imas_train"}
    got = [p for alternative in expand_braces(text) if (p := _repo_path(alternative, top)) is not None]
    assert sorted(got) == sorted(expected)
