"""The `fastfat` command: one module per subcommand (train, eval, sweep, report, data, theory),
each with `add_parser(subparsers)` and its console output; this file routes and turns a
UserError into one `fastfat: error:` line and exit code 2."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sys
import threading

from ..errors import UserError

SUBCOMMANDS = ("train", "eval", "sweep", "report", "data", "theory")   # modules of this package


class Parser(argparse.ArgumentParser):
    """argparse's own refusals (a flag's value not a number, a missing value, an unknown flag)
    as one `fastfat: error:` line and exit 2, as every other bad value (subcommands inherit it)."""

    def error(self, message):
        print(f"fastfat: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _negatives_attached(argv: list[str]) -> list[str]:
    """`--flag -inf` as `--flag=-inf`: argparse takes a value such as -inf, -nan or -1e5 for a
    flag of its own and refuses the line; attached, it reaches the value checks. Plain negative
    numbers (-1, -0.5) argparse reads itself, also as one of a list's values."""
    out = []
    for tok in argv:
        if (out and out[-1].startswith("--") and "=" not in out[-1] and tok.startswith("-")
                and not re.fullmatch(r"-\d+|-\d*\.\d+", tok)):
            try:
                float(tok)
            except ValueError:
                pass
            else:
                out[-1] += "=" + tok
                continue
        out.append(tok)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fastfat",
        description="Fast adversarial training for robust fairness: Madry, TRADES and FAT, "
                    "class-wise robust evaluation, eps_train x lambda sweeps.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module("." + name, __name__).add_parser(sub)
    return parser


def _interrupted_at_start(signum, frame) -> None:
    # Ctrl-C while torch and numpy import: nothing has started, and an import cut in half can
    # break the next one (numpy refuses a second load), so end here with the usual line.
    os.write(2, b"fastfat: interrupted\n")
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    quick = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if quick:
        signal.signal(signal.SIGINT, _interrupted_at_start)
    try:
        parser = build_parser()   # imports every subcommand's modules (torch)
    finally:
        if quick:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parser.parse_args(_negatives_attached(sys.argv[1:] if argv is None else list(argv)))
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
