"""`imas-export` command line: stage lines, next commands, verify, errors, and the three ways to start it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[2]


def test_onnx_then_verify(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imas_export.cli import main

    model = tmp_path / "model.onnx"
    argv = ["onnx", "--teacher", str(tiny_teacher), "--output", str(model), "--window", "65", "97", "-n", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("load") and any(line.startswith("export    fp32.onnx") for line in lines)
    assert any(line.startswith("parity") and "agreement 100.000%" in line for line in lines)
    assert any(line.startswith("write     model.onnx") and " s" in line for line in lines)
    assert f"imas-export verify --teacher {tiny_teacher} --onnx {model}" in out
    assert f"imas-export trt --onnx {model} --output {model.with_suffix('.engine')}" in out
    assert f"imas-infer --model {model} --input IMAGES --output OUT" in out and "benchmarks/infer.py" in out
    assert f"imas-infer --model {model} --benchmark --synthetic 8 1024x2048" in out

    assert main(["verify", "--teacher", str(tiny_teacher), "--onnx", str(model), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime-cpu fp32: agreement 100.000% on 2 images" in out


def test_errors_are_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imas_export.cli import main

    code = main(["onnx", "--teacher", str(tmp_path / "missing.safetensors"), "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("imas-export: error:") and err.count("\n") == 1


@pytest.mark.parametrize("form", [["-m", "imas_export"], ["imas_export"]])
def test_help_from_module_and_directory(form: list[str]) -> None:
    res = subprocess.run(
        [sys.executable, *form, "trt", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "--timing-cache" in res.stdout and "exit codes" in res.stdout


def test_int8_warnings_reach_the_user(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imas_export.cli import main

    model = tmp_path / "model.int8.onnx"
    argv = ["onnx", "--teacher", str(tiny_teacher), "--output", str(model), "--precision", "int8", "-n", "1"]
    assert main([*argv, "--min-agreement", "0"]) == 0
    captured = capsys.readouterr()
    assert "imas-export: WARNING: int8 without --calib-dir: calibrating on 16 DEMO images" in captured.err
    assert any(line.startswith("int8      int8.onnx") for line in captured.out.splitlines())
