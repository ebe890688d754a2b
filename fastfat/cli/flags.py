"""Command-line flags generated from the config dataclasses: one --flag per field, help from the
field's metadata, values parsed later by config_dict.from_dict (one parser for CLI, API and sweep files).
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import fields


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip=(), rename=None) -> None:
    """One --flag per field of cls, defaulting to SUPPRESS so only given flags override presets.

    Values are parsed later by from_dict (one parser for CLI, API and sweep files).
    """
    rename = rename or {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        tp = hints[f.name]
        comment = f.metadata.get("help", "").replace("%", "%%")
        if tp is bool or (typing.get_args(tp) and bool in typing.get_args(tp)):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=comment)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, dest=f.name, nargs="+", default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=comment)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=comment)


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of cls that were given on the command line."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}
