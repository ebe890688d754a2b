"""Config dataclasses to and from plain dicts (JSON, TOML, checkpoints, flags), each value coerced
to its field's type with one error line naming the key."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import fields

from .config_values import parse_eps
from .errors import UserError


def to_dict(cfg) -> dict:
    """A config dataclass as a plain dict (every field)."""
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    """Build a config dataclass from a dict, coercing types; UserError on unknown keys or bad types."""
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise UserError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}; "
                        f"valid: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in d.items()})


_EPS_FIELDS = {"eps_train", "eps_test"}


def _coerce(name: str, value, tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in args if a is not type(None))
        return _coerce(name, value, tp)
    if typing.get_origin(tp) is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(name, v, inner) for v in value]
    if name in _EPS_FIELDS:
        try:
            return parse_eps(value)
        except UserError as e:
            raise UserError(f"{name}: {e}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise UserError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{name}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{name}: expected a number, got {value!r}")
        try:
            return parse_eps(value)
        except UserError as e:   # name the key: a sweep file's message names only the grid point
            raise UserError(f"{name}: {e}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value
