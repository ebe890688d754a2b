"""WAT (Li & Liu, AAAI 2023): Hedge weights over the classes from the validation TRADES loss,
and the class-weighted TRADES loss they define.

Read from boqili/WAT, worst_class_adversarial_train.py. The decision set has C + 1 entries: the
C classes and, as their code adds ("expected training loss in the decision set"), the average
over all samples. After every epoch the validation split's TRADES loss (CE on the clean input +
beta * KL to the TRADES-attacked input, model in eval mode) is taken per entry, the costs are
summed over the epochs so far, and the weights become C * softmax(eta * cumulative cost). The
first epoch trains with every weight 1, as their code. Where their code divides a class's loss
sum by (batches x batch size) / C, an approximation of the class's sample count that overshoots
by a partial last batch, these functions take the class mean itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import attacks, kernels, losses
from ..config_values import check_range, opt
from ..runtime import amp_dtype, autocast
from ..seeding import eval_noise_seed
from .base import ClassSums, Method, MethodState, gather


@dataclass
class WATParams:
    """WAT's hyperparameter (a TrainConfig field, flag and sweep key)."""
    wat_eta: float = opt(0.1, "WAT: Hedge learning rate on the classes' cumulative validation TRADES "
                              "loss (their code's 0.1)")


def check(cfg) -> None:
    """wat_eta > 0."""
    check_range("wat_eta", cfg.wat_eta, 0.0, math.inf, low_open=True)


def initial_weights(num_classes: int, device=None) -> torch.Tensor:
    """The weights of the first epoch: [C + 1] ones (their code's start; the C classes, then the
    average-loss entry)."""
    return torch.ones(num_classes + 1, dtype=torch.float64, device=device)


def hedge_weights(cum_cost: torch.Tensor, eta: float) -> torch.Tensor:
    """Hedge (exponential weights) over the decision set: C * softmax(eta * cum_cost).

    cum_cost [C + 1]: each entry's validation cost summed over the epochs so far (the C classes,
    then the average). Returns [C + 1] weights summing to C, in cum_cost's dtype. softmax is
    exp(eta * cost) / sum exp(...) without the overflow of their code's plain exp.
    """
    num_classes = cum_cost.shape[0] - 1
    return num_classes * torch.softmax(eta * cum_cost, dim=0)


def costs_from_stats(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The decision set's costs from per-class sums and counts of a per-sample loss [C] each:
    [C + 1] = (mean loss of each class, mean loss over all samples). A class without samples
    costs 0 (it cannot be measured, so Hedge neither favours nor drops it)."""
    means = sums / counts.clamp(min=1)
    return torch.cat([means, (sums.sum() / counts.sum().clamp(min=1)).reshape(1)])


def per_sample_trades(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                      beta: float) -> torch.Tensor:
    """Per-sample TRADES loss [N] fp32: CE(logits_nat_i, y_i) + beta * KL(softmax(nat_i) ||
    softmax(adv_i)); logits [N, C]. Differentiable in both logits."""
    ce = F.cross_entropy(kernels.upcast(logits_nat), y, reduction="none")
    return ce + beta * kernels.trades_kl(logits_adv, logits_nat)


def wat_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float,
             weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    """WAT's class-weighted TRADES loss, 0-dim fp32:

        (sum_c weights[c] * sum_{i: y_i = c} l_i) / N + weights[C] * mean_i l_i,

    l = per_sample_trades(...) [N], N the batch size, weights [C + 1] (hedge_weights; the last
    entry weights the plain TRADES loss, as their code adds it): losses.weighted_trades_loss
    with sample i weighted weights[y_i] + weights[C]."""
    w = weights.to(device=y.device)
    per = gather(w[:num_classes], y) + w[num_classes]
    return losses.weighted_trades_loss(logits_nat, logits_adv, y, per, beta * per)


# ---------------------------------------------------------------------------------------------
# The run's state (fastfat.methods.base.MethodState)

def validation_costs(model: nn.Module, loader, cfg, num_classes: int, device, amp) -> torch.Tensor:
    """The decision set's costs [C + 1] float64 on the validation split: per class, and over all
    samples, the mean TRADES loss (per_sample_trades at cfg.beta) of the model in eval mode,
    attacked as the training attack does (TRADES KL, cfg.eps_train, cfg.steps, cfg.alpha()),
    as their validate(). Start noise per batch b from eval_noise_seed(cfg.seed, b, "pgd<steps>", 0),
    so a resumed run repeats it. The model's mode is restored after."""
    stats = ClassSums(num_classes, None, device)
    was_training = model.training
    model.eval()
    try:
        for b, (x, y) in enumerate(loader):
            g = torch.Generator(device=x.device).manual_seed(
                eval_noise_seed(cfg.seed, b, f"pgd{cfg.steps}", 0))
            x_adv = attacks.pgd(model, x, y, cfg.eps_train, cfg.alpha(), loss="kl", generator=g, amp=amp,
                                fold_bn=cfg.fold_bn, **attacks.train_attack_args(
                                    cfg.train_attack, cfg.steps, cfg.eps_train, cfg.nfgsm_noise))
            with torch.no_grad(), autocast(device, amp):
                logits_nat, logits_adv = model(x), model(x_adv)
            stats.add(per_sample_trades(logits_nat, logits_adv, y, cfg.beta), y)
    finally:
        model.train(was_training)
    return costs_from_stats(stats.sums, stats.counts)


class WAT(MethodState):
    """wat: TRADES whose loss weights each class (and the average) by Hedge over the validation
    split's per-class TRADES loss, updated after every epoch."""

    def __init__(self, cfg, num_classes: int, device, base: str):
        super().__init__(cfg, num_classes, device, base)
        self.weights = initial_weights(num_classes, self.device)        # [C + 1] float64
        self.cum_cost = torch.zeros(num_classes + 1, dtype=torch.float64, device=self.device)
        self.validation = None

    natural_first = True   # their code: natural_logits = model(data), then model(x_adv)

    def begin(self, model: nn.Module, validation, start_epoch: int, teacher=None) -> None:
        self.validation = validation

    def loss(self, y, logits_adv, logits_nat):
        return wat_loss(logits_nat, logits_adv, y, self.cfg.beta, self.weights, self.num_classes), self.zero()

    def end_epoch(self, epoch: int, model: nn.Module, row: dict) -> dict:
        cost = validation_costs(model, self.validation.loader, self.cfg, self.num_classes, self.device,
                                amp_dtype(self.cfg.amp, self.device))
        self.cum_cost += cost
        self.weights = hedge_weights(self.cum_cost, self.cfg.wat_eta)
        return {"wat_val_cost": cost.tolist(), "wat_weights": self.weights.tolist()}

    def state_dict(self) -> dict:
        return {"weights": self.weights, "cum_cost": self.cum_cost}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].to(self.device)
        self.cum_cost = state["cum_cost"].to(self.device)


METHOD = Method(bases={"wat": "trades"}, titles={"wat": "WAT"}, state=WAT, params=WATParams,
                check=check, needs_validation=True, official_attack_bn="eval",
                alone="its class weights follow the run's own validation split every epoch, and a "
                      "fused group holds none out",
                source="Li and Liu, AISTATS 2023; github.com/boqili/WAT")
