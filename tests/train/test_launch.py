"""The three launch forms of docs/style.md §4.2 reach the CLI (checked with --help in fresh subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = [
    sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
]  # fmt: skip


def _help(cmd: list[str], cwd: Path, pythonpath: bool) -> str:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize(
    ("form", "args", "pythonpath"),
    [
        ("python -m", [sys.executable, "-m", "imas_train"], True),
        ("accelerate launch -m", [*ACCELERATE, "-m", "imas_train"], True),
        # a directory path from elsewhere: __main__.py must repair sys.path itself
        ("accelerate launch DIR", [*ACCELERATE, str(REPO / "imas_train")], False),
    ],
)
def test_launch_form_reaches_the_cli(tmp_path: Path, form: str, args: list[str], pythonpath: bool) -> None:
    out = _help([*args, "--help"], tmp_path, pythonpath)
    assert out.startswith("usage: imas-train") and "--resume" in out, form


def test_subcommand_help() -> None:
    out = _help([sys.executable, "-m", "imas_train", "make-splits", "--help"], REPO, False)
    assert out.startswith("usage: imas-train make-splits")
