"""What `imas-infer` is asked to do (`InferOptions`) and how it runs on a given model (`RunSettings`).

The CLI parses its flags into `InferOptions`, so the Python API and the CLI are the same thing. `resolve_settings`
reconciles the options with the model's sidecar (window, stride, batch, output kind) and refuses, with the reason,
every combination the model cannot serve. Tier 0: stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from imas_core.errors import InferError
from imas_core.tiling import WINDOW_PROTOCOLS, WindowProtocol

if TYPE_CHECKING:
    from imas_core.runners.base import ModelInfo

BackendName = Literal["ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "torch"]
SaveKind = Literal["labels", "cityscapes-ids", "color", "overlay", "probs"]
WindowMode = Literal["full_tiles", "imas", "whole", "stitched"]  # how a run cuts images (`RunSettings.mode`)

PROTOCOL_ALIASES = {"fast": "full_tiles"}  # deprecated spellings that `imas-infer --protocol` still accepts
BACKENDS: tuple[str, ...] = ("ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "torch")
SAVE_KINDS: tuple[str, ...] = ("labels", "cityscapes-ids", "color", "overlay", "probs")
DEFAULT_WINDOW = 769  # reference validation window (docs/algorithm.md §8); used when a dynamic-HW model records none
DEFAULT_BATCH = 4  # windows per model call when the sidecar declares no maximum
CITYSCAPES_NUM_CLASSES = 19


@dataclass(frozen=True)
class InferOptions:
    """Everything one `imas-infer` run needs; `cli.build_parser` maps each flag to one field."""

    model: Path  # model.onnx, *.engine / *.plan, or teacher.safetensors (+ teacher.json)
    input: str | None  # file, directory (recursive), glob or .txt list; None only with `synthetic`
    output: Path | None  # output root; None only with `benchmark` (then nothing is written)
    backend: BackendName | None = None  # None: chosen from the model file's type
    device: str | None = None  # "cpu", "cuda" or "cuda:N"; None: the backend's default
    protocol: WindowProtocol = "full_tiles"  # full tiles, overlaps averaged; imas = the reference (truncated, summed)
    window: tuple[int, int] | None = None  # None: the model's (sidecar) window
    stride: tuple[int, int] | None = None  # None: the sidecar stride
    batch: int | None = None  # windows (whole images for a stitched model) per model call; None: the sidecar max batch
    whole_image: bool = False  # one window per image (dynamic-HW model, or images no larger than the window)
    flip: bool = False  # horizontal-flip test-time augmentation (probabilities averaged)
    save: tuple[SaveKind, ...] = ("labels",)
    gt: Path | None = None  # ground-truth directory: adds mIoU over all images
    gt_suffix: str | None = None  # GT file name = <input stem> + suffix (default ".png"; Cityscapes automatic)
    exif_orientation: bool = True  # apply inputs' EXIF orientation, as viewers do (imas_core.images); False: stored
    threads: int | None = None  # intra-op threads; None: ONNX Runtime's default, torch on the CPU: cores - 1 (>= 1)
    readers: int = 2  # decoding threads
    writers: int = 2  # encoding/writing threads
    prefetch: int = 8  # decoded images queued ahead of the model (bounds memory)
    overlay_alpha: float = 0.5  # weight of the colour map in `overlay`
    report: Path | None = None  # JSON report path
    benchmark: bool = False  # time the model alone, then the whole pipeline
    benchmark_iters: int = 20
    warmup: int = 3
    synthetic: tuple[int, int, int] | None = None  # (N, H, W): random images instead of `input` (benchmark)
    progress: bool = True  # tqdm bar when tqdm is installed and stderr is a terminal
    shard: tuple[int, int] | None = None  # (I, N): only the inputs of shard I of N (`imas_infer.shard`)
    resume: bool | None = None  # skip inputs the manifest records as finished; None: on with --shard and --ray

    def resumes(self, ray: bool = False) -> bool:
        """Whether finished inputs are skipped: `resume` if set, else on for sharded and Ray runs without --gt."""
        if self.resume is not None:
            return self.resume
        return (ray or self.shard is not None) and self.gt is None and self.output is not None

    def validate(self) -> None:
        """Raise InferError for contradictory or out-of-range options (independent of the model)."""
        if self.input is None and self.synthetic is None:
            raise InferError("give --input (or --synthetic N HxW together with --benchmark)")
        if self.input is not None and self.synthetic is not None:
            raise InferError("--input and --synthetic are mutually exclusive")
        if self.synthetic is not None and not self.benchmark:
            raise InferError("--synthetic only makes sense with --benchmark")
        if self.output is None and not self.benchmark:
            raise InferError("--output is required (only --benchmark runs may omit it)")
        if self.gt is not None and self.input is None:
            raise InferError("--gt needs real --input images")
        if self.backend is not None and self.backend not in BACKENDS:
            raise InferError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        unknown = [s for s in self.save if s not in SAVE_KINDS]
        if unknown or not self.save:
            raise InferError(f"--save takes a comma list of {', '.join(SAVE_KINDS)}; got {','.join(self.save)!r}")
        if self.protocol not in WINDOW_PROTOCOLS:
            renamed = PROTOCOL_ALIASES.get(self.protocol)
            hint = f" ({self.protocol!r} is now called {renamed!r})" if renamed else ""
            raise InferError(f"protocol must be one of {', '.join(WINDOW_PROTOCOLS)}, got {self.protocol!r}{hint}")
        if self.whole_image and self.protocol == "imas":
            raise InferError("--whole-image and --protocol imas are exclusive: whole-image runs one window per image")
        for name, pair in (("window", self.window), ("stride", self.stride)):
            if pair is not None and min(pair) < 1:
                raise InferError(f"--{name} must be positive, got {pair[0]}x{pair[1]}")
        for name, value in (("batch", self.batch), ("threads", self.threads)):
            if value is not None and value < 1:
                raise InferError(f"--{name} must be >= 1, got {value}")
        if min(self.readers, self.writers, self.prefetch, self.benchmark_iters) < 1 or self.warmup < 0:
            raise InferError("--readers, --writers, --prefetch and --iters must be >= 1 and --warmup >= 0")
        if not 0.0 <= self.overlay_alpha <= 1.0:
            raise InferError(f"--overlay-alpha must be in [0, 1], got {self.overlay_alpha}")
        if self.synthetic is not None and min(self.synthetic) < 1:
            raise InferError(f"--synthetic needs N >= 1 and a positive size, got {self.synthetic}")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise InferError(f"--shard {self.shard[0]}/{self.shard[1]}: need N >= 1 and 0 <= I < N")
        if self.resume and (self.output is None or self.gt is not None):
            raise InferError(
                "--resume needs --output (the manifest lives there) and no --gt (skipped images would be missing "
                "from the mIoU); drop --resume or --gt"
            )


@dataclass(frozen=True)
class RunSettings:
    """Resolved sliding-window settings of one run."""

    mode: WindowMode  # a `WindowProtocol`, "whole" (one window per image) or "stitched" (the model runs the windows)
    window: tuple[int, int]  # the sliding window (whole mode: the static model window, or the default)
    stride: tuple[int, int]
    batch: int  # windows per model call; whole images for a stitched model
    flip: bool
    softmax: bool  # logits are turned into probabilities before stitching
    keep_probs: bool  # per-pixel probabilities are returned (the `probs` output)

    def describe(self) -> str:
        flip = "on" if self.flip else "off"
        if self.mode == "whole":
            return f"windows: whole image, batch {self.batch}, flip {flip}"
        if self.mode == "stitched":
            (wh, ww), (sh, sw) = self.window, self.stride
            return (
                f"windows: in the model (full_tiles protocol, window {wh}x{ww}, stride {sh}x{sw}), batch {self.batch} "
                f"images, flip {flip}"
            )
        (wh, ww), (sh, sw) = self.window, self.stride
        return f"windows: {self.mode} protocol, window {wh}x{ww}, stride {sh}x{sw}, batch {self.batch}, flip {flip}"


def resolve_settings(options: InferOptions, info: ModelInfo) -> RunSettings:
    """Combine options with the model's sidecar, refusing what the model cannot do.

    Raises:
        InferError: naming the model file, the sidecar value and the requested one.
    """
    name = info.path.name
    if info.stitched:
        return _stitched_settings(options, info)
    if options.window is not None and info.window is not None and tuple(options.window) != tuple(info.window):
        raise InferError(
            f"{name} has a static {info.window[0]}x{info.window[1]} window (sidecar) but --window "
            f"{options.window[0]}x{options.window[1]} was requested; drop --window or re-export with that window "
            "(or with a dynamic height/width)"
        )
    if options.protocol == "imas" and info.window is not None:
        raise InferError(
            f"--protocol imas needs a model that accepts variable window sizes (the reference truncates edge "
            f"windows), but {name} has a static {info.window[0]}x{info.window[1]} input; use --protocol full_tiles, "
            "re-export with a dynamic height/width, or run the teacher with --backend torch"
        )
    window = options.window or info.window or info.default_window or (DEFAULT_WINDOW, DEFAULT_WINDOW)
    stride = options.stride or info.default_stride
    if stride[0] > window[0] or stride[1] > window[1]:
        raise InferError(
            f"stride {stride[0]}x{stride[1]} exceeds window {window[0]}x{window[1]}: pixels would be missed"
        )
    batch = options.batch or info.max_batch or DEFAULT_BATCH
    if info.max_batch is not None and info.max_batch_is_hard and batch > info.max_batch:
        raise InferError(
            f"--batch {batch} exceeds the maximum batch {info.max_batch} of {name}; use --batch <= "
            f"{info.max_batch} or rebuild with a larger maximum batch"
        )
    mode: WindowMode = "whole" if options.whole_image else options.protocol
    keep_probs = "probs" in options.save
    if info.output_kind == "labels":
        _check_labels_model(options, name, mode, window, stride, keep_probs)
    if "cityscapes-ids" in options.save and info.num_classes != CITYSCAPES_NUM_CLASSES:
        raise InferError(
            f"--save cityscapes-ids needs the 19 Cityscapes train ids; {name} has {info.num_classes} classes"
        )
    softmax = info.output_kind == "logits" and (mode != "whole" or options.flip or keep_probs)
    return RunSettings(mode, tuple(window), tuple(stride), batch, options.flip, softmax, keep_probs)  # type: ignore[arg-type]


def _check_labels_model(
    options: InferOptions,
    name: str,
    mode: str,
    window: tuple[int, int],
    stride: tuple[int, int],
    keep_probs: bool,
) -> None:
    hint = "export the model with logits or probs output (imas-export onnx --output-kind logits)"
    if keep_probs:
        raise InferError(f"{name} outputs class ids, so --save probs is impossible; {hint}")
    if options.flip:
        raise InferError(f"{name} outputs class ids, which cannot be averaged for --flip; {hint}")
    if mode != "whole" and (stride[0] < window[0] or stride[1] < window[1]):
        raise InferError(
            f"{name} outputs class ids, which cannot be stitched where windows overlap (stride "
            f"{stride[0]}x{stride[1]} < window {window[0]}x{window[1]}); use --whole-image, a stride equal to the "
            f"window, or {hint}"
        )


def _stitched_settings(options: InferOptions, info: ModelInfo) -> RunSettings:
    """Settings for a stitched model: whole images per call; the windows are fixed inside its graph."""
    name, (h, w) = info.path.name, info.image_size or (0, 0)
    window = info.window or (h, w)
    stitched = (
        f"{name} is stitched: it runs the full_tiles sliding window ({window[0]}x{window[1]}) on whole {h}x{w} images"
    )
    if options.protocol == "imas":
        raise InferError(
            f"--protocol imas is not available: {stitched}; use a window export with dynamic height/width "
            "(imas-export onnx --dynamic-hw) or --backend torch with the teacher"
        )
    if options.whole_image:
        raise InferError(f"--whole-image does not apply: {stitched} already; drop it")
    stride = (int(info.default_stride[0]), int(info.default_stride[1]))
    for flag, asked, fixed in (("window", options.window, window), ("stride", options.stride, stride)):
        if asked is not None and tuple(asked) != tuple(fixed):
            raise InferError(
                f"--{flag} {asked[0]}x{asked[1]}: {stitched}, and its {flag} {fixed[0]}x{fixed[1]} was fixed at "
                f"export; drop --{flag}, or re-export (imas-export onnx --window H W --image-size H W)"
            )
    batch = options.batch or info.max_batch or 1
    if info.max_batch is not None and info.max_batch_is_hard and batch > info.max_batch:
        raise InferError(
            f"--batch {batch} exceeds the maximum of {info.max_batch} images per call of {name}; use --batch <= "
            f"{info.max_batch} or rebuild with a larger --max-batch"
        )
    keep_probs = "probs" in options.save
    if info.output_kind == "labels" and (keep_probs or options.flip):
        what = "--save probs" if keep_probs else "--flip (which averages probabilities)"
        raise InferError(
            f"{name} outputs final class ids, so {what} is impossible; re-export it with "
            "--output-kind probs (imas-export onnx --image-size ... --output-kind probs)"
        )
    if "cityscapes-ids" in options.save and info.num_classes != CITYSCAPES_NUM_CLASSES:
        raise InferError(
            f"--save cityscapes-ids needs the 19 Cityscapes train ids; {name} has {info.num_classes} classes"
        )
    return RunSettings("stitched", (int(window[0]), int(window[1])), stride, batch, options.flip, False, keep_probs)
