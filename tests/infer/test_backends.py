"""Backend selection, the ONNX Runtime runner, and the TensorRT checks (CPU parts here, the rest `gpu`)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from imas_core.artifacts import ExportedModelMeta, read_exported_meta, write_exported_meta
from imas_core.atomic import sha256_file
from imas_core.errors import ArtifactError, InferError, RuntimeUnavailable
from imas_core.runners import backend_for, open_backend, parse_device
from imas_core.runners.tensorrt_backend import check_engine_compat, rebuild_command
from imas_infer.cli import main
from tests.infer.infer_helpers import expected_logits, make_onnx, random_image


def _engine(tmp_path: Path, **trt_fields: object) -> tuple[Path, ExportedModelMeta]:
    """A fake engine file (random bytes) with a TensorRT sidecar copied from a tiny ONNX model's."""
    onnx_path = make_onnx(tmp_path / "model.onnx")
    engine = tmp_path / "model.fp16.engine"
    engine.write_bytes(np.random.default_rng(0).bytes(64))
    meta = dataclasses.replace(
        read_exported_meta(onnx_path),
        kind="tensorrt",
        precision="fp16",
        artifact_sha256=sha256_file(engine),
        tensorrt={"version": "10.3.0", "compute_capability": "8.6", "gpu": "NVIDIA A10", **trt_fields},
    )
    write_exported_meta(engine, meta)
    return engine, meta


def test_backend_from_file_type_and_override(tmp_path: Path) -> None:
    assert backend_for(Path("m.engine"), None) == "tensorrt" and backend_for(Path("m.plan"), None) == "tensorrt"
    assert backend_for(Path("teacher.safetensors"), None) == "torch"
    assert backend_for(Path("m.onnx"), None) in ("ort-cpu", "ort-cuda")
    assert backend_for(Path("m.onnx"), "ort-trt") == "ort-trt"
    with pytest.raises(InferError, match="cannot run m.engine"):
        backend_for(Path("m.engine"), "ort-cpu")
    with pytest.raises(InferError, match="unknown model type"):
        backend_for(Path("m.pt"), None)
    assert parse_device("cuda:2") == 2 and parse_device(None) == 0
    with pytest.raises(InferError, match="--device"):
        parse_device("gpu0")


def test_ort_runner_matches_numpy_on_full_and_partial_batches(onnx_model: Path) -> None:
    with open_backend(onnx_model, backend="ort-cpu", threads=1) as backend:
        assert (backend.name, backend.runtime, backend.window, backend.max_batch) == (
            "ort-cpu",
            "CPUExecutionProvider",
            (16, 24),
            8,
        )
        images = [random_image(16, 24, seed=s) for s in range(3)]
        batch = np.stack([im.transpose(2, 0, 1) for im in images]).astype(np.float32)
        out = backend.run(batch)
        assert out.dtype == np.float32 and out.shape == (3, 3, 16, 24)
        for i, im in enumerate(images):
            np.testing.assert_allclose(out[i], expected_logits(im), atol=1e-4, rtol=1e-5)
        again = backend.run(batch[:1])
        np.testing.assert_allclose(again[0], expected_logits(images[0]), atol=1e-4, rtol=1e-5)


def test_ort_checks_the_graph_against_its_sidecar(tmp_path: Path) -> None:
    model = make_onnx(tmp_path / "m.onnx", window=(16, 24))
    meta = read_exported_meta(model)
    write_exported_meta(model, dataclasses.replace(meta, window=[16, 16]))
    with pytest.raises(ArtifactError, match="sidecar window"):
        open_backend(model, backend="ort-cpu")
    write_exported_meta(model, dataclasses.replace(meta, input_name="pixels"))
    with pytest.raises(ArtifactError, match="input_name"):
        open_backend(model, backend="ort-cpu")
    (tmp_path / "m.onnx.json").unlink()
    with pytest.raises(ArtifactError, match="sidecar JSON not found"):
        open_backend(model, backend="ort-cpu")


def test_tensorrt_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    engine, _ = _engine(tmp_path)
    with pytest.raises(RuntimeUnavailable, match="TensorRT is not installed"):
        open_backend(engine)
    (tmp_path / "in").mkdir()
    assert main(["--model", str(engine), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 4
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_engine_compatibility_with_fake_versions(tmp_path: Path) -> None:
    engine, meta = _engine(tmp_path)
    check_engine_compat(engine, meta, "10.3.0.26", (8, 6))  # same version and GPU generation
    with pytest.raises(InferError, match=r"built with TensorRT 10\.3\.0, this runtime is 10\.4\.0") as err:
        check_engine_compat(engine, meta, "10.4.0", (8, 6))
    assert f"imas-export trt --onnx {tmp_path / 'model.onnx'} --output {engine} --max-batch 8" in str(err.value)
    with pytest.raises(InferError, match="compute capability 8.6 .*this GPU is 9.0"):
        check_engine_compat(engine, meta, "10.3.0", (9, 0))
    with pytest.raises(InferError, match="too old"):
        check_engine_compat(engine, meta, "8.6.1", (8, 6))
    _, portable = _engine(tmp_path, version_compatible=True, hardware_compat="ampere+")
    check_engine_compat(engine, portable, "10.7.0", (9, 0))
    with pytest.raises(InferError, match="this runtime is 11.0.0"):
        check_engine_compat(engine, portable, "11.0.0", (9, 0))
    with pytest.raises(InferError, match="this GPU is 7.5"):
        check_engine_compat(engine, portable, "10.7.0", (7, 5))
    _, bare = _engine(tmp_path, version=None)
    with pytest.raises(ArtifactError, match="tensorrt.version missing"):
        check_engine_compat(engine, bare, "10.3.0", (8, 6))
    recorded = dataclasses.replace(meta, tensorrt={**portable.tensorrt, "onnx_name": "model.fp16.onnx"})
    assert rebuild_command(engine, recorded) == (
        f"imas-export trt --onnx {tmp_path / 'model.fp16.onnx'} --output {engine} --max-batch 8 "
        "--version-compatible --hardware-compat ampere+"
    )


@pytest.mark.gpu
def test_tensorrt_backend_matches_onnxruntime(tmp_path: Path) -> None:
    """Build an engine from the tiny ONNX on this GPU, then run it through the backend and the CLI."""
    trt = pytest.importorskip("tensorrt")
    from imas_core.runners.tensorrt_backend import TensorRTBackend
    from imas_core.runtime import import_cudart

    onnx_path = make_onnx(tmp_path / "model.onnx", window=(16, 24))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 3, 16, 24), (4, 3, 16, 24), (8, 3, 16, 24))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    engine = tmp_path / "model.engine"
    engine.write_bytes(bytes(plan))
    cudart = import_cudart()
    _, props = cudart.cudaGetDeviceProperties(0)
    meta = dataclasses.replace(
        read_exported_meta(onnx_path),
        kind="tensorrt",
        artifact_sha256=sha256_file(engine),
        tensorrt={"version": trt.__version__, "compute_capability": f"{props.major}.{props.minor}"},
    )
    write_exported_meta(engine, meta)
    images = [random_image(16, 24, seed=s) for s in range(5)]
    batch = np.stack([im.transpose(2, 0, 1) for im in images]).astype(np.float32)
    with TensorRTBackend(engine, meta) as backend:
        assert backend.max_batch == 8
        for n in (5, 2, 5):
            out = backend.run(batch[:n])
            for i in range(n):
                np.testing.assert_allclose(out[i], expected_logits(images[i]), atol=1e-2, rtol=1e-3)
        with pytest.raises(InferError, match="outside the engine profile"):
            backend.run(np.zeros((9, 3, 16, 24), np.float32))


def _five_classes(meta: ExportedModelMeta) -> ExportedModelMeta:
    """The sidecar of a 5-class model: consistent with itself (names, palette), wrong for a 3-class graph."""
    return dataclasses.replace(
        meta, num_classes=5, class_names=[f"c{i}" for i in range(5)], palette=[[i, i, i] for i in range(5)]
    )


def test_ort_refuses_a_sidecar_with_another_class_count_when_opened(tmp_path: Path) -> None:
    model = make_onnx(tmp_path / "m.onnx", window=(16, 24), num_classes=3)
    write_exported_meta(model, _five_classes(read_exported_meta(model)))
    with pytest.raises(ArtifactError, match=r"m\.onnx\.json: the sidecar says 5 classes, but the graph of m\.onnx "
                                            r"outputs 3"):  # fmt: skip
        open_backend(model, backend="ort-cpu")
    assert main(["--model", str(model), "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
