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
from PIL import Image

from tests.infer.infer_helpers import expected_logits, make_onnx, random_image, save_image

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
    images = {f"d/img{i}.png": random_image(20 + i, 30, seed=i) for i in range(3)}
    for rel, image in images.items():
        save_image(tmp_path / "in" / rel, image)
    out, probe = tmp_path / "out", tmp_path / "probe.json"
    args = [
        "--model",
        str(model),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--save",
        "labels,color",
        "--backend",
        "ort-cpu",
        "--threads",
        "1",
    ]
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
        with Image.open(out / "labels" / rel) as img:
            assert img.mode == "L"
            np.testing.assert_array_equal(np.asarray(img), expected_logits(image).argmax(0))
        assert (out / "color" / rel).is_file()
