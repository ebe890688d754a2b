"""The `fastfat` command. Each subcommand lives in the module that does its job and registers
itself through `add_parser(subparsers)`; this file only routes and turns UserError into one
stderr line and exit code 2."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# subcommand modules, each with add_parser(subparsers) that sets `func(args) -> int|None`
SUBCOMMANDS = ("fastfat.train", "fastfat.evaluate", "fastfat.sweep", "fastfat.report",
               "fastfat.data_convert", "fastfat.theory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastfat",
        description="Fast adversarial training for robust fairness: Madry, TRADES and FAT, "
                    "class-wise robust evaluation, eps_train x lambda sweeps.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"fastfat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastfat: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
