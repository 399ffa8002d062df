"""Options: validation, CLI parsing, and the refusals when the model's sidecar disagrees with the request."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from imas_core.errors import InferError
from imas_core.runners.base import ModelInfo
from imas_infer.cli import build_parser, options_from_args
from imas_infer.options import InferOptions, resolve_settings


def _info(**kw: object) -> ModelInfo:
    base = ModelInfo(
        path=Path("model.onnx"),
        format="onnx",
        num_classes=3,
        class_names=("a", "b", "c"),
        palette=(),
        window=(769, 769),
        default_window=(769, 769),
        default_stride=(512, 512),
        max_batch=4,
        max_batch_is_hard=False,
        output_kind="logits",
        input_dtype="float32",
        precision="fp32",
        eval_protocol="imas",
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def _opts(**kw: object) -> InferOptions:
    return dataclasses.replace(InferOptions(Path("model.onnx"), "in", Path("out")), **kw)  # type: ignore[arg-type]


def test_defaults_come_from_the_sidecar() -> None:
    s = resolve_settings(_opts(), _info())
    assert (s.mode, s.window, s.stride, s.batch, s.softmax, s.keep_probs) == (
        "full_tiles",
        (769, 769),
        (512, 512),
        4,
        True,
        False,
    )
    s = resolve_settings(_opts(stride=(769, 769), batch=16), _info())  # a declared (soft) ONNX max batch
    assert (s.stride, s.batch) == ((769, 769), 16)
    s = resolve_settings(_opts(protocol="imas"), _info(window=None, default_window=None, max_batch=None))
    assert (s.mode, s.window, s.batch) == ("imas", (769, 769), 4)
    s = resolve_settings(_opts(whole_image=True), _info(window=None))
    assert s.mode == "whole" and not s.softmax  # one window per pixel: argmax of logits suffices


@pytest.mark.parametrize(
    "options,info,match",
    [
        ({"window": (512, 512)}, {}, "static 769x769 window"),
        ({"protocol": "imas"}, {}, "variable window sizes"),
        ({"batch": 9}, {"max_batch": 8, "max_batch_is_hard": True}, "exceeds the maximum batch 8"),
        ({"stride": (800, 800)}, {}, "exceeds window"),
        ({"save": ("cityscapes-ids",)}, {}, "19 Cityscapes"),
        ({}, {"output_kind": "labels"}, "cannot be stitched where windows overlap"),
        ({"flip": True, "whole_image": True}, {"output_kind": "labels"}, "cannot be averaged"),
        ({"save": ("probs",), "whole_image": True}, {"output_kind": "labels"}, "--save probs is impossible"),
    ],
)
def test_refusals_name_the_reason(options: dict, info: dict, match: str) -> None:
    with pytest.raises(InferError, match=match):
        resolve_settings(_opts(**options), _info(**info))


def test_labels_model_allowed_without_overlap() -> None:
    assert resolve_settings(_opts(whole_image=True), _info(output_kind="labels")).mode == "whole"
    assert resolve_settings(_opts(stride=(769, 769)), _info(output_kind="labels")).mode == "full_tiles"


@pytest.mark.parametrize(
    "options,match",
    [
        ({"input": None}, "give --input"),
        ({"synthetic": (2, 8, 8)}, "mutually exclusive"),
        ({"input": None, "synthetic": (2, 8, 8)}, "only makes sense with --benchmark"),
        ({"output": None}, "--output is required"),
        ({"whole_image": True, "protocol": "imas"}, "exclusive"),
        ({"batch": 0}, "--batch must be >= 1"),
        ({"save": ("labels", "bogus")}, "--save"),
        ({"protocol": "fast"}, "'fast' is now called 'full_tiles'"),
    ],
)
def test_validate(options: dict, match: str) -> None:
    with pytest.raises(InferError, match=match):
        _opts(**options).validate()


def test_cli_flags_map_onto_options() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "--model",
            "m.onnx",
            "--input",
            "x/",
            "--output",
            "o",
            "--window",
            "512x1024",
            "--stride",
            "256",
            "--save",
            "labels,color,labels",
            "--synthetic",
            "3",
            "64x32",
            "--benchmark",
            "--flip",
            "--no-progress",
        ]
    )
    opts = options_from_args(args, parser)
    assert opts.window == (512, 1024) and opts.stride == (256, 256)
    assert opts.save == ("labels", "color") and opts.synthetic == (3, 64, 32)
    assert opts.flip and opts.benchmark and not opts.progress and opts.model == Path("m.onnx")


def test_protocol_flag_and_its_deprecated_alias(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    base = ["--model", "m.onnx", "--input", "x/", "--output", "o"]
    assert options_from_args(parser.parse_args(base), parser).protocol == "full_tiles"
    assert options_from_args(parser.parse_args([*base, "--protocol", "imas"]), parser).protocol == "imas"
    assert capsys.readouterr().err == ""
    opts = options_from_args(parser.parse_args([*base, "--protocol", "fast"]), parser)
    assert opts.protocol == "full_tiles"
    err = capsys.readouterr().err
    assert err == "imas-infer: warning: --protocol fast is deprecated, use --protocol full_tiles\n"
    assert "[--protocol {full_tiles,imas}]" in " ".join(parser.format_usage().split())  # the alias stays unlisted


@pytest.mark.parametrize(
    "argv",
    [
        ["--input", "x"],
        ["--model", "m", "--save", "nope"],
        ["--model", "m", "--window", "a"],
        ["--model", "m", "--protocol", "quick"],
    ],
)
def test_argparse_errors_exit_2(argv: list[str]) -> None:
    from imas_infer.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
