"""`imas_core.typed`: where a float is expected, strings that YAML 1.2 reads as floats but PyYAML (YAML 1.1) leaves
strings, such as ``1e-3``, are floats; nothing else is coerced."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from imas_core.errors import ArtifactError, ConfigError
from imas_core.typed import from_dict


@dataclass(frozen=True)
class Numbers:
    rate: float
    count: int = 0
    pair: tuple[float, float] = (0.0, 0.0)
    maybe: float | None = None
    name: str = ""


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 0.001), ("5E-4", 0.0005), ("1E3", 1000.0), ("-2.5e4", -25000.0), ("1.0e3", 1000.0), ("+.5", 0.5),
     ("-.5e-1", -0.05), ("1e999", math.inf)],
)  # fmt: skip
def test_yaml12_float_strings_are_floats_where_a_float_is_expected(text: str, value: float) -> None:
    cfg = from_dict(Numbers, {"rate": text, "pair": [text, 1], "maybe": text}, "cfg")
    assert cfg.rate == value and type(cfg.rate) is float
    assert cfg.pair == (value, 1.0) and cfg.maybe == value


@pytest.mark.parametrize(
    "text",
    [".nan", "nan", "inf", "Infinity", "1_000.0", "1_0e-3", "0x10", "1e", "e3", " 1e-3", "fast",
     "0.7", "7", "3.", ".5", "1.0e-3", ".inf", "-.Inf"],  # the last ones: PyYAML parses them unquoted, so quoted
)  # fmt: skip
def test_other_strings_are_still_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=f"cfg: rate: expected a number, got {text!r}"):
        from_dict(Numbers, {"rate": text}, "cfg")


def test_integers_and_strings_are_not_coerced() -> None:
    with pytest.raises(ArtifactError, match="count: expected an integer, got '1e3'"):
        from_dict(Numbers, {"rate": 1, "count": "1e3"}, "sidecar", ArtifactError)
    assert from_dict(Numbers, {"rate": 1, "name": "1e-3"}, "cfg").name == "1e-3"
    assert type(from_dict(Numbers, {"rate": 2}, "cfg").rate) is float


def test_exactly_the_strings_pyyaml_leaves_unparsed_are_read() -> None:
    """Over a grid of signs, mantissas and exponents: a float field takes a string iff YAML 1.2 reads it as a float
    and PyYAML (YAML 1.1) returned it as a string."""
    yaml = pytest.importorskip("yaml")
    grid = [
        s + m + e
        for s in ("", "+", "-")
        for m in ("1", "12", "07", "1.", "1.5", ".5")
        for e in ("", "e3", "e-3", "E+03")
    ]
    for text in [*grid, ".inf", "-.Inf", "+.INF", ".nan"]:
        loaded = yaml.safe_load(f"rate: {text}")["rate"]
        try:
            value = from_dict(Numbers, {"rate": text}, "cfg").rate
        except ConfigError:
            assert not isinstance(loaded, str), text  # PyYAML reads it as a number: as a string it was quoted
        else:
            assert isinstance(loaded, str) and value == float(text), text
