"""`fastfat eval`: evaluate a checkpoint, or any model's weights (--model SPEC --weights FILE
--dataset NAME), class by class, and write eval.json."""
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
                       description="Evaluate a trained checkpoint, or weights trained elsewhere "
                                   "(--model, --weights, --dataset), under several attacks and eps_test.")
    p.add_argument("--checkpoint", help="checkpoint.pt written by fastfat train")
    p.add_argument("--model", help="with --weights: FILE.py:Name, package.module:Name or a fastfat model name")
    p.add_argument("--weights", help="with --model: a state_dict file (or a dict holding one under "
                                     "state_dict / model / model_state_dict / net)")
    p.add_argument("--dataset", help="with --model: the data set whose test split to evaluate on")
    p.add_argument("--width", type=int, help="with --model: passed to the model as width= when it takes one")
    p.add_argument("--out", required=True, help="output directory for eval.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_flags(p, EvalConfig)
    p.set_defaults(func=run)


def _check_source(args) -> None:
    foreign = [f for f in ("model", "weights", "dataset") if getattr(args, f) is not None]
    if args.checkpoint is not None and foreign:
        raise UserError(f"give --checkpoint, or --model, --weights and --dataset, not both "
                        f"(--{foreign[0]} with --checkpoint)")
    if args.checkpoint is None and len(foreign) < 3:
        missing = [f"--{f}" for f in ("model", "weights", "dataset") if getattr(args, f) is None]
        raise UserError("give --checkpoint, or --model, --weights and --dataset"
                        + (f" ({', '.join(missing)} missing)" if foreign else ""))


def run(args) -> int:
    _check_source(args)
    check_writable_dir(args.out, "--out", (EVAL_JSON,))   # before the evaluation, whose results would be lost
    if args.checkpoint is not None:
        records, tcfg, ecfg = evaluate_checkpoint(args.checkpoint, given(args, EvalConfig),
                                                  progress=not args.no_progress)
        label = f"{tcfg.method} {tcfg.model} eps_train {eps_label(tcfg.eps_train)}"
    else:
        from ..backend.evaluation import evaluate_weights
        from ..backend.table import classwise_report
        from ..models.user import model_label
        records, ecfg = evaluate_weights(args.model, args.weights, args.dataset, given(args, EvalConfig),
                                         width=args.width, progress=not args.no_progress)
        label = f"{model_label(args.model)} {os.path.basename(args.weights)}"
        classwise_report(records)
    path = os.path.join(args.out, EVAL_JSON)
    print(table1_row(records, label))
    try:
        atomic_write_json(path, records)
    except UserError:
        # The disk filled during the evaluation: the results on the terminal, so the work is not lost.
        print(json.dumps(records, indent=2))
        raise
    print(f"wrote {path}")
    return 0
