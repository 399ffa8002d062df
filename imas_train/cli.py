"""Command line of the training package: ``imas-train`` (train), ``imas-train check-data``, ``imas-train make-splits``,
``imas-train demo-scenes`` (demo scenes and their ground truth as PNG files, to try ``imas-infer --gt`` on),
``imas-train label-next`` (which unlabeled images to label next: `imas_train.label_next`).

Launch forms (docs/style.md §4.2): ``accelerate launch imas_train --config X``, ``accelerate launch -m imas_train
--config X``, ``python -m imas_train --config X``, ``torchrun --nproc_per_node N -m imas_train --config X``.
Libraries raise; this module prints the error and picks the exit code (`imas_core.errors`: 2 for an `ImasError`,
3 when ``check-data`` finds problems, 130 interrupted, 143 / 138 stopped by SIGTERM / SIGUSR1 after a checkpoint).

Under a launcher (``LOCAL_RANK`` set by torchrun and Accelerate's multi-process launchers,
``ACCELERATE_DYNAMO_BACKEND`` by every ``accelerate launch``), a training process asks Linux for SIGTERM when its
parent dies (``prctl(PR_SET_PDEATHSIG)``): a worker whose launcher was killed checkpoints and stops instead of
training on unseen. A plain ``python -m imas_train`` is left alone, so ``nohup`` runs outlive their shell.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from imas_core.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, ImasError, TrainingStopped, exit_code

__all__ = ["build_parser", "main"]

_PROG = "imas-train"
_SUBCOMMANDS = ("check-data", "make-splits", "demo-scenes", "label-next")
# The scenes configs/demo.yaml validates on (data.demo: num_val, seed, height, width; tests/train/test_demo_scenes.py
# checks they agree) and the size of its labeled split
_DEMO_SCENES = {"val": 64, "train": 16}
_DEMO_SEED, _DEMO_HEIGHT, _DEMO_WIDTH = 0, 96, 128
_DEMO_STREAMS = {"val": "val", "train": "labeled"}  # --split -> the demo dataset's seed stream
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LAUNCHER_ENV = ("LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND")  # set for the processes a launcher starts


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
        help="dotted overrides, e.g. --set optim.lr=0.02 imas.tau=0.8 (values parsed as YAML)",
    )  # fmt: skip


def build_parser(command: str = "train") -> argparse.ArgumentParser:
    """The parser of `command`: "train" (the default form), "check-data", "make-splits", "demo-scenes" or
    "label-next"."""
    if command == "label-next":
        from imas_train.label_next import add_arguments

        parser = argparse.ArgumentParser(
            prog=f"{_PROG} label-next",
            description="Rank a run's unlabeled images by how hard they stayed (iMAS easiness), write the ranked CSV "
            "and a contact sheet of the top K, and optionally new split lists that move them to the labeled list.",
        )
        add_arguments(parser)
        return parser
    if command == "demo-scenes":
        parser = argparse.ArgumentParser(
            prog=f"{_PROG} demo-scenes",
            description="Write demo scenes and their ground truth: <output>/images/<name>.png (RGB) and "
            "<output>/labels/<name>.png (class ids, what imas-infer --gt reads). The defaults are the 64 validation "
            "scenes of configs/demo.yaml, the ones the demo model is scored on.",
        )
        parser.add_argument("--output", type=Path, required=True, help="output folder (images/ and labels/ inside)")
        parser.add_argument("--split", choices=sorted(_DEMO_SCENES), default="val",
                            help="val (default): the validation scenes; train: the labeled scenes")  # fmt: skip
        parser.add_argument("--count", type=int, default=None,
                            help="number of scenes (default: configs/demo.yaml's, 64 val, 16 train)")  # fmt: skip
        parser.add_argument("--seed", type=int, default=_DEMO_SEED, help=f"data.demo.seed (default {_DEMO_SEED})")
        parser.add_argument("--height", type=int, default=_DEMO_HEIGHT, help=f"scene height (default {_DEMO_HEIGHT})")
        parser.add_argument("--width", type=int, default=_DEMO_WIDTH, help=f"scene width (default {_DEMO_WIDTH})")
        return parser
    if command == "check-data":
        parser = argparse.ArgumentParser(
            prog=f"{_PROG} check-data", description="Check every image, label and split list of a config."
        )
        _config_args(parser)
        return parser
    if command == "make-splits":
        parser = argparse.ArgumentParser(
            prog=f"{_PROG} make-splits",
            description="Write nested labeled/unlabeled split lists (<out>/<name>/{labeled,unlabeled}.txt).",
        )
        parser.add_argument("--list", dest="list_path", type=Path, required=True, help="list of all training items")
        parser.add_argument("--out", type=Path, required=True, help="output folder")
        parser.add_argument("--seed", type=int, default=0, help="permutation seed (default 0)")
        parser.add_argument(
            "--fractions", nargs="+", default=["1/16", "1/8", "1/4", "1/2"],
            help="labeled sizes: fractions (1/16, 0.125) or counts (186); default 1/16 1/8 1/4 1/2",
        )  # fmt: skip
        return parser
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Train DeepLabV3+ with iMAS under Accelerate. Other commands: "
        f"'{_PROG} check-data --config X', '{_PROG} make-splits --list all.txt --out splits/', "
        f"'{_PROG} demo-scenes --output DIR', '{_PROG} label-next --run RUN'.",
    )
    _config_args(parser)
    parser.add_argument(
        "--resume", default=None, metavar="auto|PATH",
        help="'auto': continue from <run>/state/latest if present; PATH: a checkpoint or run directory",
    )  # fmt: skip
    parser.add_argument(
        "--allow-config-change", action="store_true",
        help="with --resume: continue although the config differs from the checkpoint's in keys that change the "
        "experiment (batch size, seed, method, splits, model, ...); the differences are recorded in run.json",
    )  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=None, help="run folder (overrides run.output_dir)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start a new run in a folder that holds a previous one, deleting that run's files first (state/, "
        "easiness/, tensorboard/, teacher.*, best.*, config.yaml, run.json, easiness.png, miou.png; other files "
        "stay); without it such a run is refused",
    )  # fmt: skip
    return parser


def _size(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError) as err:
        raise ImasError(f"--fractions: {text!r} is neither a fraction (1/16, 0.125) nor a count (186)") from err
    if not 0.0 < value < 1.0:
        raise ImasError(f"--fractions: {text!r} must be in (0, 1) or an integer count")
    return value


def _die_with_launcher() -> None:
    """Under a launcher on Linux, have the kernel send SIGTERM to this process when its parent exits.

    A launcher that dies before this call leaves the worker running: the kernel cannot report a death that
    already happened, and comparing the parent PID with 1 would misfire in containers where the launcher is PID 1.
    """
    if not sys.platform.startswith("linux") or not any(name in os.environ for name in _LAUNCHER_ENV):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl in this libc: keep the default (the worker outlives the launcher)
        logging.getLogger(__name__).warning("cannot ask for SIGTERM on the launcher's death (no prctl)")


def _demo_scenes(args: argparse.Namespace) -> int:
    """``imas-train demo-scenes``: one line per stage, then the next command."""
    from imas_train.data.demo import write_scenes

    count = _DEMO_SCENES[args.split] if args.count is None else args.count
    if count < 1 or args.height < 16 or args.width < 16:
        raise ImasError(f"--count must be >= 1 and --height/--width >= 16, got {count}, {args.height}x{args.width}")
    out: Path = args.output
    print(f"demo-scenes: rendering {count} {args.split} scenes of {args.height}x{args.width} (seed {args.seed})")
    names = write_scenes(out, _DEMO_STREAMS[args.split], count, seed=args.seed, height=args.height, width=args.width)
    print(f"images: {out / 'images'} ({len(names)} RGB PNGs, {names[0]}.png ... {names[-1]}.png)")
    print(f"labels: {out / 'labels'} ({len(names)} PNGs of class ids 0-4: background, road, disc, box, triangle)")
    run = out.parent if (out.parent / "teacher.safetensors").is_file() else Path("runs/demo")
    model = run / "model.onnx"
    if not model.is_file():
        print(f"next: imas-export onnx --teacher {run / 'teacher.safetensors'} --output {model}")
    print(f"next: imas-infer --model {model} --input {out / 'images'} --output {run / 'pred'} "
          f"--gt {out / 'labels'} --save labels,color,overlay")  # fmt: skip
    return 0


def _run(command: str, args: argparse.Namespace) -> int:
    if command == "demo-scenes":
        return _demo_scenes(args)
    if command == "label-next":
        from imas_train.label_next import run_command

        for line in run_command(args):  # one line per stage, then the next command
            print(line, flush=True)
        return 0
    if command == "make-splits":
        from imas_train.data import make_splits, read_list, write_splits

        if not args.list_path.is_file():  # read_list's own message points at a config, which make-splits has none of
            raise ImasError(f"--list: file not found: {args.list_path}")
        items = [" ".join(entry.tokens) for entry in read_list(args.list_path)]
        splits = make_splits(items, [_size(f) for f in args.fractions], seed=args.seed)
        for name, digest in write_splits(args.out, splits).items():
            print(f"{args.out / name}  sha256 {digest[:16]}")
        return 0

    from imas_train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if command == "check-data":
        from imas_train.data import check_data

        report = check_data(cfg.data, cfg.model.num_classes, pretrained=cfg.model.pretrained)
        print(report.format())
        return EXIT_OK if report.ok else EXIT_PARTIAL

    from imas_train.train import train

    _die_with_launcher()
    if args.output_dir is not None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=args.output_dir))
    from tqdm.contrib.logging import logging_redirect_tqdm

    stages = logging.getLogger("imas_train")  # one line per stage, printed above the progress bar
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{_PROG}: %(message)s"))
    stages.addHandler(handler)
    stages.setLevel(logging.INFO)
    stages.propagate = False
    try:
        with logging_redirect_tqdm(loggers=[stages]):
            train(cfg, resume=args.resume, allow_config_change=args.allow_config_change, overwrite=args.overwrite)
    finally:
        stages.removeHandler(handler)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``imas-train``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in _SUBCOMMANDS else "train"
    args = build_parser(command).parse_args(argv[1:] if command != "train" else argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        return _run(command, args)
    except TrainingStopped as err:  # not a failure: the checkpoint it names resumes the run
        print(f"{_PROG}: {err}", file=sys.stderr)
        return exit_code(err)
    except ImasError as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted; resume with --resume auto", file=sys.stderr)
        return EXIT_INTERRUPTED
