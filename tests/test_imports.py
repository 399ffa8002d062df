"""Import tiers (docs/style.md §1, docs/design.md), each checked in a fresh interpreter.

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


ALL_MODULES = """
import importlib, pkgutil, sys
package = importlib.import_module(PACKAGE)
names = [m.name for m in pkgutil.walk_packages(package.__path__, PACKAGE + '.') if not m.name.endswith('__main__')]
for name in names:
    importlib.import_module(name)
print(len(names))
"""

# The package graph of docs/design.md: what each package may NOT import at module level. Sibling packages are
# blocked too, so a sideways import fails here even though every package is installed.
FORBIDDEN = {
    "imas_core": ("imas_train", "imas_export", "imas_infer", "torch", "yaml", "accelerate", "albumentations",
                  "safetensors", "onnx", "onnxruntime", "tensorrt", "matplotlib", "tqdm", "ray", "pyarrow"),
    "imas_train": ("imas_export", "imas_infer", "onnx", "onnxruntime", "tensorrt", "torchvision", "timm", "ray"),
    "imas_export": ("imas_train", "imas_infer", "accelerate", "tensorrt", "ray"),
    "imas_infer": ("imas_train", "imas_export", "torch", "accelerate", "yaml", "albumentations", "safetensors",
                   "tensorrt", "ray", "pyarrow"),
}  # fmt: skip


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_graph(package: str) -> None:
    """Every module of each package imports with its forbidden packages unimportable."""
    res = run_isolated(f"PACKAGE = {package!r}\n" + ALL_MODULES, FORBIDDEN[package])
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[-1]) >= 5  # the walk found the package's modules


def test_core_imports_with_only_numpy() -> None:
    res = run_isolated("import imas_core, imas_core.artifacts, imas_core.images, imas_core.runners; "
                       "print(imas_core.__version__)", FORBIDDEN["imas_core"] + ("PIL",))  # fmt: skip
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "module",
    ["imas_infer", "imas_infer.cli", "imas_infer.pipeline", "imas_core.runners.onnxruntime_backend",
     "imas_core.runners.tensorrt_backend", "imas_infer.whole_images", "imas_infer.outputs"],
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
    import sys, imas_train.models, imas_train.imas, imas_train.teacher_artifact
    bad = [m for m in sys.modules if m.split('.')[0] in ('torchvision', 'timm', 'accelerate')]
    assert not bad, bad
    """
    res = run_isolated(code, ("torchvision", "timm"))
    assert res.returncode == 0, res.stderr


def test_tier1_without_accelerate() -> None:
    code = """
    import imas_train.models, imas_train.imas, imas_train.losses, imas_train.ema, imas_train.optim
    import imas_train.metrics, imas_train.sliding_window, imas_train.teacher_artifact
    """
    res = run_isolated(code, ("accelerate", "albumentations", "tensorboard", "matplotlib"))
    assert res.returncode == 0, res.stderr
