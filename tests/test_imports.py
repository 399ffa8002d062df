"""Import tiers (STYLE.md §1, docs/design.md), each checked in a fresh interpreter.

A meta-path finder makes the blocked packages unimportable, so a stray `import torch` fails loudly instead of
silently working on this development machine.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys
class _Block:
    def __init__(self, names): self.names = names
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in self.names:
            raise ImportError(f'{name} is blocked in this test')
        return None
sys.meta_path.insert(0, _Block(set(BLOCKED)))
"""


def run_isolated(code: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    program = f"BLOCKED = {blocked!r}\n" + BLOCKER + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


TIER0 = ["imas_train", "imas_train.errors", "imas_train.config", "imas_train.tiling", "imas_train.artifacts",
         "imas_train.classes", "imas_train.scores"]  # fmt: skip


@pytest.mark.parametrize("module", TIER0)
def test_tier0_without_torch(module: str) -> None:
    res = run_isolated(f"import {module}", ("torch", "accelerate", "albumentations", "onnx", "onnxruntime"))
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "module",
    ["imas_infer", "imas_infer.cli", "imas_infer.pipeline", "imas_infer.backends.onnxruntime_backend",
     "imas_infer.backends.tensorrt_backend", "imas_infer.whole_images", "imas_infer.outputs"],
)  # fmt: skip
def test_infer_runtime_paths_without_torch_or_accelerate(module: str) -> None:
    res = run_isolated(f"import {module}", ("torch", "accelerate", "albumentations", "safetensors"))
    assert res.returncode == 0, res.stderr


def test_infer_cli_help_without_torch() -> None:
    res = run_isolated(
        "import sys; sys.argv=['imas-infer','--help']\nfrom imas_infer.cli import main\nraise SystemExit(main())",
        ("torch", "accelerate"),
    )
    assert res.returncode == 0, res.stderr
    assert "--model" in res.stdout


def test_export_without_accelerate() -> None:
    res = run_isolated("import imas_export, imas_export.cli, imas_export.onnx_export", ("accelerate",))
    assert res.returncode == 0, res.stderr


def test_models_without_torchvision_or_timm() -> None:
    code = """
    import sys, imas_train.models, imas_train.imas, imas_train.checkpoint
    bad = [m for m in sys.modules if m.split('.')[0] in ('torchvision', 'timm', 'accelerate')]
    assert not bad, bad
    """
    res = run_isolated(code, ("torchvision", "timm"))
    assert res.returncode == 0, res.stderr


def test_tier1_without_accelerate() -> None:
    code = """
    import imas_train.models, imas_train.imas, imas_train.losses, imas_train.ema, imas_train.optim
    import imas_train.metrics, imas_train.sliding_window, imas_train.checkpoint
    """
    res = run_isolated(code, ("accelerate", "albumentations", "tensorboard", "matplotlib"))
    assert res.returncode == 0, res.stderr
