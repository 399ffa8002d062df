"""`imas-infer --ray` on a real local Ray cluster (2 CPUs, one per module) against the single-machine pipeline.

Every Ray worker of this module starts with a `sitecustomize` that makes torch and accelerate unimportable and logs
its pid, so the ONNX Runtime path under Ray is proven to run without them (a stray import would fail the images).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from imas_core.artifacts import read_exported_meta, write_exported_meta
from imas_core.atomic import sha256_file
from imas_core.errors import ArtifactError, InferError
from imas_infer import InferOptions, infer
from imas_infer.cli import main
from imas_infer.manifest import MANIFEST_DIR
from tests.infer.infer_helpers import cli_args, expected_labels, make_onnx, read_png, write_images

pytestmark = pytest.mark.slow  # one local Ray cluster for the module: about 45 s on 2 busy cores

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("onnxruntime")

from imas_infer.ray_data import RayOptions, infer_ray  # noqa: E402
from imas_infer.ray_inputs import list_inputs  # noqa: E402
from imas_infer.shard import shard_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

SITECUSTOMIZE = textwrap.dedent(
    """
    import os, sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "accelerate"):
                raise ImportError(f"{name} is blocked in the Ray workers of tests/infer/test_ray.py")
            return None

    sys.meta_path.insert(0, _Block())
    with open(os.environ["IMAS_TEST_BLOCKED_PIDS"], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    """
)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One local cluster for the module; its workers cannot import torch or accelerate."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    pids = site / "blocked_pids.txt"
    pythonpath = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {"PYTHONPATH": pythonpath, "IMAS_TEST_BLOCKED_PIDS": str(pids), "OMP_NUM_THREADS": "1"}
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="WARNING")
    yield pids
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny ONNX model, 9 good images in a nested tree (sizes cut 1 to 9 windows) and 2 corrupt files."""
    root = tmp_path_factory.mktemp("ray_data")
    model = make_onnx(root / "model" / "model.onnx")
    sizes = {f"cam{i % 2}/frame_{i:03d}.png": (16 + 7 * i, 24 + 9 * (i % 4)) for i in range(9)}
    images = write_images(root / "in", sizes)
    good = (root / "in" / "cam0" / "frame_000.png").read_bytes()
    (root / "in" / "cam1" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "in" / "text.png").write_text("not an image\n")
    reference = root / "single"
    result = infer(InferOptions(model=model, input=str(root / "in"), output=reference, save=("labels", "color")))
    assert result.summary.succeeded == 9 and len(result.summary.failures) == 2
    return {"root": root, "model": model, "images": images, "reference": reference}


def _outputs(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and MANIFEST_DIR not in p.parts
    }


def _journal_lines(output: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((output / MANIFEST_DIR).rglob("*.jsonl")) for line in f.open()]


def test_ray_matches_single_machine_and_resumes(ray_cluster: Path, data: dict, tmp_path: Path) -> None:
    root, model = data["root"], data["model"]
    out, report = tmp_path / "ray_out", tmp_path / "report.json"
    options = InferOptions(
        model=model, input=str(root / "in"), output=out, save=("labels", "color"), report=report, progress=False
    )
    result = infer_ray(options, RayOptions(images_per_call=4))
    assert result.summary.succeeded == 9
    # byte-equal outputs, same names; the labels are the tiny model's exact prediction
    assert _outputs(out) == _outputs(data["reference"]) and len(_outputs(out)) == 18
    for rel, image in data["images"].items():
        np.testing.assert_array_equal(read_png(out / "labels" / rel)[1], expected_labels(image))
    written = json.loads(report.read_text())
    failed = {Path(f["path"]).name: f["reason"] for f in written["failures"]}
    assert set(failed) == {"truncated.png", "text.png"} and all("unreadable image" in r for r in failed.values())
    assert written["succeeded"] == 9 and written["failed"] == 2 and written["skipped"] == 0
    assert written["model"]["sha256"] == sha256_file(model) and written["model"]["sidecar_sha256"]
    assert written["stage_total_s"]["decode"] > 0 and written["stage_total_s"]["model"] > 0
    assert written["windows"] > 9 and written["images_per_s"] > 0
    assert written["ray"]["layout"]["actors"] == 1 and len(written["ray"]["actors_seen"]) == 1
    # every finished image journaled exactly once, with the sizes of what is on disk
    lines = _journal_lines(out)
    assert sorted(line["input"] for line in lines) == sorted(data["images"])
    for rec in lines:
        assert rec["outputs"]["labels"]["size"] == (out / rec["outputs"]["labels"]["path"]).stat().st_size
    # the actor ran ONNX Runtime in a worker where torch and accelerate could not be imported
    actor = written["ray"]["actors_seen"][0].split(" ")[0]
    assert actor.split(":")[1] in ray_cluster.read_text().split()
    # decoding ran in Ray tasks, in other worker processes than the actor's
    assert written["ray"]["decode_workers_seen"] and actor not in written["ray"]["decode_workers_seen"]

    # a second run (the CLI, same cluster) processes nothing new: only the corrupt files are tried again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    args = cli_args(model, root / "in", out, "--save", "labels,color", "--ray", "--report", str(report))
    assert main(args) == 3
    again = json.loads(report.read_text())
    assert again["skipped"] == 9 and again["images"] == 2 and again["succeeded"] == 0
    assert {Path(f["path"]).name for f in again["failures"]} == {"truncated.png", "text.png"}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps
    assert len(_journal_lines(out)) == 9


def test_ray_reads_uris_and_a_shard(ray_cluster: Path, data: dict, tmp_path: Path) -> None:
    """A folder URI and a list file of URIs go through pyarrow's file systems (file:// here; s3://, gs:// alike)
    and give the same inputs as the folder; one Ray run over the list keeps shard 0 of 2."""
    root, out = data["root"], tmp_path / "uri_out"
    folder = list_inputs(str(root / "in"))
    listing = tmp_path / "frames.txt"
    listing.write_text("# one URI per line\n" + "".join(Path(i.path).as_uri() + "\n" for i in folder))
    for spec in ((root / "in").as_uri(), str(listing)):
        uris = list_inputs(spec)
        assert [(i.rel, i.size) for i in uris] == [(i.rel, i.size) for i in folder] and len(uris) == 11
        assert all(i.path.startswith("file:///") for i in uris)
    options = InferOptions(model=data["model"], input=str(listing), output=out, shard=(0, 2), progress=False)
    result = infer_ray(options, RayOptions(images_per_call=3))
    mine = [i for i in folder if shard_of(i.rel, 2) == 0]
    assert result.report["shard"] == {"index": 0, "count": 2, "listed": 11, "selected": len(mine)}
    assert result.report["manifest"]["resume"] is True
    assert result.summary.succeeded + len(result.summary.failures) == len(mine)
    expected = {f"labels/{i.rel.with_suffix('.png')}" for i in mine if i.rel.as_posix() in data["images"]}
    reference = _outputs(data["reference"])
    assert _outputs(out) == {k: reference[k] for k in expected}
    for path, _ in result.summary.failures:
        assert path.startswith("file:///") and Path(path).name in ("truncated.png", "text.png")
    (listing.parent / "mixed.txt").write_text(f"{Path(folder[0].path).as_uri()}\n{folder[1].path}\n")
    with pytest.raises(InferError, match="mixed.txt:2: .* is a local path among URIs"):
        list_inputs(str(listing.parent / "mixed.txt"))


def test_ray_refusals(ray_cluster: Path, data: dict, tmp_path: Path) -> None:
    base = {"model": data["model"], "input": str(data["root"] / "in")}
    with pytest.raises(InferError, match="FUSE mount"):
        infer_ray(InferOptions(**base, output=Path("s3://bucket/out")))
    with pytest.raises(InferError, match="does not score --gt"):
        infer_ray(InferOptions(**base, output=tmp_path / "o", gt=tmp_path))
    with pytest.raises(InferError, match="--ray-images-per-call"):
        infer_ray(InferOptions(**base, output=tmp_path / "o"), RayOptions(images_per_call=0))
    teacher = {**base, "model": tmp_path / "teacher.safetensors"}
    with pytest.raises(InferError, match="export it first"):
        infer_ray(InferOptions(**teacher, output=tmp_path / "o"))
    # a model the backend refuses only when it opens it (in the actor): the same error and message on the driver
    other = make_onnx(tmp_path / "other" / "model.onnx")
    meta = read_exported_meta(other)
    wider = [*meta.class_names, "extra"], [*meta.palette, [1, 2, 3]]
    write_exported_meta(other, dataclasses.replace(meta, num_classes=4, class_names=wider[0], palette=wider[1]))
    with pytest.raises(ArtifactError, match="the sidecar says 4 classes.*raised in a Ray actor"):
        infer_ray(InferOptions(**{**base, "model": other}, output=tmp_path / "o2"))


def test_killed_actor_is_restarted_and_no_image_is_written_twice(ray_cluster: Path, data: dict, tmp_path: Path) -> None:
    """SIGKILL the actor right after it journals its first image: Ray restarts it and retries the call, and the retry
    skips what the lost attempt had finished (one journal line, one write per image)."""
    sizes = {f"seq/f{i:02d}.png": (120, 160) for i in range(16)}
    images = write_images(tmp_path / "in", sizes)
    out, journals = tmp_path / "out", tmp_path / "out" / MANIFEST_DIR
    killed: list[int] = []

    def kill_first_writer() -> None:
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for journal in journals.rglob("*.jsonl"):
                if journal.stat().st_size > 0:
                    pid = int(journal.stem.split("-")[-2])  # <host>-<pid>-<random>.jsonl
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.002)

    watcher = threading.Thread(target=kill_first_writer, daemon=True)
    watcher.start()
    options = InferOptions(model=data["model"], input=str(tmp_path / "in"), output=out, progress=False)
    result = infer_ray(options, RayOptions(images_per_call=16))
    watcher.join()
    assert killed and result.summary.succeeded == 16 and not result.summary.failures
    assert result.report["ray"]["finished_by_earlier_attempt"] >= 1  # the kill landed inside the call
    (survivor,) = result.report["ray"]["actors_seen"]  # only the restarted actor returned rows
    assert f":{killed[0]} " not in survivor
    lines = _journal_lines(out)
    assert sorted(line["input"] for line in lines) == sorted(sizes)  # each image journaled (= written) once
    assert len({f.name for f in journals.rglob("*.jsonl")}) == 2  # the killed actor's journal and its successor's
    for rel, image in images.items():
        np.testing.assert_array_equal(read_png(out / "labels" / rel)[1], expected_labels(image))


DRIVER = textwrap.dedent(
    """
    import json, sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "accelerate"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Block())
    from imas_infer.cli import main

    code = main(sys.argv[2:])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "accelerate"))
    with open(sys.argv[1], "w") as fh:
        json.dump({"code": code, "loaded": loaded}, fh)
    """
)


def test_the_cli_driver_runs_without_torch_or_accelerate(ray_cluster: Path, data: dict, tmp_path: Path) -> None:
    """`imas-infer --ray ADDRESS` in a fresh interpreter where torch and accelerate cannot be imported, connected to
    the module's cluster (whose workers block them too)."""
    probe, out = tmp_path / "probe.json", tmp_path / "out"
    args = cli_args(data["model"], data["root"] / "in" / "cam0", out, "--ray", ray.get_runtime_context().gcs_address)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", DRIVER, str(probe), *args]
    res = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    result = json.loads(probe.read_text())
    assert result == {"code": 0, "loaded": []}, res.stderr[-3000:]
    assert "ray " in res.stdout and "1 actor(s)" in res.stdout
    for rel, image in data["images"].items():
        if rel.startswith("cam0/"):
            np.testing.assert_array_equal(read_png(out / "labels" / Path(rel).name)[1], expected_labels(image))
