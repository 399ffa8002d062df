"""TensorRT build: the version plan, profile shapes and trtexec command on CPU; real builds only on GPU hosts."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imas_core.errors import ExportError
from imas_core.runtime import parse_version
from imas_export.options import EngineOptions
from imas_export.trt_build import build_plan, profile_shapes, trtexec_command

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _meta(window: list[int] | None) -> Any:
    from imas_core.artifacts import ExportedModelMeta

    return ExportedModelMeta(
        kind="onnx", num_classes=3, class_names=["a", "b", "c"], palette=[[0, 0, 0]] * 3, mean=[0.5] * 3,
        std=[0.2] * 3, input_name="image", input_dtype="float32", output_name="logits", output_kind="logits",
        output_dtype="float32", window=window, stride=[43, 43], eval_protocol="imas", precision="fp16",
        max_batch=8, source_sha256="s", artifact_sha256="a",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("version", "flags", "trtexec_flag"),
    [("10.3.0", ["STRONGLY_TYPED"], True), ("10.13.0.35", ["STRONGLY_TYPED"], True), ("11.0.0", [], False)],
)
def test_build_plan_by_version(version: str, flags: list[str], trtexec_flag: bool) -> None:
    plan = build_plan(version, version_compatible=True, hardware_compat="ampere+")
    assert plan["network_flags"] == flags  # opt-in on 10.x; always on (flag deprecated, ignored) on 11.x
    assert plan["trtexec_strongly_typed"] is trtexec_flag
    assert plan["builder_flags"] == ["VERSION_COMPATIBLE"]
    assert plan["hardware_compatibility_level"] == "AMPERE_PLUS"
    assert "FP16" not in str(plan) and "INT8" not in str(plan)  # precision comes from the ONNX, never from flags
    assert build_plan(version, version_compatible=False, hardware_compat="none")["builder_flags"] == []


def test_build_plan_refuses_old_versions_and_late_features() -> None:
    with pytest.raises(ExportError, match="too old"):
        build_plan("8.6.1", version_compatible=False, hardware_compat="none")
    with pytest.raises(ExportError, match="10.9"):
        build_plan("10.3.0", version_compatible=False, hardware_compat="same-cc")
    plan = build_plan("10.13.0", version_compatible=False, hardware_compat="same-cc")
    assert plan["hardware_compatibility_level"] == "SAME_COMPUTE_CAPABILITY"
    assert parse_version("10.13.0.35") == (10, 13, 0, 35) and parse_version("11") == (11, 0, 0, 0)


def test_profile_shapes_static_and_dynamic() -> None:
    opts = EngineOptions(onnx=Path("m.onnx"), output=Path("m.engine"), min_batch=1, opt_batch=4, max_batch=8)
    assert profile_shapes(_meta([65, 97]), opts) == {
        "min": [1, 3, 65, 97],
        "opt": [4, 3, 65, 97],
        "max": [8, 3, 65, 97],
    }
    with pytest.raises(ExportError, match="--min-hw"):
        profile_shapes(_meta(None), opts)
    dyn = EngineOptions(
        onnx=Path("m.onnx"), output=Path("m.engine"), min_hw=(65, 65), opt_hw=(129, 257), max_hw=(257, 513)
    )
    assert profile_shapes(_meta(None), dyn)["opt"] == [4, 3, 129, 257]
    with pytest.raises(ExportError, match="min <= opt <= max"):
        profile_shapes(_meta([65, 97]), EngineOptions(onnx=Path("m"), output=Path("e"), opt_batch=16))
    with pytest.raises(ExportError, match="fixed"):
        profile_shapes(_meta([65, 97]), EngineOptions(onnx=Path("m"), output=Path("e"), opt_hw=(33, 33)))


def test_stitched_profile_ranges_over_whole_images_only() -> None:
    import dataclasses

    meta = dataclasses.replace(_meta([65, 65]), stitched=True, image_size=[1024, 2048], max_batch=2)
    opts = EngineOptions(onnx=Path("m.onnx"), output=Path("m.engine"))
    shapes = profile_shapes(meta, opts)  # default batches for stitched models: 1 / 1 / 2 images
    assert shapes == {"min": [1, 3, 1024, 2048], "opt": [1, 3, 1024, 2048], "max": [2, 3, 1024, 2048]}
    assert "--optShapes=image:1x3x1024x2048 --maxShapes=image:2x3x1024x2048" in trtexec_command(opts, "image", shapes)
    assert (
        profile_shapes(meta, EngineOptions(onnx=Path("m"), output=Path("e"), opt_batch=2, max_batch=4))["max"][0] == 4
    )
    with pytest.raises(ExportError, match="stitched for whole images of 1024x2048"):
        profile_shapes(meta, EngineOptions(onnx=Path("m"), output=Path("e"), opt_hw=(65, 65)))
    with pytest.raises(ExportError, match="min <= opt <= max"):
        profile_shapes(meta, EngineOptions(onnx=Path("m"), output=Path("e"), opt_batch=4))


def test_trtexec_command() -> None:
    opts = EngineOptions(
        onnx=Path("model.onnx"), output=Path("out/model.fp16.engine"), workspace_gb=2, hardware_compat="ampere+"
    )
    shapes = profile_shapes(_meta([65, 97]), opts)
    ten = trtexec_command(opts, "image", shapes, build_plan("10.3.0", version_compatible=False, hardware_compat="none"))
    assert ten == (
        "trtexec --onnx=model.onnx --saveEngine=out/model.fp16.engine --stronglyTyped "
        "--minShapes=image:1x3x65x97 --optShapes=image:4x3x65x97 --maxShapes=image:8x3x65x97 "
        "--memPoolSize=workspace:2048M --timingCacheFile=out/timing.cache "
        "--hardwareCompatibilityLevel=ampere+ --skipInference"
    )
    eleven = trtexec_command(
        opts, "image", shapes, build_plan("11.0.0", version_compatible=False, hardware_compat="none")
    )
    assert "--stronglyTyped" not in eleven and "--fp16" not in eleven


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT path cannot run here")
def test_trt_without_tensorrt_says_so_and_exits_4(
    export_tiny: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from imas_core.errors import EXIT_UNAVAILABLE
    from imas_export.cli import main

    onnx_path = export_tiny("model.fp16.onnx", precision="fp16").path
    engine = onnx_path.with_suffix(".engine")
    assert main(["trt", "--onnx", str(onnx_path), "--output", str(engine)]) == EXIT_UNAVAILABLE == 4
    err = capsys.readouterr().err
    assert err.startswith('imas-export: error: TensorRT is not installed; pip install -e ".[trt]" in the imas checkout')
    assert f"trtexec --onnx={onnx_path}" in err and "--minShapes=image:1x3x65x97" in err
    assert not engine.exists()


@pytest.mark.gpu
def test_build_engine_and_verify_on_gpu(export_tiny: Callable[..., Any], tiny_teacher: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    from imas_core.artifacts import read_exported_meta
    from imas_core.runtime import gpu_info
    from imas_export import VerifyOptions, build_engine, verify

    if gpu_info() is None:
        pytest.skip("no CUDA GPU visible")
    onnx_path = export_tiny("model.fp16.onnx", precision="fp16").path
    engine = tmp_path / "model.fp16.engine"
    result = build_engine(EngineOptions(onnx=onnx_path, output=engine, opt_batch=2, max_batch=4, workspace_gb=1))
    meta = read_exported_meta(engine)  # checksum of the raw plan
    assert meta.kind == "tensorrt" and meta.tensorrt["onnx_sha256"] == read_exported_meta(onnx_path).artifact_sha256
    assert (tmp_path / "timing.cache").stat().st_size > 0
    assert result.path == engine
    report = verify(VerifyOptions(teacher=tiny_teacher, onnx=onnx_path, engine=engine))
    assert [r.backend for r in report.reports] == ["onnxruntime-cpu", "tensorrt"]
    assert report.reports[1].agreement >= 0.99


class _FakeTensorRT:
    """Records the TensorRT API calls `build_engine` makes (names per the documented 10.x/11.x Python API)."""

    def __init__(self, version: str, parse_ok: bool = True) -> None:
        self.__version__ = version
        self.calls: list[tuple[Any, ...]] = []
        self.parse_ok = parse_ok
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                pass

        class Error:
            def node(self) -> int:
                return 7

            def node_operator(self) -> str:
                return "Resize"

            def desc(self) -> str:
                return "unsupported mode"

        class Parser:
            def __init__(self, network: Any, logger: Any) -> None:
                self.num_errors = 0 if fake.parse_ok else 1

            def parse_from_file(self, path: str) -> bool:
                fake.calls.append(("parse_from_file", Path(path).name))
                return fake.parse_ok

            def get_error(self, i: int) -> Error:
                return Error()

        class Cache:
            def __init__(self, blob: bytes) -> None:
                self.blob = blob

            def serialize(self) -> bytes:
                return b"CACHE:" + self.blob

        class Config:
            hardware_compatibility_level = None

            def set_memory_pool_limit(self, pool: int, size: int) -> None:
                fake.calls.append(("set_memory_pool_limit", pool, size))

            def add_optimization_profile(self, profile: Any) -> None:
                fake.calls.append(("add_optimization_profile", profile.shape))

            def set_flag(self, flag: int) -> None:
                fake.calls.append(("set_flag", flag))

            def create_timing_cache(self, blob: bytes) -> Cache:
                return Cache(bytes(blob))

            def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
                self.cache = cache
                return True

            def get_timing_cache(self) -> Cache:
                return self.cache

        class Profile:
            def set_shape(self, name: str, lo: list[int], opt: list[int], hi: list[int]) -> None:
                self.shape = (name, lo, opt, hi)

        class Builder:
            def __init__(self, logger: Any) -> None:
                pass

            def create_network(self, flags: int) -> str:
                fake.calls.append(("create_network", flags))
                return "network"

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Any, config: Config) -> bytes:
                fake.config = config
                return b"PLAN"

        self.Logger, self.OnnxParser, self.Builder = Logger, Parser, Builder
        self.NetworkDefinitionCreationFlag = type("F", (), {"STRONGLY_TYPED": 0})
        self.MemoryPoolType = type("M", (), {"WORKSPACE": 0})
        self.BuilderFlag = type("B", (), {"VERSION_COMPATIBLE": 13})
        self.HardwareCompatibilityLevel = type("H", (), {"AMPERE_PLUS": 1, "SAME_COMPUTE_CAPABILITY": 2})


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_build_engine_call_sequence_with_a_fake_tensorrt(
    export_tiny: Callable[..., Any], tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    """No real TensorRT here: checks the calls, the raw plan, the timing cache and the sidecar."""
    import sys

    from imas_core.artifacts import read_exported_meta
    from imas_core.runtime import GpuInfo, gpu_info
    from imas_export import ParityOptions, VerifyOptions, build_engine, trt_build, verify

    fake = _FakeTensorRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_build, "gpu_info", lambda: GpuInfo("Fake GPU", "8.6", 1))
    onnx_path = export_tiny("model.fp16.onnx", precision="fp16").path
    engine = tmp_path / "model.fp16.engine"
    (tmp_path / "timing.cache").write_bytes(b"old")
    options = EngineOptions(
        onnx=onnx_path, output=engine, workspace_gb=1, version_compatible=True, hardware_compat="ampere+"
    )
    result = build_engine(options)
    assert engine.read_bytes() == b"PLAN"  # the raw plan, never prefixed
    assert (tmp_path / "timing.cache").read_bytes() == b"CACHE:old"  # loaded, then saved back
    assert fake.calls[0] == ("create_network", 1 if version.startswith("10") else 0)
    assert ("parse_from_file", "model.fp16.onnx") in fake.calls
    assert ("set_memory_pool_limit", 0, 1 << 30) in fake.calls and ("set_flag", 13) in fake.calls
    assert ("add_optimization_profile", ("image", [1, 3, 65, 97], [4, 3, 65, 97], [8, 3, 65, 97])) in fake.calls
    assert fake.config.hardware_compatibility_level == 1
    meta = read_exported_meta(engine)
    assert meta.kind == "tensorrt" and meta.precision == "fp16" and meta.max_batch == 8
    assert meta.tensorrt["version"] == version and meta.tensorrt["compute_capability"] == "8.6"
    assert meta.tensorrt["onnx_sha256"] == read_exported_meta(onnx_path).artifact_sha256
    assert ("--stronglyTyped" in result.trtexec) is version.startswith("10")
    if gpu_info() is None:  # verify: the engine's sidecar is checked, then TensorRT is skipped with the reason
        checked = verify(
            VerifyOptions(teacher=tiny_teacher, onnx=onnx_path, engine=engine, parity=ParityOptions(num_images=2))
        )
        assert checked.skipped == {"tensorrt": "no CUDA GPU is visible"}
        assert [r.backend for r in checked.reports] == ["onnxruntime-cpu"]

    fake.parse_ok = False
    with pytest.raises(ExportError, match="node 7 \\(Resize\\): unsupported mode"):
        build_engine(options)
