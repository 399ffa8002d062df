"""Command line of the training package: ``imas-train`` (train), ``imas-train check-data``, ``imas-train make-splits``.

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
_SUBCOMMANDS = ("check-data", "make-splits")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LAUNCHER_ENV = ("LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND")  # set for the processes a launcher starts


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
        help="dotted overrides, e.g. --set optim.lr=0.02 imas.tau=0.8 (values parsed as YAML)",
    )  # fmt: skip


def build_parser(command: str = "train") -> argparse.ArgumentParser:
    """The parser of `command`: "train" (the default form), "check-data" or "make-splits"."""
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
        f"'{_PROG} check-data --config X', '{_PROG} make-splits --list all.txt --out splits/'.",
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


def _run(command: str, args: argparse.Namespace) -> int:
    if command == "make-splits":
        from imas_train.data import make_splits, read_list, write_splits

        items = [" ".join(entry.tokens) for entry in read_list(args.list_path)]
        splits = make_splits(items, [_size(f) for f in args.fractions], seed=args.seed)
        for name, digest in write_splits(args.out, splits).items():
            print(f"{args.out / name}  sha256 {digest[:16]}")
        return 0

    from imas_train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if command == "check-data":
        from imas_train.data import check_data

        report = check_data(cfg.data, cfg.model.num_classes)
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
            train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
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
