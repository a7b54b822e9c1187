"""The one way overrides reach a typed config: `--set key=value` strings and recipe values.

Configs are frozen dataclasses whose `__post_init__` raises `ValueError` for out-of-range values.
`apply_overrides` turns `--set key=value` strings into a new, validated config: an unknown key, a
value of the wrong type or out of range is a `DfkdError` that names the key and lists what is valid.
No torch here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar

from dfkd.errors import DfkdError

C = TypeVar("C")


def parse_set_options(items: list[str] | None, section: str = "") -> dict[str, str]:
    """`["a=1", "b=x"]` -> `{"a": "1", "b": "x"}`; an item without `=` is an error.

    With `section` (e.g. "synthesize.settings"), a key may also be written as a recipe names it
    (`synthesize.settings.nz=16`, or `settings.nz=16`), so one spelling works in both places.
    """
    prefixes = (f"{section}.", f"{section.rsplit('.', 1)[-1]}.") if section else ()
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DfkdError(f"--set {item!r} is not of the form key=value")
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        out[key] = value.strip()
    return out


def _convert(raw: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(raw, arg, key)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        if raw not in args:
            raise ValueError(f"must be one of {', '.join(map(str, args))}")
        return raw
    if origin is tuple:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        inner = args[0] if args else str
        return tuple(_convert(v.strip() if isinstance(v, str) else v, inner, key) for v in items)
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("must be true or false")
    if annotation is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError("must be an integer")
        return int(raw)
    if annotation is float:
        if isinstance(raw, bool):
            raise ValueError("must be a number")
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
    if annotation is str:
        if not isinstance(raw, str):
            raise ValueError("must be a string")
        return raw
    return raw


def apply_overrides(config: C, overrides: dict[str, Any], what: str = "setting") -> C:
    """A copy of the dataclass `config` with `overrides` converted to the field types and validated."""
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config) if f.init}  # type: ignore[arg-type]
    converted: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise DfkdError(f"unknown {what} {key!r}: valid ones are {', '.join(sorted(fields))}")
        try:
            converted[key] = _convert(raw, hints[key], key)
        except (ValueError, TypeError) as exc:
            raise DfkdError(f"{what} {key}={raw!r} is invalid: {exc}") from None
    try:
        return dataclasses.replace(config, **converted)  # type: ignore[type-var]
    except ValueError as exc:
        raise DfkdError(f"invalid {what}: {exc}") from None


def check_finite(config: Any) -> None:
    """Every float field (and float in a tuple field) of a dataclass config is finite, else a ValueError.

    Range checks such as `lr > 0` let infinity through, and NaN slips past `lr <= 0`; a NaN or
    infinite setting trains a non-finite model that may still look like a result.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"{field.name} must be a finite number, got {value}")


def config_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass config (tuples become lists)."""
    return dataclasses.asdict(config)
