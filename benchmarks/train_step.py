"""Training iteration cost of every method against a supervised-only step, same model and batch.

Variants: supervised, iMAS faithful and fast, U2PL, CPS and CCT (the last three driven through their `Method` classes
exactly as the training loop drives them: `step`, backward, every optimizer's step, `after_optimizer_step`).

One iteration = the step function of `imas_train.methods.imas` (forwards and losses), backward, SGD step and zero_grad,
plus the EMA update for iMAS, as in `imas_train.train`. Reported per variant: the median wall time of N timed iterations
after warm-up (variants interleaved round-robin so machine noise hits all of them alike), its ratio to the supervised
step, and the FLOPs of one iteration from `torch.utils.flop_counter.FlopCounterMode` (forward + backward
convolutions/matmuls), so the measured ratio can be held against the arithmetic one.

CutMix is forced to fire in every iMAS iteration through the config's documented ablation switch
(`adaptive_cutmix_trigger=False`, `cutmix_fixed_prob=1.0`: the U(0,1) draw is always < 1). Everything else runs as
in training: the easiness is still computed and still weights the loss, the intensity mix and the pairing. The
only work skipped is the host read of mean(e) for the trigger.

Arithmetic anchors (docs/algorithm.md §11.5, shared/methods/README.md §2), per labeled+unlabeled pair with CutMix
firing:
iMAS faithful 2 + 4x3 = 14 forward-equivalents, fast (forward_unused_weak=False) 2 + 3x3 = 11, U2PL 9, CPS 16,
supervised 3: ratios 4.67, 3.67, 3.0 and 5.33 (the aux head, run on every student input, and U2PL's heavier decoder
and representation head move them). U2PL fires CutMix every iteration here (``cutmix_prob=1``) and runs its
contrastive loss with a memory bank filled during the warm-up iterations. CCT (the DeepLabV3+ port: 12 auxiliary
decoders, abCE) is 6 forward-equivalents, ratio 2.0, plus its decoders' full-resolution outputs and the CPU contour
pass of guided cutout. Dual Teacher is 2B no-grad teacher forwards + 3B student forwards with backward = 11
forward-equivalents, ratio 3.67 (DualTeacher.md §8); its iterations alternate a CutMix epoch (teacher 1) and a
ClassMix epoch (teacher 2), so the median covers both.

Memory: each variant also runs alone in a fresh subprocess (``--memory-of VARIANT``) for its peak resident set size
(CPU) or peak allocated memory (CUDA), a few iterations long.

    python benchmarks/train_step.py                    # CPU default: R-50 at 1/4 width, 161x161, batch 2
    python benchmarks/train_step.py --full             # R-50 os16, 769x769, batch 4 (GPU; adds a bf16 row)
    python benchmarks/train_step.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from report import (
    add_common_flags,
    format_table,
    header_lines,
    median,
    scaled_model_config,
    set_threads,
    sync_fn,
    write_json,
)
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from imas_train.config import (
    CctConfig,
    CpsConfig,
    DualTeacherConfig,
    ImasConfig,
    LossConfig,
    TrainConfig,
    U2plConfig,
    load_config,
)
from imas_train.ema import EmaTeacher
from imas_train.methods import build_method
from imas_train.methods.base import StepContext, StudentForward, step_generator
from imas_train.methods.imas import imas_step
from imas_train.methods.supervised import supervised_step
from imas_train.models import build_model

NAME = "train_step"
VARIANTS = ("supervised", "imas_faithful", "imas_fast", "u2pl", "cps", "cct", "dual_teacher")
ANCHOR_RATIO = {"supervised": 1.0, "imas_faithful": 14 / 3, "imas_fast": 11 / 3, "u2pl": 9 / 3, "cps": 16 / 3,
                "cct": 6 / 3, "dual_teacher": 11 / 3}  # fmt: skip
METHOD_VARIANTS = ("u2pl", "cps", "cct", "dual_teacher")  # driven through their Method classes
TARGET_RATIO = {"imas_faithful": 4.9, "imas_fast": 3.9}  # project targets: iMAS time / supervised time, at most


def make_batches(b: int, crop: int, k: int, device: str, seed: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, k, (b, crop, crop), generator=g)
    label[:, :, : crop // 10] = 255  # some ignored pixels, as on real crops
    batch_l = {"image": torch.randn(b, 3, crop, crop, generator=g), "label": label}
    image_w = torch.randn(b, 3, crop, crop, generator=g)
    batch_u = {
        "image_w": image_w,
        "image_s": image_w + 0.5 * torch.randn(b, 3, crop, crop, generator=g),
        "valid": torch.ones(b, crop, crop, dtype=torch.bool),
        "index": torch.arange(b),
    }
    return ({k_: v.to(device) for k_, v in batch_l.items()}, {k_: v.to(device) for k_, v in batch_u.items()})


class Iterations:
    """One callable per variant, sharing the model, optimizer, teacher and batches."""

    def __init__(self, args: argparse.Namespace, device: str, autocast: Callable[[], AbstractContextManager[Any]]):
        torch.manual_seed(0)
        model = build_model(scaled_model_config(args)).to(device)
        self.model = model
        self.student = StudentForward(model).train()
        self.ema = EmaTeacher(copy.deepcopy(model))
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
        self.loss = LossConfig(supervised="ohem")
        self.imas = {
            name: ImasConfig(
                tau=0.7,
                forward_unused_weak=name == "imas_faithful",
                adaptive_cutmix_trigger=False,  # forced firing: U(0,1) < 1.0 always
                cutmix_fixed_prob=1.0,
            )
            for name in ("imas_faithful", "imas_fast")
        }
        self.batch_l, self.batch_u = make_batches(args.batch, args.crop, args.classes, device, seed=1)
        self.autocast = autocast
        self.step = 0
        self.fired: dict[str, list[float]] = {name: [] for name in self.imas}
        batch_u2 = make_batches(args.batch, args.crop, args.classes, device, seed=2)[1]
        batches = {"labeled": self.batch_l, "unlabeled": self.batch_u, "unlabeled_mix": batch_u2}
        self.methods = {
            name: MethodIteration(method_config(args, name), device, autocast, batches)
            for name in METHOD_VARIANTS
            if name in args.variants
        }

    def _update(self, loss: Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def supervised(self) -> None:
        out = supervised_step(self.student, self.batch_l, loss=self.loss, autocast=self.autocast)
        self._update(out["loss"])

    def imas_variant(self, name: str) -> None:
        self.step += 1
        out = imas_step(
            self.student,
            self.ema.module,
            self.batch_l,
            self.batch_u,
            imas=self.imas[name],
            loss=self.loss,
            generator=step_generator(2, 0, self.step),
            aux_labeled_only=False,
            autocast=self.autocast,
        )
        self.fired[name].append(float(out["cutmix_fired"]))
        self._update(out["loss"])
        self.ema.update(self.model, 0.996)

    def call(self, name: str) -> Callable[[], None]:
        if name in self.methods:
            return self.methods[name]
        return self.supervised if name == "supervised" else (lambda: self.imas_variant(name))


def method_config(args: argparse.Namespace, name: str) -> TrainConfig:
    """configs/demo.yaml turned into a `name` run of the benchmark's model, without supervised-only epochs."""
    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    loss = LossConfig(supervised="ohem")
    model = scaled_model_config(args)
    if name == "u2pl":
        sections = {"u2pl": U2plConfig(sup_only_epochs=0, reference_world_size=8, cutmix_prob=1.0)}
        model = dataclasses.replace(model, decoder="u2pl", low_level_channels=model.aspp_channels)
    elif name == "dual_teacher":
        sections = {"dual_teacher": DualTeacherConfig()}  # the official settings, drop path 0.1 on the student
    elif name == "cct":
        sections = {"cct": CctConfig(reference_world_size=8)}  # the port's 12 decoders and abCE
    else:
        sections = {"cps": CpsConfig(cps_weight=5.0, reference_world_size=8)}
    return dataclasses.replace(base, method=name, model=model, loss=loss, **sections)


class MethodIteration:
    """One iteration of a method exactly as the training loop runs it, on fixed batches."""

    def __init__(self, cfg: TrainConfig, device: str, autocast: Callable[[], AbstractContextManager[Any]], batches):
        torch.manual_seed(0)
        self.method = build_method(cfg)
        networks = self.method.build_networks(lambda: build_model(self.method.model_config(cfg.model)).to(device))
        networks = {k: m.to(device) for k, m in networks.items()}  # CCT's auxiliary decoders are built on the CPU
        self.method.setup_teachers(networks, torch.device(device))
        self.networks = networks
        self.forwards = {k: self.method.forward_adaptor(m).train() for k, m in networks.items()}
        self.optimizers = [
            torch.optim.SGD(self.method.param_groups(m, 1e-4), lr=1e-4, momentum=0.9) for m in networks.values()
        ]
        self.batches = batches
        self.device, self.autocast, self.step = torch.device(device), autocast, 0

    def __call__(self) -> None:
        self.step += 1
        epoch = self.step % 2 if self.method.name == "dual_teacher" else 1  # Dual Teacher: CutMix, ClassMix epochs
        step = epoch * 10**6 + self.step if self.method.name == "dual_teacher" else self.step  # i within the epoch
        ctx = StepContext(step, epoch, 10**6, 0, 1, self.device, step_generator(2, 0, self.step), self.autocast)
        result = self.method.step(self.forwards, self.batches, ctx)
        result.loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.method.after_optimizer_step(self.networks, ctx)


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure(args: argparse.Namespace, device: str, precision: str) -> list[dict[str, Any]]:
    import time

    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
    if precision == "bf16":

        def autocast() -> AbstractContextManager[Any]:
            return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)

    its = Iterations(args, device, autocast)
    sync = sync_fn(device)
    variants = [name for name in VARIANTS if name in args.variants]
    flops = {name: count_flops(its.call(name)) for name in variants}
    for _ in range(args.warmup):
        for name in variants:
            its.call(name)()
    sync()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # round-robin: drifting machine load hits every variant alike
        for name in variants:
            t0 = time.perf_counter()
            its.call(name)()
            sync()
            times[name].append(time.perf_counter() - t0)
    base_t, base_f = median(times["supervised"]), flops["supervised"]
    rows = []
    memory = {name: peak_memory_mb(args, name) for name in variants} if args.memory else {}
    for name in variants:
        t = median(times[name])
        fired = its.fired.get(name)
        rows.append({
            "precision": precision,
            "variant": name,
            "time_ms": 1e3 * t,
            "time_ms_all": [1e3 * x for x in times[name]],
            "time_ratio": t / base_t,
            "gflop": flops[name] / 1e9,
            "flop_ratio": flops[name] / base_f,
            "anchor_ratio": ANCHOR_RATIO[name],
            "target_ratio": TARGET_RATIO.get(name),
            "achieved_tflops": flops[name] / t / 1e12,
            "cutmix_fired_fraction": (sum(fired) / len(fired)) if fired else None,
            "peak_memory_mb": memory.get(name),
        })  # fmt: skip
    return rows


def peak_memory_mb(args: argparse.Namespace, name: str) -> float | None:
    """Peak RSS (CPU) or peak allocated CUDA memory of `name` run alone in a fresh process, in MiB."""
    cmd = [sys.executable, __file__, "--memory-of", name, "--device", args.device, "--depth", str(args.depth),
           "--base-width", str(args.base_width), "--output-stride", str(args.output_stride), "--crop", str(args.crop),
           "--batch", str(args.batch), "--classes", str(args.classes), "--threads", str(args.threads or 1)]  # fmt: skip
    if args.layers:
        cmd += ["--layers", *map(str, args.layers)]
    if args.smoke:
        cmd.append("--smoke")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"memory of {name} not measured: {out.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_memory_mb"])


def _peak_rss_mb() -> float:
    """This process's peak resident set size. Linux: VmHWM of /proc/self/status, which starts afresh at exec (the
    ru_maxrss of getrusage does not: it keeps the parent's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20


def memory_of(args: argparse.Namespace, name: str) -> int:
    """Child of `peak_memory_mb`: only `name`'s model(s) and three iterations; prints one JSON line."""
    args.variants = [name]
    its = Iterations(args, args.device, nullcontext)
    for _ in range(3):
        its.call(name)()
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mb()
    print(json.dumps({"variant": name, "peak_memory_mb": peak}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101))
    parser.add_argument("--base-width", type=int, default=16, help="64 = the real ResNet width")
    parser.add_argument("--layers", type=int, nargs=4, default=None, help="block counts override, e.g. 1 1 1 1")
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16))
    parser.add_argument("--crop", type=int, default=161)
    parser.add_argument("--batch", type=int, default=2, help="per-GPU B (labeled and unlabeled each)")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="Cityscapes settings: R-50 os16, 769x769, batch 4")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="what to time")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-variant memory runs")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    add_common_flags(parser, NAME)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.full:
        args.depth, args.base_width, args.layers, args.output_stride, args.crop, args.batch = 50, 64, None, 16, 769, 4
    if args.smoke:
        args.base_width, args.layers, args.crop, args.batch = 8, [1, 1, 1, 1], 33, 2
        # oneDNN builds kernels per new shape on first use (seconds each on 2 cores): the smoke run only checks
        # that the script works, so it uses the plain CPU convolutions
        torch.backends.mkldnn.enabled = False
        args.threads = args.threads or 1  # 2 OpenMP threads on a busy 2-core machine run several times slower
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 2)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 7)
    set_threads(args.threads)
    if args.memory_of:
        return memory_of(args, args.memory_of)
    if "supervised" not in args.variants:
        args.variants = ["supervised", *args.variants]  # every ratio is against it
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = True  # as in training (docs/algorithm.md §10, item 7)
    precisions = ["fp32", "bf16"] if cuda else ["fp32"]
    cfg = scaled_model_config(args)
    settings = {
        "model": f"R-{cfg.depth} os{cfg.output_stride} width {cfg.base_width}/64"
        + (f" layers {tuple(cfg.layers)}" if cfg.layers else ""),
        "crop": args.crop,
        "batch": args.batch,
        "classes": args.classes,
        "device": args.device,
        "precisions": precisions,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "statistic": "median wall time, variants interleaved",
        "supervised_loss": "ohem + 0.4 aux",
        "cutmix": "forced to fire (adaptive_cutmix_trigger=False, cutmix_fixed_prob=1.0)",
        "iteration": "step fn + backward + SGD step(s) + zero_grad (+ teacher update), as in imas_train.train",
        "smoke": args.smoke,
        "threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
    }
    print(header_lines(NAME, settings), flush=True)
    rows = [row for precision in precisions for row in measure(args, args.device, precision)]
    rate = "TFLOP/s" if cuda else "GFLOP/s"
    scale = 1.0 if cuda else 1e3
    table = format_table(
        [
            "precision",
            "variant",
            "ms / iter",
            "time ratio",
            "target",
            "GFLOP / iter",
            "FLOP ratio",
            "anchor ratio",
            rate,
            "CutMix fired",
            "peak MiB",
        ],  # fmt: skip
        [
            [
                r["precision"],
                r["variant"],
                r["time_ms"],
                f"{r['time_ratio']:.2f}x",
                f"<= {r['target_ratio']}x" if r["target_ratio"] else "-",
                r["gflop"],
                f"{r['flop_ratio']:.2f}x",
                f"{r['anchor_ratio']:.2f}x",
                scale * r["achieved_tflops"],
                "-" if r["cutmix_fired_fraction"] is None else f"{100 * r['cutmix_fired_fraction']:.0f}%",
                "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}",
            ]  # fmt: skip
            for r in rows
        ],
    )
    print(table, flush=True)
    notes = [
        "time ratio = median iteration time / median supervised iteration time, same run, same model and batch",
        "FLOPs: FlopCounterMode over one whole iteration (no-grad easiness forwards, training forward, backward)",
        "anchor ratio: 14/3, 11/3, 9/3, 16/3, 6/3 (CCT) and 11/3 (Dual Teacher) forward-equivalents"
        " (docs/algorithm.md §11.5, shared/methods/README.md §2),"
        " ignoring the aux head and U2PL's heavier decoder",
        "peak MiB: each variant alone in a fresh process (peak RSS on CPU, so it includes the interpreter and torch)",
        "CPU timings depend on the load (machine.load_average_1_5_15); only ratios within one run are meaningful",
    ]
    path = write_json(args.json, NAME, settings, rows, notes)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
