"""CFA (Wei et al., CVPR 2023): class-wise calibrated margins (CCM) and, on TRADES, class-wise
regularisation (CCR) from the previous epoch's per-class training robust accuracy, and FAWA, a
weight average updated only in epochs whose validation worst-class robust accuracy is high enough.

Read from PKU-ML/CFA (train.py, attack.py, utils.py). With t_y the training robust accuracy of
class y in the previous epoch (the train-mode predictions on the training attack's examples):
  CCM: eps_y = (lambda1 + t_y) * eps; the step size stays alpha (their code does not scale it).
  CCR: beta_y = (lambda2 + t_y) * beta, in their normalised TRADES loss
       mean_i [CE_i + beta_y * KL_i] / (1 + beta_y).
  Both start at epoch cfa_begin (0-based; their code's `epoch >= args.begin`, 10), before which
  the radius is eps and beta is beta.
  FAWA: after each epoch, if the validation split's worst-class robust accuracy (PGD-10 at eps)
  is >= threshold, fawa <- decay * fawa + (1 - decay) * weights (the first such epoch copies the
  weights); otherwise fawa stays. CFA reports the FAWA weights.
Each epoch's log row gains train_worst_acc (min over classes of t_y) and fawa_updates.
Where we differ, and why:
  - t_y is correct_y / n_y; their code's 10 * correct_y / N equals it on balanced classes only.
  - CCR's loss is theirs times (1 + beta): their code trains TRADES (with or without CFA) on the
    loss divided by 1 + beta, a 7x smaller gradient at beta 6; here, before cfa_begin cfa-trades
    is exactly fastfat's trades, so rho against trades measures CFA, not a loss scale.
  - FAWA averages the floating-point entries of the state dict (weights, BN running statistics)
    and copies integer ones (BN's batch counter), which their code averages and truncates.
  - Before FAWA's first update their FAWA model is the random initialisation; here the run's
    evaluation then takes the trained weights (no EVAL_MODEL in the state yet).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import losses
from ..config_values import check_range, opt
from ..errors import UserError
from .base import EVAL_MODEL, ClassSums, Method, MethodState, check_epoch_count, epochs_of, gather


@dataclass
class CFAParams:
    """CFA's hyperparameters (TrainConfig fields, flags and sweep keys). Epoch counts: N >= 1
    epochs or a fraction of the run's."""
    cfa_lambda1: float = opt(0.5, "CFA: class radius (lambda1 + train robust acc of the class) * eps")
    cfa_lambda2: float = opt(0.5, "CFA on TRADES: class beta (lambda2 + train robust acc) * beta")
    cfa_begin: float = opt(10, "CFA: calibrate from this (0-based) epoch on, N or a fraction of the "
                               "epochs (theirs: 10); eps and beta before it")
    cfa_fawa: bool = opt(True, "CFA: evaluate FAWA's weight average (needs --val-per-class)")
    cfa_fawa_decay: float = opt(0.85, "CFA's FAWA decay (the paper's 0.85; their code's 0.88)")
    cfa_fawa_threshold: float = opt(0.2, "CFA's FAWA updates when the validation worst-class robust "
                                         "accuracy is >= this (the paper's 0.2; their code's 0.24)")


def check(cfg) -> None:
    """CFAParams' ranges; for a cfa-* run, a cfa_begin inside the run and FAWA's validation split."""
    for name in ("cfa_lambda1", "cfa_lambda2"):
        check_range(name, getattr(cfg, name), 0.0, math.inf)
    check_range("cfa_fawa_decay", cfg.cfa_fawa_decay, 0.0, 1.0)
    check_range("cfa_fawa_threshold", cfg.cfa_fawa_threshold, 0.0, 1.0)
    check_epoch_count("cfa_begin", cfg.cfa_begin)
    if not cfg.method.startswith("cfa-"):
        return
    begin = epochs_of(cfg.cfa_begin, cfg.epochs)
    if begin >= cfg.epochs:
        raise UserError(f"cfa_begin {cfg.cfa_begin:g}: CFA calibrates from epoch {begin + 1} on, "
                        f"but the run has {cfg.epochs} epochs; give a smaller --cfa-begin")
    if cfg.cfa_fawa and cfg.val_per_class is None:
        raise UserError(f"{cfg.method}: FAWA updates its weight average only in epochs whose "
                        f"validation worst-class robust accuracy reaches cfa_fawa_threshold; "
                        f"give --val-per-class (CFA holds out 2% of each class: 0.02) or "
                        f"turn FAWA off with --no-cfa-fawa")


def calibrated_eps(train_acc: torch.Tensor, lambda1: float, eps: float) -> torch.Tensor:
    """CCM's class radii [C]: (lambda1 + t_y) * eps from per-class training robust accuracies
    t [C] in [0, 1]; in t's dtype."""
    return (lambda1 + train_acc) * eps


def calibrated_beta(train_acc: torch.Tensor, lambda2: float, beta: float) -> torch.Tensor:
    """CCR's class betas [C]: (lambda2 + t_y) * beta."""
    return (lambda2 + train_acc) * beta


def ccr_weights(class_beta: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE weights, KL weights) [C] of CCR's loss: (1 + beta) / (1 + beta_y) and
    (1 + beta) * beta_y / (1 + beta_y), i.e. CFA's normalised weights scaled by 1 + beta, so that
    beta_y = beta gives TRADES' CE + beta * KL."""
    scale = (1 + beta) / (1 + class_beta)
    return scale, scale * class_beta


def fawa_update(fawa: dict | None, weights: dict, decay: float) -> dict:
    """FAWA's step: decay * fawa + (1 - decay) * weights for every floating-point entry of the
    state dicts (integer entries copied from weights); a copy of weights when fawa is None (the
    first update). Returns a new dict of detached tensors."""
    out = {}
    for k, w in weights.items():
        w = w.detach()
        if fawa is None or not w.is_floating_point():
            out[k] = w.clone()
        else:
            out[k] = fawa[k] * decay + w * (1 - decay)
    return out


class CFA(MethodState):
    """cfa-madry (CCM + FAWA) and cfa-trades (CCM + CCR + FAWA)."""

    def __init__(self, cfg, num_classes: int, device, base: str):
        super().__init__(cfg, num_classes, device, base)
        self.calibrate_from = epochs_of(cfg.cfa_begin, cfg.epochs)
        self.train_acc: torch.Tensor | None = None   # [C] float64, the last epoch's t_y
        self.fawa: dict | None = None
        self.fawa_updates = 0
        self.active = False
        self.correct = ClassSums(num_classes, None, self.device)

    def start_epoch(self, epoch: int) -> None:
        self.correct = ClassSums(self.num_classes, None, self.device)
        self.active = epoch >= self.calibrate_from and self.train_acc is not None
        if self.active:
            cfg = self.cfg
            self.eps_table = calibrated_eps(self.train_acc, cfg.cfa_lambda1, cfg.eps_train)
            if self.base == "trades":
                self.ce_w, self.kl_w = ccr_weights(
                    calibrated_beta(self.train_acc, cfg.cfa_lambda2, cfg.beta), cfg.beta)

    def radii(self, y):
        if not self.active:
            return self.cfg.eps_train, self.alpha
        return gather(self.eps_table, y), self.alpha

    def loss(self, y, logits_adv, logits_nat):
        self.correct.add((logits_adv.detach().argmax(1) == y).float(), y)
        if not (self.active and self.base == "trades"):
            return self.base_loss(y, logits_adv, logits_nat)
        return (losses.weighted_trades_loss(logits_nat, logits_adv, y, gather(self.ce_w, y),
                                            gather(self.kl_w, y)), self.zero())

    def end_epoch(self, epoch: int, model: nn.Module, row: dict) -> dict:
        self.train_acc = self.correct.means()
        out = {"train_worst_acc": float(self.train_acc.min())}
        if self.cfg.cfa_fawa:
            if row["val_worst_acc"] >= self.cfg.cfa_fawa_threshold:
                self.fawa = fawa_update(self.fawa, model.state_dict(), self.cfg.cfa_fawa_decay)
                self.fawa_updates += 1
            out["fawa_updates"] = self.fawa_updates
        return out

    def state_dict(self) -> dict:
        d = {"train_acc": self.train_acc, "fawa_updates": self.fawa_updates}
        if self.fawa is not None:
            d[EVAL_MODEL] = self.fawa
        return d

    def load_state_dict(self, state: dict) -> None:
        t = state["train_acc"]
        self.train_acc = None if t is None else t.to(self.device)
        self.fawa_updates = int(state["fawa_updates"])
        fawa = state.get(EVAL_MODEL)
        self.fawa = None if fawa is None else {k: v.to(self.device) for k, v in fawa.items()}


METHOD = Method(bases={"cfa-madry": "madry", "cfa-trades": "trades"},
                titles={"cfa-madry": "CFA-Madry", "cfa-trades": "CFA-TRADES"},
                state=CFA, params=CFAParams, check=check, official_attack_bn={"cfa-madry": "train", "cfa-trades": "eval"},
                alone="its class-wise radii and betas are calibrated every epoch from the run's own "
                      "class-wise accuracy, and FAWA averages the run's own weights",
                source="Wei et al., CVPR 2023; github.com/PKU-ML/CFA")
