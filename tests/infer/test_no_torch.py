"""Deployment footprint: `python -m imas_infer` runs end to end with torch and accelerate unimportable.

A fresh interpreter installs a meta-path finder that raises ImportError for `torch` and `accelerate` (as on a
Jetson with only numpy, Pillow and onnxruntime), then runs the package as `python -m imas_infer` would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.infer.infer_helpers import cli_args, expected_labels, make_onnx, read_png, write_images

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[2]

WRAPPER = textwrap.dedent(
    """
    import json, runpy, sys

    BLOCKED = {"torch", "accelerate"}
    attempts = []

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Block())
    report_path, sys.argv = sys.argv[1], ["imas-infer", *sys.argv[2:]]
    code = 0
    try:
        runpy.run_module("imas_infer", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    with open(report_path, "w") as fh:
        json.dump({"code": code, "attempts": attempts, "loaded": loaded}, fh)
    sys.exit(code)
    """
)


def test_cli_runs_without_torch_or_accelerate(tmp_path: Path) -> None:
    model = make_onnx(tmp_path / "model.onnx", window=(16, 24))
    images = write_images(tmp_path / "in", {f"d/img{i}.png": (20 + i, 30) for i in range(3)})
    out, probe = tmp_path / "out", tmp_path / "probe.json"
    args = cli_args(model, tmp_path / "in", out, "--save", "labels,color", "--backend", "ort-cpu", "--threads", "1")
    res = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(probe), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    result = json.loads(probe.read_text())
    # `loaded`, not `attempts`: a dependency may probe for torch inside try/except, which is harmless
    assert result["loaded"] == [], result
    assert "model: model.onnx (onnx, CPUExecutionProvider" in res.stdout
    for rel, image in images.items():
        mode, labels = read_png(out / "labels" / rel)
        assert mode == "L"
        np.testing.assert_array_equal(labels, expected_labels(image))
        assert (out / "color" / rel).is_file()
