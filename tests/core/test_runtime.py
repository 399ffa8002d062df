"""`imas_core.runtime`: version strings and compute capabilities as TensorRT, sidecars and drivers spell them."""

from __future__ import annotations

from typing import Any

import pytest

from imas_core.runtime import parse_compute_capability, parse_version


@pytest.mark.parametrize(
    "text,expected",
    [
        ("10.3.0.26", (10, 3, 0, 26)),
        ("10.13.0.35", (10, 13, 0, 35)),
        ("11", (11, 0, 0, 0)),
        ("11.0.0b1", (11, 0, 0, 1)),  # a pre-release tag counts as the fourth number
        ("8.6.1.6.post1", (8, 6, 1, 6)),  # at most four numbers
        ("", (0, 0, 0, 0)),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int, int]) -> None:
    assert parse_version(text) == expected


def test_versions_compare_numerically() -> None:
    assert parse_version("10.10.0") > parse_version("10.9.0")  # as strings, "10.10" < "10.9"
    assert parse_version("10.3") == parse_version("10.3.0.0")


@pytest.mark.parametrize(
    "value,expected",
    [
        ("8.6", (8, 6)),
        ("8.7", (8, 7)),  # Jetson Orin
        ([8, 6], (8, 6)),
        ((9, 0), (9, 0)),
        ("sm_86", (8, 6)),
        (86, (8, 6)),
        (120, (12, 0)),
        ("12.0", (12, 0)),
        (None, None),
        ("", None),
    ],
)
def test_parse_compute_capability(value: Any, expected: tuple[int, int] | None) -> None:
    assert parse_compute_capability(value) == expected
