"""A sweep file's [only] table: some methods on part of the grid's axes.

    [only.dafa-madry]          # DAFA at the middle eps_train only, the rest of the grid in full
    eps_train = [0.1]

The grid stays a cartesian product; [only] drops the product's points of a method whose value on
an axis is not in that method's list. Each list is a subset of the grid's own axis, so a point
that [only] keeps is the very point (same key, same checkpoint) the full grid would run.

A limit on an axis the method ignores (lam for a method without a lambda, eps_train for natural
training) leaves its one point in place: that point stands for the whole axis. A grid axis given
as a flag replaces the file's list for every method, so the file's [only] limits on that axis
drop out, as do the [only] tables of methods a --method flag left out (narrowed)."""
from __future__ import annotations

from ..config import attacks_in_training, has_lambda
from ..config_values import parse_eps
from ..errors import UserError


def _norm(axis: str, value):
    """An axis value in the form two spellings of it share (8/255 and 0.0313725... alike)."""
    try:
        if axis == "eps_train":
            return round(parse_eps(value), 12)
        if axis == "lam":
            return round(float(value), 12)
    except (TypeError, ValueError, UserError):
        return value
    return value


def parse_only(table, axes: dict[str, list]) -> dict[str, dict[str, set]]:
    """[only] as {method: {axis: set of normalised values}}, checked against the grid's axes:
    a method of grid.method, an axis of the grid other than method, values the axis holds.
    UserError naming the key otherwise; {} for no [only]."""
    if table is None:
        return {}
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise UserError("only must hold one table per method, e.g. [only.dafa-madry] with "
                        "eps_train = [0.1]")
    # a table names a method, or a training attack of a grid.train_attack list ([only.fgsm-rs])
    methods = [str(m) for m in axes.get("method", []) + axes.get("train_attack", [])]
    out = {}
    for method, limits in table.items():
        if method not in methods:
            raise UserError(f"only.{method}: {method!r} is not in grid.method or grid.train_attack "
                            f"({', '.join(methods) or 'no method axis'})")
        out[method] = {}
        for axis, values in limits.items():
            if axis == "method" or axis not in axes:
                raise UserError(f"only.{method}.{axis}: not one of the grid's other axes "
                                f"({', '.join(a for a in axes if a != 'method')})")
            values = values if isinstance(values, list) else [values]
            if not values:
                raise UserError(f"only.{method}.{axis} is empty; give at least one value")
            have = {_norm(axis, v) for v in axes[axis]}
            for v in values:
                if isinstance(v, bool) or _norm(axis, v) not in have:
                    raise UserError(f"only.{method}.{axis}: {v!r} is not in grid.{axis} "
                                    f"({', '.join(map(str, axes[axis]))})")
            out[method][axis] = {_norm(axis, v) for v in values}
    return out


def narrowed(table, flagged: dict[str, list]):
    """The file's [only] table less what the grid flags replaced: limits on an axis given as a
    flag, and the tables of methods a --method flag left out (their limits would name values or
    methods the flags removed). The table as it is when it is not a table of tables (parse_only
    says why)."""
    if not flagged or not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        return table
    methods = {str(m) for m in flagged.get("method", [])}
    return {m: {a: v for a, v in limits.items() if a not in flagged}
            for m, limits in table.items() if "method" not in flagged or m in methods}


def ignored(method: str, axis: str) -> bool:
    """Whether a method has one point along the axis (lam without a lambda, eps_train for natural)."""
    return (axis == "lam" and not has_lambda(method)) or (axis == "eps_train" and not attacks_in_training(method))


def dropped(only: dict[str, dict[str, set]], coords: dict) -> bool:
    """Whether [only] leaves the grid point at these (raw) axis coordinates out: the limits of its
    method and of its training attack; limits on an axis the method ignores keep its one point (the
    grid skips the axis's other values for it)."""
    method = str(coords.get("method"))
    for axis in ("method", "train_attack"):
        limits = only.get(str(coords.get(axis)))
        if limits and any(_norm(a, coords[a]) not in vals for a, vals in limits.items()
                          if not ignored(method, a)):
            return True
    return False
