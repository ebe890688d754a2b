"""`fastfat report`: the paper's tables and figures from a sweep's results database."""
from __future__ import annotations

import os

from ..config_values import canonical_attack, parse_eps
from ..errors import UserError
from ..files import check_writable_dir
from ..sweep.grid import default_report_dir

# Every name a report writes: report.md, report.html, a CSV and a .tex per table, a PNG per figure.
REPORT_FILES = ("report.md", "report.html", "*.csv", "*.tex", "*.png")


def write_report(db, out, attack, eps) -> list:
    """fastfat.report.report.write_report, imported when a report is written: the report
    package's pandas is 0.6 s of every `fastfat` command's start-up on the 2-core CPU."""
    from ..report.report import write_report as write
    return write(db, out, attack, eps)


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="the paper's tables and figures from a results database",
                       description="Write report.html (open it first: the answer, verdicts and "
                                   "captioned figures under the strongest attack evaluated), report.md, "
                                   "Markdown, CSV and LaTeX tables (the paper's Tables 1-4 and more) and "
                                   "PNG figures from a sweep's results database (docs/evaluation.md).")
    p.add_argument("db", metavar="DB", help="results database written by fastfat sweep")
    p.add_argument("--out", metavar="DIR", help="output directory (default: <db stem>_report/ beside DB)")
    p.add_argument("--attack", help="attack of the answer, the verdicts, Table 2 and every figure (default: "
                                    "the strongest evaluated at every eps_test: aa > apgd > cw > pgdK > fgsm)")
    p.add_argument("--eps", help="eps_test of the verdicts, Table 2 and the figures (default: the smallest)")
    p.set_defaults(func=run)


def run(args) -> int:
    attack = canonical_attack(args.attack) if args.attack else None
    eps = parse_eps(args.eps) if args.eps is not None else None
    if not os.path.isfile(args.db):
        raise UserError(f"results database not found: {args.db}")
    out = default_report_dir(args.db) if args.out is None else args.out
    check_writable_dir(out, "--out", REPORT_FILES)
    written = write_report(args.db, out, attack, eps)
    print(f"wrote {len(written)} files to {out} (start with {os.path.join(out, 'report.md')})")
    return 0
