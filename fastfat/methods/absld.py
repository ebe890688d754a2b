"""ABSLD (Zhao et al., NeurIPS 2024): robust distillation whose teacher soft labels carry a
temperature per class, moved each epoch so classes the student finds hard get sharper labels.

Read from zhaoshiji123/ABSLD (resnet18_absld_cifar10.py, absld_loss.py). With the teacher t
(eval mode) on the natural input and per-class temperatures T_adv, T_nat (start 1), each step:
the student's PGD maximises KL(softmax(t(x) / T_adv[y]) || softmax(s(x_adv))) from
x + 0.001 * N(0, 1) (TRADES' start), and the loss is
    5/6 * KL(softmax(t(x) / T_adv[y]) || softmax(s(x_adv))) / C
  + 1/6 * KL(softmax(t(x) / T_nat[y]) || softmax(s(x))) / C,
batch means (their kl_loss averages over the N * C entries, hence / C). After each epoch, for
each of adv and nat, from the class-wise CE of the student's train-mode logits against the
labels over the epoch, gap = L - mean(L) and
    T <- clamp(T - rate * gap / max|gap|, 0.5, 5),
rate = 0.1 times the learning rate's multiplier (their rate drops x0.1 with the learning rate).
Where fastfat differs, and why:
  - Their code divides one storage twice (teacher_logits.detach() shares it), so both soft
    labels are t(x) / (T_adv * T_nat): --absld-code-temperatures gives that; the default is the
    paper's (T_adv for the adversarial term, T_nat for the natural one).
  - L is the class's mean CE, theirs the sum: the same update on a class-balanced training set
    (the gap is normalised by its largest entry), and unbiased by class size otherwise.
  - Their KL term adds 1e-5 inside the teacher's log; fastfat's is the exact KL (the same
    gradient: the term does not depend on the student).
  - Their rate drops together with the learning rate at the end of the epoch before the first
    epoch at the lower rate, so that epoch's update already uses it; fastfat's uses the epoch's
    own multiplier (a method module reads no schedule: one update in a run differs per drop).
  - The checkpoint is chosen on the validation split (fastfat.selection), not the test set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import attacks, kernels
from ..config_values import check_range, opt
from ..runtime import autocast
from .base import ClassSums, Method, MethodState, gather


@dataclass
class ABSLDParams:
    """ABSLD's hyperparameters (TrainConfig fields, flags and sweep keys)."""
    absld_rate: float = opt(0.1, "ABSLD: step of the class temperatures per epoch (their code's 0.1; "
                                 "it follows the learning rate's drops)")
    absld_temp_min: float = opt(0.5, "ABSLD: the smallest class temperature (their code's 0.5)")
    absld_temp_max: float = opt(5.0, "ABSLD: the largest class temperature (their code's 5)")
    absld_adv_weight: float = opt(5 / 6, "ABSLD: weight of the adversarial distillation term; the "
                                          "natural one gets 1 minus it (their code's 5/6)")
    absld_code_temperatures: bool = opt(False, "ABSLD: both soft labels at T_adv * T_nat, as their code "
                                               "computes them (one storage divided twice)")


def check(cfg) -> None:
    """ABSLDParams' ranges."""
    check_range("absld_rate", cfg.absld_rate, 0.0, math.inf)
    check_range("absld_temp_min", cfg.absld_temp_min, 0.0, math.inf, low_open=True)
    check_range("absld_temp_max", cfg.absld_temp_max, cfg.absld_temp_min, math.inf)
    check_range("absld_adv_weight", cfg.absld_adv_weight, 0.0, 1.0)


def update_temperatures(temp: torch.Tensor, class_loss: torch.Tensor, rate: float,
                        lo: float, hi: float) -> torch.Tensor:
    """ABSLD's update of the class temperatures temp [C] from the epoch's class losses [C]:
    clamp(temp - rate * gap / max|gap|, lo, hi), gap = class_loss - mean(class_loss); unchanged
    (but clamped) when every class has the same loss, to rounding (their code divides by 0
    there)."""
    gap = class_loss - class_loss.mean()
    top = gap.abs().max()
    # a spread at rounding level (equal losses whose mean is off by an ulp) is no spread: / top
    # would blow it up to a full step
    real = top > 64 * torch.finfo(gap.dtype).eps * class_loss.abs().max()
    step = torch.where(real, gap / top.clamp(min=torch.finfo(gap.dtype).tiny), torch.zeros_like(gap))
    return (temp - rate * step).clamp(lo, hi)


def soft_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean over the N * C entries of softmax(teacher) * (log softmax(teacher) - log_softmax(student)):
    their kl_loss's mean, from logits [N, C] (the teacher's already divided by its temperature)."""
    s = F.log_softmax(kernels.upcast(student), dim=1)
    t = F.softmax(kernels.upcast(teacher), dim=1)
    return (torch.special.xlogy(t, t) - t * s).mean()


class ABSLD(MethodState):
    """absld: the class temperatures, the epoch's class losses and the batch's teacher logits.
    The teacher (cfg.teacher's model, frozen) comes in begin()."""

    def __init__(self, cfg, num_classes: int, device, base: str):
        super().__init__(cfg, num_classes, device, base)
        self.teacher: nn.Module | None = None
        self.temp_adv = torch.ones(num_classes, dtype=torch.float64, device=self.device)
        self.temp_nat = torch.ones(num_classes, dtype=torch.float64, device=self.device)
        self.losses_adv = self.losses_nat = None
        self._soft = None

    @property
    def natural_forward(self) -> bool:
        return True

    def start_epoch(self, epoch: int) -> None:
        self.losses_adv = ClassSums(self.num_classes, None, self.device)
        self.losses_nat = ClassSums(self.num_classes, None, self.device)

    def soft_labels(self, teacher_logits: torch.Tensor, y: torch.Tensor):
        """(adv, nat) tempered teacher logits [N, C] for labels y [N]."""
        t_adv, t_nat = gather(self.temp_adv, y)[:, None], gather(self.temp_nat, y)[:, None]
        if self.cfg.absld_code_temperatures:
            t_adv = t_nat = t_adv * t_nat
        t = teacher_logits.double()
        return (t / t_adv).float(), (t / t_nat).float()

    def begin(self, model, validation, start_epoch: int, teacher=None) -> None:
        self.teacher = teacher

    def attack(self, model, x, y, generator=None, amp=None):
        with torch.no_grad(), autocast(x.device, amp):
            teacher_logits = kernels.upcast(self.teacher(x))
        self._soft = self.soft_labels(teacher_logits, y)
        eps, alpha = self.radii(y)
        return attacks.pgd(model, x, y, eps, alpha, loss="kl", generator=generator, **self.attack_args(eps),
                           amp=amp, fold_bn=self.cfg.fold_bn, target=self._soft[0],
                           batch_stats=self.cfg.attack_bn == "train")

    def loss(self, y, logits_adv, logits_nat):
        ce = lambda logits: F.cross_entropy(kernels.upcast(logits.detach()), y, reduction="none")
        self.losses_adv.add(ce(logits_adv), y)
        self.losses_nat.add(ce(logits_nat), y)
        soft_adv, soft_nat = self._soft
        self._soft = None
        w = self.cfg.absld_adv_weight
        return w * soft_kl(logits_adv, soft_adv) + (1 - w) * soft_kl(logits_nat, soft_nat), self.zero()

    def end_epoch(self, epoch: int, model: nn.Module, row: dict) -> dict:
        cfg = self.cfg
        # the rate follows the learning rate's drops (this epoch's multiplier: row["lr"] / lr)
        rate = cfg.absld_rate * row["lr"] / cfg.lr
        self.temp_adv = update_temperatures(self.temp_adv, self.losses_adv.means(), rate,
                                            cfg.absld_temp_min, cfg.absld_temp_max)
        self.temp_nat = update_temperatures(self.temp_nat, self.losses_nat.means(), rate,
                                            cfg.absld_temp_min, cfg.absld_temp_max)
        self.losses_adv = self.losses_nat = None
        return {"absld_temp_adv": self.temp_adv.tolist(), "absld_temp_nat": self.temp_nat.tolist()}

    def state_dict(self) -> dict:
        return {"temp_adv": self.temp_adv, "temp_nat": self.temp_nat}

    def load_state_dict(self, state: dict) -> None:
        self.temp_adv = state["temp_adv"].to(self.device)
        self.temp_nat = state["temp_nat"].to(self.device)


METHOD = Method(bases={"absld": "trades"}, titles={"absld": "ABSLD"}, state=ABSLD,
                params=ABSLDParams, check=check, teacher=True, official_attack_bn="eval",
                alone="it distils from a teacher model, which a fused group does not carry",
                source="Zhao et al., NeurIPS 2024; github.com/zhaoshiji123/ABSLD")
