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

from imas_core.artifacts import read_exported_meta, write_exported_meta
from imas_core.atomic import sha256_file
from imas_core.errors import ArtifactError, InferError
from imas_core.runners import open_backend
from imas_infer.cli import main
from tests.infer.infer_helpers import cli_args, conv_weights, expected_logits, make_onnx, random_image, save_image

WINDOW = (16, 24)
STITCHED_SIZE = (32, 48)  # 3 x 3 windows of 16x24 (stride 10x16) inside the fake stitched engine


def _fake_cudart(copies: list[tuple[int, int]]) -> Any:
    """cuda-python's runtime calls on host memory; every cudaMemcpyAsync is recorded as (kind, bytes) in `copies`."""
    keep: dict[int, Any] = {}

    def malloc(nbytes: int) -> tuple[int, int]:
        buf = (ctypes.c_uint8 * nbytes)()
        keep[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def memcpy(dst: int, src: int, nbytes: int, kind: int, stream: int) -> tuple[int]:
        ctypes.memmove(dst, src, nbytes)
        copies.append((kind, nbytes))
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
    """Runs the tiny model's 1x1 convolution on the bound buffers (and its argmax, for a `labels` output).

    A 1x1 convolution gives every pixel the same result in every window, so a whole-image "stitched" engine is
    exactly the convolution of the whole image.
    """

    def __init__(self, output: str) -> None:
        self.output = output
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
        if name == "labels":
            return (self.shape[0], *self.shape[2:])
        return (self.shape[0], 3, *self.shape[2:])

    def execute_async_v3(self, stream: int) -> bool:
        assert self.shape is not None
        count = int(np.prod(self.shape))
        x = np.frombuffer((ctypes.c_float * count).from_address(self.addresses["image"]), np.float32)
        weight, bias = conv_weights(3)
        y = np.einsum("ck,nkhw->nchw", weight, x.reshape(self.shape)) + bias[:, None, None]
        y = np.ascontiguousarray(y.argmax(1).astype(np.uint8) if self.output == "labels" else y.astype(np.float32))
        ctypes.memmove(self.addresses[self.output], y.ctypes.data, y.nbytes)
        return True


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fake engine: input (-1, 3, *hw), output `output` ("logits" or "labels"), profile batches `batches`."""
    state: dict[str, Any] = {"hw": WINDOW, "output": "logits", "batches": (1, 4, 6), "copies": []}

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return ["image", state["output"]][i]

        def get_tensor_mode(self, name: str) -> str:
            return "in" if name == "image" else "out"

        def get_tensor_dtype(self, name: str) -> str:
            return "uint8" if name == "labels" else "float"

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (-1, 3, *state["hw"])

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
            return [(n, 3, *state["hw"]) for n in state["batches"]]

        def create_execution_context(self) -> _Context:
            state["context"] = _Context(state["output"])
            return state["context"]

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.engine_host_code_allowed = False  # TensorRT's default

        def deserialize_cuda_engine(self, plan: bytes) -> Engine:
            state["host_code_allowed"] = self.engine_host_code_allowed  # as it was when deserialising
            return Engine()

    trt = types.SimpleNamespace(
        __version__="10.3.0.26",
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Runtime=Runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
        nptype=lambda dtype: np.uint8 if dtype == "uint8" else np.float32,
    )
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = _fake_cudart(state["copies"])  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", bindings.runtime)  # type: ignore[attr-defined]
    return state


def _engine(tmp_path: Path, compute_capability: str = "8.6", stitched: bool = False, **trt: Any) -> Path:
    """A fake plan with a sidecar copied from a tiny ONNX's; stitched: labels of whole 32x48 images, window 16x24."""
    kind = "labels" if stitched else "logits"
    onnx_path = make_onnx(tmp_path / "model.onnx", window=WINDOW, output_kind=kind)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"fake plan")
    meta = dataclasses.replace(
        read_exported_meta(onnx_path),
        kind="tensorrt",
        artifact_sha256=sha256_file(engine),
        tensorrt={"version": "10.3.0.26", "compute_capability": compute_capability, "onnx_name": "model.onnx", **trt},
        stitched=stitched,
        image_size=list(STITCHED_SIZE) if stitched else None,
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
    assert main(cli_args(engine, tmp_path / "in", tmp_path / "out", "--batch", "8")) == 2
    assert "exceeds the maximum batch 6" in capsys.readouterr().err
    assert main(cli_args(engine, tmp_path / "in", tmp_path / "out")) == 0
    for name, image in images.items():
        labels = np.asarray(Image.open(tmp_path / "out" / "labels" / name))
        np.testing.assert_array_equal(labels, expected_logits(image).argmax(0))


def test_wrong_gpu_is_refused_with_the_rebuild_command(tmp_path: Path, fake_trt: dict[str, Any]) -> None:
    with pytest.raises(InferError, match=r"compute capability 7\.5 .* imas-export trt --onnx .*model\.onnx"):
        open_backend(_engine(tmp_path, compute_capability="7.5"))


def test_stitched_engine_takes_whole_images_and_returns_only_labels(
    tmp_path: Path, fake_trt: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_trt.update(hw=STITCHED_SIZE, output="labels", batches=(1, 1, 2))
    images = {f"im{i}.png": random_image(*STITCHED_SIZE, seed=i) for i in range(3)}
    for name, image in images.items():
        save_image(tmp_path / "in" / name, image)
    save_image(tmp_path / "in" / "small.png", random_image(30, 48, seed=7))
    engine = _engine(tmp_path, stitched=True)
    assert main(cli_args(engine, tmp_path / "in", tmp_path / "out")) == 3  # small.png: wrong size
    captured = capsys.readouterr()
    assert "stitched 32x48, 9 windows in-graph, batch 2 images" in captured.out
    assert "small.png: 30x48 image, but model.engine is stitched for 32x48 images" in captured.err
    for name, image in images.items():
        labels = np.asarray(Image.open(tmp_path / "out" / "labels" / name))
        np.testing.assert_array_equal(labels, expected_logits(image).argmax(0))
    assert fake_trt["context"].bind_calls == 2  # (N, 3, H, W) in and (N, H, W) uint8 out, bound once
    to_host = [nbytes for kind, nbytes in fake_trt["copies"] if kind == 2]  # cudaMemcpyDeviceToHost
    assert to_host == [2 * 32 * 48, 1 * 32 * 48]  # batches of 2 and 1 images: only the uint8 label maps


def test_version_compatible_engines_may_run_host_code(tmp_path: Path, fake_trt: dict[str, Any]) -> None:
    with open_backend(_engine(tmp_path / "plain")):
        assert fake_trt["host_code_allowed"] is False
    with open_backend(_engine(tmp_path / "compat", version_compatible=True)):
        assert fake_trt["host_code_allowed"] is True  # set before deserialize_cuda_engine, as TensorRT requires


def test_a_sidecar_with_another_class_count_is_refused_when_the_engine_opens(
    tmp_path: Path, fake_trt: dict[str, Any]
) -> None:
    engine = _engine(tmp_path)  # the fake engine outputs (N, 3, h, w)
    meta = read_exported_meta(engine)
    names, palette = [f"c{i}" for i in range(5)], [[i, i, i] for i in range(5)]
    write_exported_meta(engine, dataclasses.replace(meta, num_classes=5, class_names=names, palette=palette))
    with pytest.raises(ArtifactError, match=r"model\.engine\.json: the sidecar says 5 classes, but the engine "
                                            r"model\.engine outputs 3"):  # fmt: skip
        open_backend(engine)
