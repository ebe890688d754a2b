"""FRL (Xu et al., ICML 2021): per-class Lagrange multipliers from the validation split's clean
and boundary errors, which re-weight a TRADES fine-tuning loss (FRL-RW) and, in FRL-RWRM, also
re-scale each class's attack radius.

Read from hannxu123/fair_robust (frlrw.py, frlrmrw.py, utils_frl.py, utils_frl2.py). Before each
epoch their code evaluates the model on the validation split (clean, and PGD-20 CE at eps with
step eps/4) and per class c takes

    gap_nat[c]  = clean_err[c] - clean_err - bound_nat      (clean_err: over all samples)
    gap_bndy[c] = bndy_err[c] - bndy_err - bound_bndy       (bndy_err = clean acc - robust acc)

then steps the multipliers: lam_nat += rate_nat * gap_nat and lam_bndy += rate_bndy * gap_bndy,
each projected (clipped at 0, scaled down to sum `lim` when above it); RWRM also steps
lam_margin += rate_margin * gap_bndy, unprojected. The loss weights of class c are
1/C + lam[c] - mean(lam) (the Lagrangian's coefficient of the class's risk), normalised per batch;
RWRM's radius of class c is eps * clamp(exp(2 * lam_margin[c]), 0.98, margin_max).
Their code halves rate_nat and rate_bndy (one rate there, the boundary's twice the clean's) at
every 40th epoch, before its update; rate_margin is never halved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import losses
from ..config_values import check_range, opt
from ..errors import UserError
from .base import Method, MethodState, gather


@dataclass
class FRLParams:
    """FRL's hyperparameters (TrainConfig fields, flags and sweep keys). The bounds stay None
    for their per-method default (bounds), so a sweep's frl-rw and frl-rwrm points keep one setting."""
    frl_bound_nat: float | None = opt(None, "FRL: how far a class's clean error may exceed the average "
                                            "(tau; None: 0.1 for frl-rw, 0.07 for frl-rwrm, their code's)")
    frl_bound_bndy: float | None = opt(None, "FRL: the same for the boundary error (None: 0.1 for frl-rw, "
                                             "0.07 for frl-rwrm)")
    frl_rate_nat: float = opt(0.05, "FRL: step of the clean-error multipliers (their code's 0.05)")
    frl_rate_bndy: float = opt(0.1, "FRL: step of the boundary-error multipliers (their code: twice "
                                    "the clean step)")
    frl_rate_margin: float = opt(0.2, "FRL-RWRM: step of the radius multipliers (their code's 0.2)")
    frl_lim: float = opt(0.5, "FRL: the multipliers of each kind sum to at most this (their code's "
                              "0.5); below 1, every class keeps a positive loss weight")
    frl_margin_max: float = opt(3.0, "FRL-RWRM: the largest factor a class's radius grows by (their "
                                     "code's 3)")
    frl_batch_step: bool = opt(False, "FRL-RWRM: every sample steps the batch's largest radius x "
                                      "alpha/eps (their code: max radius / 4); off: each sample's "
                                      "own radius x alpha/eps")


def check(cfg) -> None:
    """FRLParams' ranges."""
    for name in ("frl_bound_nat", "frl_bound_bndy"):
        if getattr(cfg, name) is not None:
            check_range(name, getattr(cfg, name), 0.0, 1.0)
    for name in ("frl_rate_nat", "frl_rate_bndy", "frl_rate_margin"):
        check_range(name, getattr(cfg, name), 0.0, math.inf)
    check_range("frl_lim", cfg.frl_lim, 0.0, 1.0)
    if cfg.frl_lim == 1.0:   # 1/C + lam_c - sum(lam)/C reaches 0 for a class at lam_c = 0
        raise UserError("frl_lim must be below 1 (at 1 a class's loss weight can reach 0), got 1.0")
    check_range("frl_margin_max", cfg.frl_margin_max, 1.0, math.inf)

DEFAULT_BOUNDS = {"frl-rw": 0.1, "frl-rwrm": 0.07}   # tau of their two scripts
RATE_HALVING_EPOCHS = 40   # their code: rate1 /= 2 when the 1-based epoch is a multiple of 40
MARGIN_EXP = 2.0           # their code: exp(2 * lam_margin)
MARGIN_MIN = 0.98          # their code's lower clip of the radius factor


def bounds(cfg) -> tuple[float, float]:
    """(tau_nat, tau_bndy) of an frl-* config: frl_bound_nat / frl_bound_bndy, or where None the
    method's default (DEFAULT_BOUNDS: their scripts' 0.1 for frl-rw, 0.07 for frl-rwrm)."""
    d = DEFAULT_BOUNDS[cfg.method]
    return (d if cfg.frl_bound_nat is None else cfg.frl_bound_nat,
            d if cfg.frl_bound_bndy is None else cfg.frl_bound_bndy)


def error_rates(clean_correct: torch.Tensor, robust_correct: torch.Tensor, counts: torch.Tensor):
    """(clean_err [C], bndy_err [C], clean_err_all, bndy_err_all) from per-class counts [C] of
    correct clean predictions, correct robust predictions and samples: clean_err = 1 - clean acc,
    bndy_err = clean acc - robust acc (the samples correct only without the attack), per class
    and over all samples (0-dim). A class without samples has errors 0."""
    n = counts.clamp(min=1)
    clean_acc, robust_acc = clean_correct / n, robust_correct / n
    total = counts.sum().clamp(min=1)
    return (1 - clean_acc, clean_acc - robust_acc, 1 - clean_correct.sum() / total,
            (clean_correct.sum() - robust_correct.sum()) / total)


def gaps(class_err: torch.Tensor, total_err: torch.Tensor | float, bound: float) -> torch.Tensor:
    """The fairness constraints' violations [C]: class_err - total_err - bound (> 0: violated)."""
    return class_err - total_err - bound


def project(lam: torch.Tensor, lim: float) -> torch.Tensor:
    """Multipliers back into {lam >= 0, sum(lam) <= lim}: clip at 0, then scale down to sum lim
    when above it (their code's normalize_lambda)."""
    lam = lam.clamp(min=0)
    s = lam.sum()
    return lam * (lim / s) if s > lim else lam


def rate_at(rate: float, epoch: int) -> float:
    """rate_nat / rate_bndy at 0-based epoch: halved at every RATE_HALVING_EPOCHS-th 1-based epoch,
    as their code (the halving comes before that epoch's update)."""
    return rate / 2 ** ((epoch + 1) // RATE_HALVING_EPOCHS)


def update_multipliers(lam_nat: torch.Tensor, lam_bndy: torch.Tensor, lam_margin: torch.Tensor,
                       gap_nat: torch.Tensor, gap_bndy: torch.Tensor, *, rate_nat: float,
                       rate_bndy: float, rate_margin: float, lim: float, remargin: bool):
    """One step of the multipliers [C] each, from the gaps [C]; returns new (lam_nat, lam_bndy,
    lam_margin). lam_margin moves only with remargin (FRL-RWRM) and is not projected."""
    lam_nat = project(lam_nat + rate_nat * gap_nat, lim)
    lam_bndy = project(lam_bndy + rate_bndy * gap_bndy, lim)
    if remargin:
        lam_margin = lam_margin + rate_margin * gap_bndy
    return lam_nat, lam_bndy, lam_margin


def class_weights(lam: torch.Tensor) -> torch.Tensor:
    """Loss weights [C] from multipliers [C]: 1/C + lam[c] - mean(lam), the coefficient of class
    c's risk in the Lagrangian when the overall risk is the mean of the class risks. Positive
    while sum(lam) < 1 (project keeps it <= lim < 1)."""
    c = lam.shape[0]
    return 1.0 / c + lam - lam.sum() / c


def margin_factors(lam_margin: torch.Tensor, margin_max: float) -> torch.Tensor:
    """RWRM's per-class radius factors [C]: clamp(exp(2 * lam_margin), 0.98, margin_max)."""
    return torch.exp(MARGIN_EXP * lam_margin).clamp(MARGIN_MIN, margin_max)


def frl_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float,
             w_nat: torch.Tensor, w_bndy: torch.Tensor) -> torch.Tensor:
    """FRL's re-weighted TRADES loss, 0-dim fp32:

        sum_i w_nat[y_i] CE_i / sum_i w_nat[y_i] + beta * sum_i w_bndy[y_i] KL_i / sum_i w_bndy[y_i]

    CE_i on logits_nat, KL_i = KL(softmax(nat_i) || softmax(adv_i)); logits [N, C]; w_* [C]
    (class_weights), normalised over the batch as their code: losses.weighted_trades_loss with
    per-sample weights N w[y_i] / sum_j w[y_j]."""
    n = y.shape[0]
    wn = gather(w_nat.to(device=y.device), y)
    wb = gather(w_bndy.to(device=y.device), y)
    return losses.weighted_trades_loss(logits_nat, logits_adv, y, wn * (n / wn.sum()),
                                       wb * (beta * n / wb.sum()))


def per_sample(class_values: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * class_values[y]: a per-class factor [C] as a per-sample radius or step [N] in
    class_values' dtype (float64 stays float64: attacks.pgd rounds it to the attack's dtype, so a
    float64 run keeps it exact), on y's device; the product in float64, rounded at most once."""
    v = scale * class_values.to(device=y.device, dtype=torch.float64)
    return gather(v.to(class_values.dtype), y)


# ---------------------------------------------------------------------------------------------
# The run's state (fastfat.methods.base.MethodState)

def validation_counts(records: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean correct [C], robust correct [C], samples [C]) float64 from fastfat.evaluate's
    records of one robust attack: the clean record first, then the attack's."""
    clean, robust = records[0], records[1]
    counts = torch.tensor(clean["class_count"], dtype=torch.float64)
    hits = lambda r: counts * torch.tensor([0.0 if a is None else a for a in r["class_acc"]],
                                           dtype=torch.float64)
    return hits(clean).round(), hits(robust).round(), counts


class FRL(MethodState):
    """frl-rw and frl-rwrm: TRADES fine-tuning whose loss weights (and, for rwrm, attack radii
    per class) follow Lagrange multipliers updated from the validation split before every epoch."""

    def __init__(self, cfg, num_classes: int, device, base: str):
        super().__init__(cfg, num_classes, device, base)
        self.remargin = cfg.method == "frl-rwrm"
        z = lambda: torch.zeros(num_classes, dtype=torch.float64)
        self.lam_nat, self.lam_bndy, self.lam_margin = z(), z(), z()
        self.validation = None
        self._tables()

    def _tables(self) -> None:
        """The class tables of the multipliers, on the device: loss weights and radius factors."""
        self.w_nat = class_weights(self.lam_nat).to(self.device)
        self.w_bndy = class_weights(self.lam_bndy).to(self.device)
        self.factors = margin_factors(self.lam_margin, self.cfg.frl_margin_max).to(self.device)

    # their code: model(data) for the CE, then model(x_adv) and model(data) again for the KL; the
    # first two in their order, the third forward (a second BN update by the clean batch) not run
    natural_first = True

    def begin(self, model: nn.Module, validation, start_epoch: int, teacher=None) -> None:
        self.validation = validation
        if start_epoch == 0:   # their code updates before every epoch, the first included
            self.update(0, self.validation.evaluate(model))

    def update(self, epoch: int, records: list[dict]) -> dict:
        """Step the multipliers for 0-based `epoch` from the validation records (clean, then the
        robust attack's) of the model it starts from; returns log fields."""
        cfg = self.cfg
        tau_nat, tau_bndy = bounds(cfg)
        clean_err, bndy_err, clean_all, bndy_all = error_rates(*validation_counts(records))
        self.lam_nat, self.lam_bndy, self.lam_margin = update_multipliers(
            self.lam_nat, self.lam_bndy, self.lam_margin,
            gaps(clean_err, clean_all, tau_nat), gaps(bndy_err, bndy_all, tau_bndy),
            rate_nat=rate_at(cfg.frl_rate_nat, epoch), rate_bndy=rate_at(cfg.frl_rate_bndy, epoch),
            rate_margin=cfg.frl_rate_margin, lim=cfg.frl_lim, remargin=self.remargin)
        self._tables()
        out = {"frl_lam_nat": self.lam_nat.tolist(), "frl_lam_bndy": self.lam_bndy.tolist()}
        if self.remargin:
            out["frl_eps_factor"] = self.factors.tolist()
        return out

    def radii(self, y):
        if not self.remargin:
            return self.cfg.eps_train, self.alpha
        # the step scales with the radius; their code steps max(batch radii) / 4 for every sample
        eps, alpha = per_sample(self.factors, y, self.cfg.eps_train), per_sample(self.factors, y, self.alpha)
        if self.cfg.frl_batch_step:   # the largest, on the device (no host sync)
            alpha = alpha.max().expand(alpha.shape)
        return eps, alpha

    def loss(self, y, logits_adv, logits_nat):
        return frl_loss(logits_nat, logits_adv, y, self.cfg.beta, self.w_nat, self.w_bndy), self.zero()

    def end_epoch(self, epoch: int, model: nn.Module, row: dict) -> dict:
        if epoch + 1 >= self.cfg.epochs:   # no epoch left to serve
            return {}
        # train() has just scored this model on the validation split: its records, reused
        return self.update(epoch + 1, self.validation.records)

    def state_dict(self) -> dict:
        return {"lam_nat": self.lam_nat, "lam_bndy": self.lam_bndy, "lam_margin": self.lam_margin}

    def load_state_dict(self, state: dict) -> None:
        self.lam_nat, self.lam_bndy, self.lam_margin = (
            state[k].to("cpu", torch.float64) for k in ("lam_nat", "lam_bndy", "lam_margin"))
        self._tables()


METHOD = Method(bases={"frl-rw": "trades", "frl-rwrm": "trades"},
                titles={"frl-rw": "FRL-RW", "frl-rwrm": "FRL-RWRM"}, state=FRL, params=FRLParams,
                check=check, needs_validation=True, fine_tune=True, official_attack_bn="eval",
                alone="it fine-tunes another run's model and reweights from its own validation split "
                      "every epoch",
                source="Xu et al., ICML 2021; github.com/hannxu123/fair_robust")


__all__ = ["error_rates", "gaps", "project", "rate_at", "update_multipliers", "class_weights",
           "margin_factors", "frl_loss", "per_sample", "validation_counts", "bounds", "FRL",
           "DEFAULT_BOUNDS", "RATE_HALVING_EPOCHS", "MARGIN_MIN", "MARGIN_EXP"]
