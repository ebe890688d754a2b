"""The `fastfat` command: one module per subcommand (train, eval, sweep, report, data, theory),
each with `add_parser(subparsers)` and its console output; this file routes and turns a
UserError into one `fastfat: error:` line and exit code 2."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from . import data, eval, report, sweep, theory, train

SUBCOMMANDS = (train, eval, sweep, report, data, theory)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastfat",
        description="Fast adversarial training for robust fairness: Madry, TRADES and FAT, "
                    "class-wise robust evaluation, eps_train x lambda sweeps.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
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
