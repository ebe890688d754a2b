"""`fastfat train`: train one model as a TrainConfig says, into an output directory."""
from __future__ import annotations

import os
import sys

from .. import methods
from ..config import TrainConfig, make_train_config
from ..errors import UserError
from ..files import check_writable_dir
from ..runfiles import CHECKPOINT, RUN_FILES
from ..train import train
from .flags import add_dataclass_flags, given


def add_parser(sub) -> None:
    titles = ", ".join(methods.TITLES.values())   # every registered method, in registry order
    p = sub.add_parser("train", help=f"train one model with one method ({titles}; docs/methods.md)",
                       description="Train one model. Flags override the preset's values.")
    p.add_argument("--preset", default=None, help="paper | authors | demo: a starting point for every field")
    p.add_argument("--out", required=True, help="output directory (config.json, checkpoint.pt, log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_flags(p, TrainConfig, skip=("preset",))
    p.set_defaults(func=run)


def run(args) -> int:
    overrides = {k: v for k, v in given(args, TrainConfig).items() if k != "preset"}
    cfg = make_train_config(args.preset, **overrides)
    check_writable_dir(args.out, "--out", RUN_FILES)
    has_checkpoint = os.path.exists(os.path.join(args.out, CHECKPOINT))
    if not args.resume and has_checkpoint:
        raise UserError(f"{args.out} already holds a checkpoint; pass --resume to continue it "
                        f"or choose another --out")
    if args.resume and not has_checkpoint:
        print(f"fastfat: --resume: no checkpoint in {args.out}; starting from epoch 1", file=sys.stderr)
    _, log = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    if log:
        r = log[-1]
        print(f"trained {cfg.method} {cfg.model} on {cfg.dataset}, eps_train {cfg.eps_train:.4f}: "
              f"{r['epoch']} epochs, last loss {r['loss']:.4f}; checkpoint {os.path.join(args.out, CHECKPOINT)}")
    return 0
