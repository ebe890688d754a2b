"""DAFA (Lee et al., ICLR 2024): after a warm-up, class weights from how the classes' training
adversarial examples are confused with each other; a class's weight scales its loss and its
attack radius and step.

Read from rucy74/DAFA (utils.py::calculate_class_weights, losses.py, train.py). In the last
warm-up epoch (their 1-based epoch dafa_warmup, 70 of 110) the softmax of every training
adversarial example (train-mode forward, the one the loss takes) is kept; p_ij is the mean over
class i's samples of the probability of class j. Then, for every pair i != j,
  if p_ii < p_jj (i is the harder class):  W_i += lambda * p_ij * p_jj
  else:                                    W_i -= lambda * p_ji * p_ii
starting from W = 1 (so a hard class takes weight from the easier classes it is confused with,
and the weights keep summing to C). From the next epoch on, class y's samples are attacked with
radius W_y * eps and step W_y * alpha, and W_y weights their CE: on Madry the adversarial CE, on
TRADES the natural CE (the KL term keeps beta). The epoch that sets the weights logs them
(dafa_weights, a list in its log row).
Where we differ, and why:
  - Their PGD-mode loss (madry_loss) takes, in every attack step, the class-wise step and
    projection and then a second, uniform one (step alpha, radius eps) that overrides the
    class-wise radius; it also starts from x + 0.001 * N(0, 1). That is a bug (the margin the
    paper describes never applies on Madry): dafa-madry takes the class-wise step and projection
    only, from fastfat's Madry start (uniform in the class's ball).
  - A class without training samples has a zero row (no weight moves to or from it), where their
    code's class count comes from the labels present.
  - A weight below 0 (possible only for large lambda) gives radius 0, not a negative one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels, losses
from ..config_values import check_range, opt
from ..errors import UserError
from .base import ClassSums, Method, MethodState, check_epoch_count, epochs_of, gather


@dataclass
class DAFAParams:
    """DAFA's hyperparameters (TrainConfig fields, flags and sweep keys)."""
    dafa_lambda: float = opt(1.0, "DAFA's lambda (their CIFAR-10 1.0; CIFAR-100 and STL-10 1.5)")
    dafa_warmup: float = opt(70, "DAFA: class weights from the adversarial softmax of this epoch, "
                                 "used after it; N or a fraction of the epochs (theirs: 70 of 110)")


def check(cfg) -> None:
    """DAFAParams' ranges; for a dafa-* run, a warm-up that ends inside the run."""
    check_range("dafa_lambda", cfg.dafa_lambda, 0.0, math.inf)
    check_epoch_count("dafa_warmup", cfg.dafa_warmup)
    if cfg.method.startswith("dafa-"):
        warm = epochs_of(cfg.dafa_warmup, cfg.epochs)
        if warm >= cfg.epochs:
            raise UserError(f"dafa_warmup {cfg.dafa_warmup:g}: DAFA sets its class weights after "
                            f"epoch {warm}, but the run has {cfg.epochs} epochs; give a smaller "
                            f"--dafa-warmup (an epoch count, or a fraction such as 0.64)")


def class_weights(similarity: torch.Tensor, lam: float) -> torch.Tensor:
    """DAFA's class weights [C] from the class similarity matrix similarity [C, C] (row i: the
    mean softmax of class i's adversarial examples), in similarity's dtype."""
    p = similarity
    d = torch.diagonal(p)
    harder = d[:, None] < d[None, :]                   # [i, j]: class i harder than class j
    gain = lam * p * d[None, :]                        # lambda * p_ij * p_jj
    give = lam * p.t() * d[:, None]                    # lambda * p_ji * p_ii
    delta = torch.where(harder, gain, -give)
    delta.fill_diagonal_(0)
    return 1 + delta.sum(1)


class DAFA(MethodState):
    """dafa-madry and dafa-trades."""

    def __init__(self, cfg, num_classes: int, device, base: str):
        super().__init__(cfg, num_classes, device, base)
        self.warmup = epochs_of(cfg.dafa_warmup, cfg.epochs)
        self.weights: torch.Tensor | None = None   # [C] float64 once computed
        self.collect = False
        self.probs = None

    def start_epoch(self, epoch: int) -> None:
        # the last warm-up epoch (0-based warmup - 1) gathers the statistics
        self.collect = self.weights is None and epoch == self.warmup - 1
        self.probs = ClassSums(self.num_classes, self.num_classes, self.device) if self.collect else None

    def radii(self, y):
        if self.weights is None:
            return self.cfg.eps_train, self.alpha
        w = gather(self.weights, y).clamp(min=0)
        return w * self.cfg.eps_train, w * self.alpha

    def loss(self, y, logits_adv, logits_nat):
        if self.collect:
            self.probs.add(F.softmax(kernels.upcast(logits_adv.detach()), dim=1), y)
        if self.weights is None:
            return self.base_loss(y, logits_adv, logits_nat)
        w = gather(self.weights, y)
        if self.base == "trades":
            return losses.weighted_trades_loss(logits_nat, logits_adv, y, w, self.cfg.beta), self.zero()
        return losses.weighted_ce(logits_adv, y, w), self.zero()

    def end_epoch(self, epoch: int, model: nn.Module, row: dict) -> dict:
        if not self.collect:
            return {}
        self.collect = False
        self.weights = class_weights(self.probs.means(), self.cfg.dafa_lambda)
        self.probs = None
        return {"dafa_weights": self.weights.tolist()}

    def state_dict(self) -> dict:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        w = state["weights"]
        self.weights = None if w is None else w.to(self.device)


METHOD = Method(bases={"dafa-madry": "madry", "dafa-trades": "trades"},
                titles={"dafa-madry": "DAFA-Madry", "dafa-trades": "DAFA-TRADES"},
                state=DAFA, params=DAFAParams, check=check, official_attack_bn="eval",
                alone="its class weights come from the run's own class similarities after its warm-up "
                      "and stay with that run",
                source="Lee et al., ICLR 2024; github.com/rucy74/DAFA")
