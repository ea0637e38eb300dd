"""Generic typed parsing: a raw YAML value is coerced to a dataclass field's annotation or refused.

Contract: :func:`build_config` turns a mapping into a dataclass (nested dataclasses, unions, ``Literal``, enums,
fixed and variable tuples, bool / int / float / str), refusing unknown keys; every error is a
:class:`~hetmm.errors.ConfigError` that names the full key (``product_lines.mtd.matching.alphas[2]``) and what is
allowed. Range and cross-field checks are not here: they sit next to each section's dataclass
(:mod:`hetmm.config.sections`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, Literal

from hetmm.errors import ConfigError


def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Coerce ``value`` to the annotation ``hint`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(m.value) for m in hint)}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # nan passes every range check below it, inf most of them
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, key)
    raise ConfigError(f"{key}: unsupported type {hint!r}")  # pragma: no cover - programming error


def build_config(cls: type, raw: Any, key: str, **fixed: Any) -> Any:
    """``cls`` from the mapping ``raw`` (``None``: every default), each value coerced; ``fixed`` fields are given."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    kwargs = {name: _check_value(raw[name], hints[name], f"{key}.{name}") for name in raw}
    return cls(**kwargs, **fixed)


def replace_checked(obj: Any, changes: dict[str, Any], key: str) -> Any:
    """``dataclasses.replace(obj, **changes)`` with each value coerced like :func:`build_config` does
    (``[5, 3]`` -> ``(5, 3)``, ``"patch"`` -> ``MatchMode.PATCH``); ``key`` names ``obj`` in errors."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    return dataclasses.replace(obj, **{n: _check_value(v, hints[n], f"{key}.{n}") for n, v in changes.items()})
