"""The TensorRT backend's own logic (buffers, shapes, profile checks, the CLI path) against a fake runtime.

The fakes implement only the calls the backend makes, as documented for TensorRT 10.x and cuda-python, with
"device" memory in host RAM. They check our bookkeeping, not the real API: `test_backends.py` has the `gpu` test
that runs a real engine.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imas_infer.backends import open_backend
from imas_infer.cli import main
from imas_train.artifacts import read_exported_meta, sha256_file, write_exported_meta
from imas_train.errors import InferError
from tests.infer.infer_helpers import conv_weights, expected_logits, make_onnx, random_image, save_image

WINDOW = (16, 24)


def _fake_cudart() -> Any:
    keep: dict[int, Any] = {}

    def malloc(nbytes: int) -> tuple[int, int]:
        buf = (ctypes.c_uint8 * nbytes)()
        keep[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def memcpy(dst: int, src: int, nbytes: int, kind: int, stream: int) -> tuple[int]:
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    ok = lambda *_: (0,)  # noqa: E731
    props = types.SimpleNamespace(major=8, minor=6, name=b"Fake GPU")
    return types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=0),
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2),
        cudaSetDevice=ok,
        cudaGetDeviceProperties=lambda d: (0, props),
        cudaMalloc=malloc,
        cudaMallocHost=malloc,
        cudaMemcpyAsync=memcpy,
        cudaStreamCreate=lambda: (0, 7),
        cudaStreamSynchronize=ok,
        cudaStreamDestroy=ok,
        cudaFree=ok,
        cudaFreeHost=ok,
        cudaGetErrorString=lambda e: (0, b"fake error"),
    )


class _Context:
    """Runs the tiny model's 1x1 convolution on the bound buffers."""

    def __init__(self) -> None:
        self.addresses: dict[str, int] = {}
        self.shape: tuple[int, ...] | None = None
        self.bind_calls = 0

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        self.bind_calls += 1
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        assert self.shape is not None
        return (self.shape[0], 3, *self.shape[2:])

    def execute_async_v3(self, stream: int) -> bool:
        assert self.shape is not None
        count = int(np.prod(self.shape))
        x = np.frombuffer((ctypes.c_float * count).from_address(self.addresses["image"]), np.float32)
        weight, bias = conv_weights(3)
        y = np.einsum("ck,nkhw->nchw", weight, x.reshape(self.shape)) + bias[:, None, None]
        y = np.ascontiguousarray(y, dtype=np.float32)
        ctypes.memmove(self.addresses["logits"], y.ctypes.data, y.nbytes)
        return True


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    state: dict[str, Any] = {}

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return ["image", "logits"][i]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "image" else "out"

        def get_tensor_dtype(self, name: str) -> str:
            return "float"

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, 3, *WINDOW)

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
            return [(1, 3, *WINDOW), (4, 3, *WINDOW), (6, 3, *WINDOW)]

        def create_execution_context(self) -> _Context:
            state["context"] = _Context()
            return state["context"]

    trt = types.SimpleNamespace(
        __version__="10.3.0.26",
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda plan: Engine()),
        TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
        nptype=lambda dtype: np.float32,
    )
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = _fake_cudart()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", bindings.runtime)  # type: ignore[attr-defined]
    return state


def _engine(tmp_path: Path, compute_capability: str = "8.6") -> Path:
    onnx_path = make_onnx(tmp_path / "model.onnx", window=WINDOW)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"fake plan")
    meta = dataclasses.replace(
        read_exported_meta(onnx_path),
        kind="tensorrt",
        artifact_sha256=sha256_file(engine),
        tensorrt={"version": "10.3.0.26", "compute_capability": compute_capability, "onnx_name": "model.onnx"},
    )
    write_exported_meta(engine, meta)
    return engine


def test_buffers_are_bound_once_and_partial_batches_work(tmp_path: Path, fake_trt: dict[str, Any]) -> None:
    images = [random_image(*WINDOW, seed=s) for s in range(6)]
    batch = np.stack([im.transpose(2, 0, 1) for im in images]).astype(np.float32)
    with open_backend(_engine(tmp_path)) as backend:
        assert backend.name == "tensorrt" and backend.max_batch == 6 and backend.info.max_batch_is_hard
        assert "TensorRT 10.3.0.26 on Fake GPU (sm 86)" in backend.describe()
        for n in (6, 1, 4, 6):
            out = backend.run(batch[:n])
            assert out.shape == (n, 3, *WINDOW)
            for i in range(n):
                np.testing.assert_allclose(out[i], expected_logits(images[i]), atol=1e-3)
        assert fake_trt["context"].bind_calls == 2  # input and output, once
        with pytest.raises(InferError, match="outside the engine profile"):
            backend.run(np.zeros((7, 3, *WINDOW), np.float32))


def test_cli_with_the_tensorrt_backend(tmp_path: Path, fake_trt: dict[str, Any], capsys) -> None:
    images = {f"im{i}.png": random_image(20 + 7 * i, 30, seed=i) for i in range(3)}
    for name, image in images.items():
        save_image(tmp_path / "in" / name, image)
    engine = _engine(tmp_path)
    assert (
        main(
            [
                "--model",
                str(engine),
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "out"),
                "--batch",
                "8",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "exceeds the maximum batch 6" in capsys.readouterr().err
    assert (
        main(
            [
                "--model",
                str(engine),
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 0
    )
    for name, image in images.items():
        labels = np.asarray(Image.open(tmp_path / "out" / "labels" / name))
        np.testing.assert_array_equal(labels, expected_logits(image).argmax(0))


def test_wrong_gpu_is_refused_with_the_rebuild_command(tmp_path: Path, fake_trt: dict[str, Any]) -> None:
    with pytest.raises(InferError, match=r"compute capability 7\.5 .* imas-export trt --onnx .*model\.onnx"):
        open_backend(_engine(tmp_path, compute_capability="7.5"))
