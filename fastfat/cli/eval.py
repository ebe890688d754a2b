"""`fastfat eval`: evaluate a checkpoint class by class and write eval.json."""
from __future__ import annotations

import json
import os

from ..config import EvalConfig
from ..evaluate import eps_label, evaluate_checkpoint, table1_row
from ..errors import UserError
from ..files import atomic_write_json, check_writable_dir
from .flags import add_dataclass_flags, given

EVAL_JSON = "eval.json"


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint class by class (clean, FGSM, PGD-20, C&W)",
                       description="Evaluate a trained checkpoint under several attacks and eps_test.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by fastfat train")
    p.add_argument("--out", required=True, help="output directory for eval.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_flags(p, EvalConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    check_writable_dir(args.out, "--out", (EVAL_JSON,))   # before the evaluation, whose results would be lost
    records, tcfg, ecfg = evaluate_checkpoint(args.checkpoint, given(args, EvalConfig),
                                              progress=not args.no_progress)
    path = os.path.join(args.out, EVAL_JSON)
    print(table1_row(records, f"{tcfg.method} {tcfg.model} eps_train {eps_label(tcfg.eps_train)}"))
    try:
        atomic_write_json(path, records)
    except UserError:
        # The disk filled during the evaluation: the results on the terminal, so the work is not lost.
        print(json.dumps(records, indent=2))
        raise
    print(f"wrote {path}")
    return 0
