"""ONNX -> TensorRT engine with the TensorRT 10.x/11.x Python API (imported lazily), plus the same build as `trtexec`.

The network is strongly typed: precision comes from the ONNX itself (an fp16 graph, or int8 Q/DQ), never from
BuilderFlag.FP16/INT8 (removed in TensorRT 11). Every choice that depends on the TensorRT version lives in
`build_plan`, a pure function of the version string. The engine is written as the raw plan (never prefixed), with
a sidecar that copies the ONNX model fields and adds the build facts. A stitched ONNX (whole images, sliding
window in the graph) has a static H, W: its profile ranges over the number of images only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imas_core.artifacts import ExportedModelMeta, sidecar_path, write_exported_meta
from imas_core.atomic import atomic_write_bytes, sha256_file
from imas_core.errors import ExportError, RuntimeUnavailable
from imas_core.runtime import GpuInfo, gpu_info, import_tensorrt, parse_version
from imas_export.graph import check_onnx_artifact
from imas_export.options import DEFAULT_ENGINE_BATCH, EngineOptions
from imas_export.stages import Stage, StageCallback, StageLog

_log = logging.getLogger(__name__)
HARDWARE_COMPAT = {"none": None, "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
TRTEXEC_HARDWARE_COMPAT = {"ampere+": "ampere+", "same-cc": "sameComputeCapability"}
MIN_VERSION = (10, 0)  # the named-tensor API and STRONGLY_TYPED networks
SAME_CC_VERSION = (10, 9)  # HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY appeared in 10.9


@dataclass(frozen=True)
class EngineBuildResult:
    """What `build_engine` wrote."""

    path: Path
    sidecar: Path
    meta: ExportedModelMeta
    trtexec: str
    stages: list[Stage]


def build_plan(trt_version: str, *, version_compatible: bool, hardware_compat: str) -> dict[str, Any]:
    """Every TensorRT-version-dependent build decision, as plain data (CPU tests call this with fake versions).

    * 10.x: strong typing is opt-in, so the network is created with the STRONGLY_TYPED flag and trtexec needs
      --stronglyTyped.
    * 11.x: every network is strongly typed; the flag is deprecated and ignored, so it is not passed (no warning),
      and trtexec's --stronglyTyped is a no-op that is left out.
    * SAME_COMPUTE_CAPABILITY exists from 10.9; AMPERE_PLUS and VERSION_COMPATIBLE from 8.6.
    """
    major, minor = parse_version(trt_version)[:2]
    if (major, minor) < MIN_VERSION:
        raise ExportError(f"TensorRT {trt_version} is too old: this build uses the 10.x API; install tensorrt>=10.3")
    if hardware_compat not in HARDWARE_COMPAT:
        raise ExportError(f"hardware_compat must be one of {sorted(HARDWARE_COMPAT)}, got {hardware_compat!r}")
    if hardware_compat == "same-cc" and (major, minor) < SAME_CC_VERSION:
        raise ExportError(f"--hardware-compat same-cc needs TensorRT >= 10.9 (this is {trt_version})")
    explicit = major == 10
    return {
        "tensorrt_version": trt_version,
        "network_flags": ["STRONGLY_TYPED"] if explicit else [],
        "strongly_typed": "explicit flag" if explicit else "always (TensorRT >= 11)",
        "trtexec_strongly_typed": explicit,
        "builder_flags": ["VERSION_COMPATIBLE"] if version_compatible else [],
        "hardware_compatibility_level": HARDWARE_COMPAT[hardware_compat],
        "runtime_engine_host_code_allowed": version_compatible,  # the embedded lean runtime is host code
    }


def profile_batches(meta: ExportedModelMeta, options: EngineOptions) -> tuple[int, int, int]:
    """(min, opt, max) batch of the profile: the options, else DEFAULT_ENGINE_BATCH (whole images if stitched)."""
    defaults = DEFAULT_ENGINE_BATCH["stitched" if meta.stitched else "window"]
    given = (options.min_batch, options.opt_batch, options.max_batch)
    lo, opt, hi = (d if v is None else v for v, d in zip(given, defaults, strict=True))
    if not 1 <= lo <= opt <= hi:
        raise ExportError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
    return lo, opt, hi


def profile_shapes(meta: ExportedModelMeta, options: EngineOptions) -> dict[str, list[int]]:
    """Min/opt/max input shapes (N, 3, H, W) of the single optimisation profile.

    A stitched ONNX has a static whole-image H, W and a dynamic N of images: only the batch varies.
    """
    batches = profile_batches(meta, options)
    given = (options.min_hw, options.opt_hw, options.max_hw)
    static = meta.input_size
    if static is not None:
        if any(hw is not None and tuple(hw) != tuple(static) for hw in given):
            what = "stitched for whole images of" if meta.stitched else "a fixed"
            raise ExportError(f"{options.onnx.name} has {what} {static[0]}x{static[1]} input; drop --min/opt/max-hw")
        hws = [(int(static[0]), int(static[1]))] * 3
    else:
        hws = [hw for hw in given if hw is not None]
        if len(hws) != 3:
            raise ExportError(
                f"{options.onnx.name} has dynamic height/width: pass --min-hw, --opt-hw and --max-hw (H W)"
            )
    shapes = {
        key: [n, 3, int(hw[0]), int(hw[1])] for key, n, hw in zip(("min", "opt", "max"), batches, hws, strict=True)
    }
    for lo, hi in (("min", "opt"), ("opt", "max")):
        if any(a > b for a, b in zip(shapes[lo], shapes[hi], strict=True)):
            raise ExportError(f"profile shapes must grow from min to opt to max, got {shapes}")
    return shapes


def trtexec_command(
    options: EngineOptions, input_name: str, shapes: dict[str, list[int]], plan: dict[str, Any] | None = None
) -> str:
    """The equivalent trtexec build, for users who build on the device itself (e.g. a Jetson)."""
    strongly_typed = plan["trtexec_strongly_typed"] if plan else True  # unknown version: harmless on 11
    dims = {k: "x".join(str(d) for d in v) for k, v in shapes.items()}
    timing_cache = options.timing_cache or options.output.parent / "timing.cache"
    parts = [
        "trtexec",
        f"--onnx={options.onnx}",
        f"--saveEngine={options.output}",
        *(["--stronglyTyped"] if strongly_typed else []),
        f"--minShapes={input_name}:{dims['min']}",
        f"--optShapes={input_name}:{dims['opt']}",
        f"--maxShapes={input_name}:{dims['max']}",
        f"--memPoolSize=workspace:{round(options.workspace_gb * 1024)}M",
        f"--timingCacheFile={timing_cache}",
        *(["--versionCompatible"] if options.version_compatible else []),
    ]
    if options.hardware_compat != "none":
        parts.append(f"--hardwareCompatibilityLevel={TRTEXEC_HARDWARE_COMPAT[options.hardware_compat]}")
    return " ".join(parts + ["--skipInference"])


def _import_tensorrt(trtexec: str) -> Any:
    return import_tensorrt(
        'pip install -e ".[trt]" in the imas checkout, on a machine with an NVIDIA GPU, or build on the Jetson with '
        f"trtexec: {trtexec}"
    )


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        try:
            errors.append(f"node {err.node()} ({err.node_operator()}): {err.desc()}")
        except AttributeError:  # older bindings expose less
            errors.append(str(err))
    raise ExportError(f"TensorRT could not parse {onnx_path.name}: " + "; ".join(errors or ["unknown parser error"]))


def _gpu_or_raise(trtexec: str) -> GpuInfo:
    info = gpu_info()
    if info is None:
        raise RuntimeUnavailable(
            "no CUDA GPU is visible (the NVIDIA driver's libcuda is missing or reports no device): build on a machine "
            f"with an NVIDIA GPU, or on the Jetson with trtexec: {trtexec}"
        )
    return info


def build_engine(options: EngineOptions, on_stage: StageCallback | None = None) -> EngineBuildResult:
    """Build `options.output` (+ sidecar) from a checked ONNX artifact; see EngineOptions.

    Raises:
        ArtifactError: the ONNX does not match its sidecar (checksum, class count, output).
        TensorRTUnavailable: TensorRT or a CUDA GPU is missing (the message holds the trtexec command).
        ExportError: bad options, parser errors or a failed build.
    """
    log = StageLog(on_stage)
    onnx_meta = check_onnx_artifact(options.onnx)
    shapes = profile_shapes(onnx_meta, options)
    trtexec = trtexec_command(options, onnx_meta.input_name, shapes)
    stitched = f", stitched {shapes['opt'][2]}x{shapes['opt'][3]} (batch = images)" if onnx_meta.stitched else ""
    log.done("check", options.onnx, note=f"sha256 verified, {onnx_meta.precision}{stitched}")
    trt = _import_tensorrt(trtexec)
    gpu = _gpu_or_raise(trtexec)
    plan = build_plan(
        trt.__version__, version_compatible=options.version_compatible, hardware_compat=options.hardware_compat
    )
    trtexec = trtexec_command(options, onnx_meta.input_name, shapes, plan)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan["network_flags"]:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    _parse(trt, network, logger, options.onnx)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(onnx_meta.input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    for name in plan["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan["hardware_compatibility_level"] is not None:
        level = getattr(trt.HardwareCompatibilityLevel, plan["hardware_compatibility_level"])
        config.hardware_compatibility_level = level
    cache_path = options.timing_cache or options.output.parent / "timing.cache"
    cache_blob = cache_path.read_bytes() if cache_path.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(cache_blob), False):  # False: no foreign caches
        _log.warning("%s was made on another GPU or TensorRT version; starting a new timing cache", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    log.done("parse", note=f"TensorRT {trt.__version__}, {gpu.name} (sm {gpu.compute_capability})")

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build {options.output.name}; see the TensorRT log above")
    build_seconds = time.perf_counter() - started
    sidecar_path(options.output).unlink(missing_ok=True)
    atomic_write_bytes(options.output, bytes(serialized))
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    log.done("build", options.output, note=f"timing cache {cache_path.name}")

    tensorrt = {
        "version": trt.__version__,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "precision": onnx_meta.precision,
        "profiles": [{onnx_meta.input_name: shapes}],
        "workspace_bytes": int(options.workspace_gb * (1 << 30)),
        "build_flags": plan,
        "version_compatible": options.version_compatible,
        "hardware_compat": options.hardware_compat,
        "onnx_sha256": onnx_meta.artifact_sha256,
        "onnx_name": options.onnx.name,
        "timing_cache": str(cache_path),
        "build_seconds": round(build_seconds, 2),
        "trtexec": trtexec,
    }
    meta = dataclasses.replace(
        onnx_meta,
        kind="tensorrt",
        artifact_sha256=sha256_file(options.output),
        max_batch=shapes["max"][0],
        tensorrt=tensorrt,
    )
    sidecar = write_exported_meta(options.output, meta)
    log.done("write", sidecar)
    return EngineBuildResult(options.output, sidecar, meta, trtexec, log.stages)
