"""Inference fixtures (helpers live in tests/infer/infer_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.infer.infer_helpers import make_onnx


@pytest.fixture
def onnx_model(tmp_path: Path) -> Path:
    """Static 16x24 window, dynamic batch (max 8), logits."""
    return make_onnx(tmp_path / "model" / "model.onnx")
