"""The one typed loader: build frozen dataclasses from plain mappings (YAML configs, JSON sidecars), strictly.

Unknown keys are errors that suggest the closest valid key; missing required keys are errors; every value is checked
against its annotation (`int`, `float`, `bool`, `str`, `Path`, `Literal`, `tuple`, `list`, `dict`, nested
dataclasses, `X | None`, `Any`). No coercion between kinds: ``"769"`` is not an integer, ``1`` is not ``true``.
The caller chooses the error class, so a config file raises `ConfigError` and a sidecar `ArtifactError`.

One exception, for floats only: PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so
``lr: 1e-3`` (and ``--set optim.lr=1e-3``) arrives as the string ``"1e-3"``. Where the annotation is `float`, a
string that YAML 1.2 reads as a float but PyYAML leaves a string (``1e-3``, ``5E-4``, ``2.5e3``, ``+.5``) is read as
that float. Every other string stays refused: NaN, ``"0x10"``, ``"1_000"``, and quoted numbers PyYAML would have
parsed unquoted (``"0.7"``, ``"7"``, ``".inf"``), which are strings on purpose, as in a JSON sidecar. Integers
never come from strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from imas_core.errors import ConfigError, ImasError

__all__ = ["from_dict", "to_dict"]

# YAML 1.2 core schema floats (https://yaml.org/spec/1.2.2/#1022-tag-resolution) without NaN: finite or infinite
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)")
# those of them that PyYAML's YAML 1.1 resolver already turns into numbers (so a string of this form was quoted)
_YAML11_NUMBER = re.compile(r"[-+]?[0-9]+(\.[0-9]*([eE][-+][0-9]+)?)?|\.[0-9]+([eE][-+][0-9]+)?|[-+]?\.(inf|Inf|INF)")


def from_dict(cls: type, raw: Any, where: str, error: type[ImasError] = ConfigError) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and checking every value's type."""
    if not isinstance(raw, dict):
        raise error(f"{where}: expected a mapping for {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise error(f"{where}: unknown key {key!r} in {cls.__name__}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{where}: {name}", error)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(f"{where}: missing required key {name!r} in {cls.__name__}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str, error: type[ImasError]) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, error)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, error)
            except error as err:
                errors.append(str(err))
        raise error(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args or type(value) is not type(args[args.index(value)]):
            raise error(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]", error) for i, v in enumerate(value))
        if len(value) != len(args):
            raise error(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(a, v, f"{where}[{i}]", error) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]", error) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args
        return {_coerce(kt, k, f"{where} key", error): _coerce(vt, v, f"{where}[{k}]", error) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value) and not _YAML11_NUMBER.fullmatch(value):
            return float(value)  # "1e-3" -> 0.001, "1e999" -> inf
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise error(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise error(f"{where}: expected a path, got {value!r}")
        return Path(value).expanduser()
    raise error(f"{where}: unsupported annotation {tp}")  # a bug in this module, not in the file


def to_dict(cfg: Any) -> Any:
    """A YAML/JSON-safe dict of a config dataclass (Paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg
