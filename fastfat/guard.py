"""The catastrophic-overfitting guard (TrainConfig.co_guard): after every epoch, FGSM and PGD-5
robust accuracy at eps_train on one fixed batch, and a flag on an epoch whose PGD accuracy falls
by more than co_threshold (a fraction of it) below the run's best so far, and by at least
MIN_DROP (0.1, ten points).

Single-step training can collapse within an epoch: PGD accuracy drops to about 0 while FGSM
accuracy soars, the model having learnt to mask the one gradient step it is trained against
(Wong et al., 2020). The batch is held out where the run has a validation split
(val_per_class: its first GUARD_SIZE samples); otherwise it is the first GUARD_SIZE samples of the
training pool, which the model also trains on (the run says so once). co_guard "warn" records
and flags; "stop" also ends the run at the flagged epoch with the best epoch's weights as its
checkpoint (kept as co_best.pt while the run goes on), so the evaluation scores those.

Log fields of a guarded epoch: co_fgsm_acc, co_pgd_acc (fractions), co_held_out, co_flag (0: fine, 1: flagged,
2: flagged and the run stopped here, its checkpoint holding epoch co_best_epoch's weights).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

from .config import TrainConfig, make_eval_config
from .data import MemoryLoader
from .files import save_checkpoint

GUARD_SIZE = 128                      # samples scored every epoch (one batch: cheap beside an epoch)
# fastfat.evaluate's FGSM and PGD (random start, steps of eps/4): PGD-5 travels 1.25 eps, enough
# to see a collapse (PGD accuracy near 0), at a sixth of an N-FGSM epoch on 2,000 images
GUARD_ATTACKS = ("fgsm", "pgd5")
BEST = "co_best.pt"                   # the best epoch's weights, under co_guard "stop"
# A flag also needs the fall to be this large (a fraction): the batch's accuracy moves by a few
# points from epoch to epoch, a relative fall near chance level (a model not yet robust) is noise.
MIN_DROP = 0.1
FLAGGED, STOPPED = 1, 2


def flagged(log: list[dict], threshold: float) -> bool:
    """Whether the last row's co_pgd_acc is below (1 - threshold) x the best co_pgd_acc of the
    rows before it, and at least MIN_DROP below it (False for the first guarded row)."""
    before = [r["co_pgd_acc"] for r in log[:-1] if r.get("co_pgd_acc") is not None]
    if not before:
        return False
    best, now = max(before), log[-1]["co_pgd_acc"]
    return now < (1 - threshold) * best and best - now >= MIN_DROP


def stopped(log: list[dict]) -> bool:
    """Whether the run ended at a guard's stop (its last row says so)."""
    return bool(log) and log[-1].get("co_flag") == STOPPED


def build_guard(cfg: TrainConfig, device, out_dir: str | None, val=None, pool=None) -> "Guard | None":
    """cfg's guard (None when cfg.guard is "off"), its batch from the validation split `val` where
    there is one, else from the training pool (`pool`, or data.split.training_pool(cfg)); its note
    printed once on stderr."""
    if cfg.guard == "off":
        return None
    if val is None and pool is None:
        from .data.split import training_pool
        pool = training_pool(cfg)
    guard = Guard(cfg, val if val is not None else pool, device, val is not None, out_dir)
    print(guard.note(), file=sys.stderr)
    return guard


class Guard:
    """Scores the fixed batch after each epoch and flags (and, under "stop", stops) a collapse."""

    def __init__(self, cfg: TrainConfig, data, device, held_out: bool, out_dir: str | None):
        """data: the ImageSet the batch is taken from (its first GUARD_SIZE samples): the validation
        split (held_out) or the training pool."""
        self.cfg, self.device, self.out_dir = cfg, torch.device(device), out_dir
        batch = data.subset(GUARD_SIZE)
        self.num_classes, self.size = batch.num_classes, len(batch)
        self.held_out = held_out
        self.source = "validation split" if held_out else "training pool (not held out)"
        self.loader = MemoryLoader(batch, GUARD_SIZE, False, device=self.device,
                                   channels_last=cfg.channels_last)
        self.ecfg = make_eval_config(None, attacks=list(GUARD_ATTACKS), eps_test=[cfg.eps_train],
                                     batch_size=GUARD_SIZE, seed=cfg.seed, fold_bn=cfg.fold_bn)
        self.best: dict | None = None   # under "stop": the best epoch's weights (CPU copies)

    def note(self) -> str:
        """The line the run prints once: what the guard scores, on what."""
        return (f"fastfat: note: co_guard {self.cfg.guard}: FGSM and PGD-5 accuracy at eps_train on "
                f"the first {self.size} samples of the {self.source} after every epoch; an epoch "
                f"whose PGD accuracy is below {1 - self.cfg.co_threshold:g} x its best is flagged")

    def score(self, model: nn.Module) -> dict:
        """{"co_fgsm_acc", "co_pgd_acc"} of model on the batch (fractions); mode restored."""
        from .evaluate import evaluate   # evaluate imports train, which imports this module

        was_training = model.training
        try:
            records = evaluate(model, self.loader, self.ecfg, self.num_classes, device=self.device)
        finally:
            model.train(was_training)
        acc = {r["attack"]: r["avg_acc"] for r in records}
        return {"co_fgsm_acc": acc["fgsm"], "co_pgd_acc": acc[GUARD_ATTACKS[1]], "co_held_out": self.held_out}

    def check(self, log: list[dict], epoch: int, model: nn.Module) -> bool:
        """Flag log[-1] (scored by score(), 0-based `epoch`) and keep the best weights under
        "stop"; True when the run must stop here, its model then holding the best weights and the
        row saying co_flag 2 and co_best_epoch. A flagged epoch is said on stderr."""
        row = log[-1]
        is_flagged = flagged(log, self.cfg.co_threshold)
        row["co_flag"] = FLAGGED if is_flagged else 0
        best_before = max((r["co_pgd_acc"] for r in log[:-1] if r.get("co_pgd_acc") is not None), default=-1.0)
        if is_flagged:
            print(f"fastfat: warning: epoch {epoch + 1}: PGD accuracy on the guard batch fell to "
                  f"{row['co_pgd_acc']:.3f} from its best {best_before:.3f} (FGSM {row['co_fgsm_acc']:.3f}): "
                  f"catastrophic overfitting?", file=sys.stderr)
        if self.cfg.guard != "stop":
            return False
        if row["co_pgd_acc"] > best_before:
            self.best = {"epoch": epoch, "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            if self.out_dir:
                save_checkpoint(os.path.join(self.out_dir, BEST), self.best)
            return False
        if not is_flagged:
            return False
        best = self.best if self.best is not None else self._load_best()
        model.load_state_dict(best["model"])
        row["co_flag"], row["co_best_epoch"] = STOPPED, int(best["epoch"]) + 1
        return True

    def _load_best(self) -> dict:
        """The best weights of a resumed run (co_best.pt, written when that epoch was best)."""
        from .files import load_checkpoint

        return load_checkpoint(os.path.join(self.out_dir, BEST))
