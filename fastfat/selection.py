"""Checkpoint selection on a validation split (TrainConfig.val_per_class): a stratified hold-out
of the training set (drawn by fastfat.data.split), a cheap robust evaluation of it after every
epoch, and the best epoch's weights kept as best.pt beside the last epoch's checkpoint.pt. The
test set is never looked at.

The criterion is declared, as CFA (Wei et al., 2023) selects: the validation split's average
plus worst-class robust accuracy under cfg.val_attack (PGD-10 by default) at eps_train; ties keep
the earlier epoch.
"""
from __future__ import annotations

import json
import os

import torch.nn as nn

from .config import TrainConfig, make_eval_config
from .config_dict import to_dict
from .data import MemoryLoader
from .files import save_checkpoint

BEST = "best.pt"
CRITERION = "val_avg_acc + val_worst_acc"
VAL_BATCH = 256


class Selector:
    """Scores a model on the validation split after each epoch and says which epoch is best."""

    def __init__(self, cfg: TrainConfig, val, device):
        self.cfg, self.device, self.num_classes = cfg, device, val.num_classes
        self.loader = MemoryLoader(val, VAL_BATCH, False, device=device, channels_last=cfg.channels_last)
        self.ecfg = make_eval_config(None, attacks=[cfg.val_attack], eps_test=[cfg.eps_train],
                                     batch_size=VAL_BATCH, seed=cfg.seed, fold_bn=cfg.fold_bn)

    def evaluate(self, model: nn.Module) -> list[dict]:
        """fastfat.evaluate's records of the validation split, [clean, cfg.val_attack at
        eps_train] (class_acc, class_count, ...), also kept as self.records for the methods that
        read them after score (FRL). The model's mode is restored after."""
        from .evaluate import evaluate   # evaluate imports train, which imports this module

        was_training = model.training
        try:
            self.records = evaluate(model, self.loader, self.ecfg, self.num_classes, device=self.device)
        finally:
            model.train(was_training)
        return self.records

    def score(self, model: nn.Module) -> dict:
        """The validation numbers of one epoch, for its log row: val_clean_acc, val_avg_acc and
        val_worst_acc (robust, fractions) and val_score (the criterion). The model's mode is
        restored after; the records stay in self.records."""
        clean, robust = self.evaluate(model)
        return {"val_clean_acc": clean["avg_acc"], "val_avg_acc": robust["avg_acc"],
                "val_worst_acc": robust["worst_acc"],
                "val_score": robust["avg_acc"] + robust["worst_acc"]}

    @staticmethod
    def is_best(log: list[dict]) -> bool:
        """Whether the last row of the log scores above every earlier one (the first always does)."""
        return all(log[-1]["val_score"] > r["val_score"] for r in log[:-1])

    def save_best(self, out_dir: str, epoch: int, log: list[dict], model_state: dict) -> None:
        """best.pt: a checkpoint `fastfat eval` reads like checkpoint.pt (no optimizer state),
        with the criterion and its value."""
        os.makedirs(out_dir, exist_ok=True)
        save_checkpoint(os.path.join(out_dir, BEST), {
            "model": model_state, "optimizer": {},
            "epoch": epoch, "config": to_dict(self.cfg), "log": [json.dumps(r) for r in log],
            "selected_by": CRITERION, "val_score": log[-1]["val_score"]})
