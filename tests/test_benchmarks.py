"""Smoke runs of the benchmark scripts, so they do not rot: each runs at its tiniest setting (`--smoke`) in a
subprocess, exits 0, prints its table and writes a JSON with the standard keys. Nothing here asserts a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
TOP_KEYS = {"format_version", "benchmark", "date", "settings", "versions", "machine", "results", "notes"}

pytest.importorskip("torch")


def _run(script: str, tmp_path: Path, *extra: str) -> tuple[str, dict]:
    out = tmp_path / f"{script}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,  # the scripts must not depend on the working directory
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    payload = json.loads(out.read_text())
    assert TOP_KEYS <= payload.keys()
    assert payload["benchmark"] == script and payload["settings"]["smoke"] is True
    assert payload["machine"]["logical_cores"] >= 1 and payload["versions"]["torch"]
    return proc.stdout, payload


@pytest.mark.slow
def test_hardness_smoke(tmp_path: Path) -> None:
    stdout, payload = _run("hardness", tmp_path)
    assert "| B | (a) full: ours ms | reference ms | speed-up |" in stdout
    (row,) = payload["results"]
    assert row["equal"] is True and row["max_abs_diff"] <= 1e-6
    for key in ("full_ours_s", "full_reference_s", "post_ours_s", "post_reference_s", "speedup_full", "speedup_post"):
        assert row[key] > 0


@pytest.mark.slow
def test_train_step_smoke(tmp_path: Path) -> None:
    stdout, payload = _run("train_step", tmp_path)
    assert "| precision | variant" in stdout and "time ratio" in stdout
    rows = {r["variant"]: r for r in payload["results"]}
    assert set(rows) == {"supervised", "imas_faithful", "imas_fast", "u2pl", "cps", "cct", "dual_teacher"}
    assert 3.2 < rows["dual_teacher"]["flop_ratio"] < 4.1  # 11 vs 3 forward-equivalents (DualTeacher.md §8)
    assert 1.8 < rows["cct"]["flop_ratio"] < 2.4  # 6 vs 3 forward-equivalents plus 12 light decoders (CCT.md §8)
    assert rows["imas_faithful"]["cutmix_fired_fraction"] == 1.0 == rows["imas_fast"]["cutmix_fired_fraction"]
    # the FLOP counts follow the arithmetic of docs/algorithm.md §11.5 (14 and 11 vs 3 forward-equivalents, ± aux head)
    assert 4.2 < rows["imas_faithful"]["flop_ratio"] < 5.1
    assert 3.2 < rows["imas_fast"]["flop_ratio"] < 4.1
    assert 4.6 < rows["cps"]["flop_ratio"] < 5.6  # 16 vs 3 forward-equivalents (shared/methods/README.md §2)
    assert rows["u2pl"]["flop_ratio"] > 3.0  # 9 vs 3, plus U2PL's heavier decoder and representation head
    assert all(r["time_ms"] > 0 for r in rows.values())
    assert all(r["peak_memory_mb"] is None or r["peak_memory_mb"] > 0 for r in rows.values())


@pytest.mark.slow
def test_infer_smoke(tmp_path: Path) -> None:
    stdout, payload = _run("infer", tmp_path, "--keep", str(tmp_path / "work"))
    assert "| backend" in stdout and "model ms/img" in stdout
    rows = {r["label"]: r for r in payload["results"]}
    for label in ("torch eager", "ORT CPU", "ORT CPU INT8"):
        assert "error" not in rows[label], rows[label].get("error")
        row = rows[label]
        assert row["model_ms_per_image"] > 0 and row["images_per_s"] > 0 and row["peak_rss_mib"] > 0
        assert row["windows_per_image"] == payload["settings"]["windows_per_image"]
        assert row["gflop_per_image"] > 0


@pytest.mark.slow
def test_threads_smoke(tmp_path: Path) -> None:
    stdout, payload = _run("threads", tmp_path, "--infer")
    assert "| launch | run.cpu_threads | torch threads |" in stdout and "| imas-infer --threads |" in stdout
    (row,) = [r for r in payload["results"] if r["kind"] == "train"]
    assert (row["launcher"], row["threads"], row["wait"]) == ("python", 1, "unset")
    assert row["torch_threads_alone"] == row["torch_threads_load"] == 1  # run.cpu_threads reached torch
    assert row["it_per_s_alone"] > 0 and row["it_per_s_load"] > 0 and not row["errors_alone"] + row["errors_load"]
    (row,) = [r for r in payload["results"] if r["kind"] == "infer"]
    assert row["images_per_s_alone"] > 0 and row["model_ms_per_image_alone"] > 0 and not row["errors_alone"]
    assert row["runtime_alone"].endswith("cpu, 1 thread(s)")


@pytest.mark.slow
def test_ray_infer_smoke(tmp_path: Path) -> None:
    pytest.importorskip("ray.data")
    stdout, payload = _run("ray_infer", tmp_path)
    assert "| run " in stdout and "Ray / single throughput" in stdout
    rows = {r["label"]: r for r in payload["results"]["rows"]}
    assert set(rows) == {"single process", "Ray local (2 CPUs)"}
    assert payload["results"]["labels_byte_equal"] is True
    assert all(r["images"] == payload["settings"]["images"] and r["images_per_s"] > 0 for r in rows.values())


def test_label_next_smoke(tmp_path: Path) -> None:
    stdout, payload = _run("label_next", tmp_path, "--work", str(tmp_path / "work"))
    assert "rule minus random" in stdout
    (run,) = payload["results"]["runs"]
    for arm in ("base", "mean", "last", "random"):
        assert 0.0 <= run[arm]["miou_final"] <= 100.0
    assert len(run["mean"]["chosen"]) == payload["settings"]["top"] == 4
