"""`imas-infer --shard I/N` (split without cluster software) and `--resume` (the manifest) on one machine."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest

from imas_core.errors import InferError
from imas_infer.cli import main
from imas_infer.manifest import MANIFEST_DIR
from imas_infer.shard import parse_shard, select_shard, shard_of
from tests.infer.infer_helpers import cli_args, write_images

pytest.importorskip("onnxruntime")


class _Item:
    def __init__(self, rel: str) -> None:
        self.rel = PurePosixPath(rel)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_any_listing(count: int) -> None:
    items = [_Item(f"city{i % 5}/frame_{i:05d}.png") for i in range(500)]
    shards = [select_shard(items, index, count) for index in range(count)]
    assert sorted(id(x) for shard in shards for x in shard) == sorted(id(x) for x in items)  # each exactly once
    assert all(len(shard) > 500 / count * 0.7 for shard in shards)  # balanced (statistically)
    # a shard depends on the path only: a later listing with more files, in another order, keeps what it had
    later = [*items[::-1], *(_Item(f"new/{i}.png") for i in range(50))]
    for index, shard in enumerate(shards):
        assert {x.rel for x in shard} <= {x.rel for x in select_shard(later, index, count)}
        assert all(shard_of(x.rel, count) == index for x in shard)


@pytest.mark.parametrize("text", ["3/3", "1", "a/2", "0/0", "-1/2"])
def test_bad_shard_values(text: str, tmp_path: Path, onnx_model: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(InferError, match="--shard"):
        parse_shard(text)
    with pytest.raises(SystemExit) as exit_:
        main(cli_args(onnx_model, tmp_path, tmp_path / "o", "--shard", text))
    assert exit_.value.code == 2 and "--shard" in capsys.readouterr().err


def _outputs(folder: Path) -> dict[str, bytes]:
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and MANIFEST_DIR not in p.parts)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def _journal(output: Path) -> list[str]:
    return [json.loads(line)["input"] for f in (output / MANIFEST_DIR).rglob("*.jsonl") for line in f.open()]


def test_shard_runs_cover_every_image_once(tmp_path: Path, onnx_model: Path) -> None:
    sizes = {f"cam{i % 3}/f{i:02d}.png": (17 + i, 25) for i in range(14)}
    write_images(tmp_path / "in", sizes)
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert main(cli_args(onnx_model, tmp_path / "in", whole, "--save", "labels,color")) == 0
    selected = []
    for index in range(3):
        report = tmp_path / f"r{index}.json"
        args = ("--save", "labels,color", "--shard", f"{index}/3", "--report", str(report))
        assert main(cli_args(onnx_model, tmp_path / "in", sharded, *args)) == 0
        written = json.loads(report.read_text())
        assert written["shard"] == {"index": index, "count": 3, "listed": 14, "selected": written["images"]}
        assert written["manifest"]["resume"] is True and written["skipped"] == 0
        selected.append(written["images"])
    assert sum(selected) == 14 and min(selected) > 0
    assert sorted(_journal(sharded)) == sorted(sizes)  # every image processed by exactly one shard
    assert _outputs(sharded) == _outputs(whole)  # byte-equal to one unsharded run


def test_resume_skips_finished_images_and_redoes_what_no_longer_verifies(tmp_path: Path, onnx_model: Path) -> None:
    write_images(tmp_path / "in", {f"f{i}.png": (20 + i, 30) for i in range(5)})
    out, report = tmp_path / "out", tmp_path / "r.json"
    run = cli_args(onnx_model, tmp_path / "in", out, "--report", str(report), "--resume")
    assert main(run) == 0 and json.loads(report.read_text())["succeeded"] == 5
    assert main(run) == 0
    again = json.loads(report.read_text())
    assert again["skipped"] == 5 and again["images"] == 0 and again["succeeded"] == 0
    # a deleted output and a changed one (another size) are redone; nothing else is
    (out / "labels" / "f1.png").unlink()
    (out / "labels" / "f3.png").write_bytes(b"garbage")
    assert main(run) == 0
    third = json.loads(report.read_text())
    assert third["skipped"] == 3 and third["succeeded"] == 2
    assert sorted(_journal(out)) == sorted([f"f{i}.png" for i in range(5)] + ["f1.png", "f3.png"])
    # other settings that change the bytes (here --flip) have another fingerprint: everything runs again
    assert main([*run, "--flip"]) == 0
    flipped = json.loads(report.read_text())
    assert flipped["skipped"] == 0 and flipped["succeeded"] == 5
    assert flipped["manifest"]["fingerprint"] != third["manifest"]["fingerprint"]
    # without --resume (the default on one machine) every image is processed, and still journaled
    assert main(cli_args(onnx_model, tmp_path / "in", out, "--report", str(report))) == 0
    plain = json.loads(report.read_text())
    assert plain["succeeded"] == 5 and plain["manifest"]["resume"] is False


def test_resume_refuses_gt(tmp_path: Path, onnx_model: Path, capsys: pytest.CaptureFixture) -> None:
    write_images(tmp_path / "in", {"a.png": (20, 30)})
    assert main(cli_args(onnx_model, tmp_path / "in", tmp_path / "o", "--resume", "--gt", str(tmp_path))) == 2
    assert "--resume needs --output" in capsys.readouterr().err
