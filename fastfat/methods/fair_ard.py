"""Fair-ARD (Yue et al., NeurIPS 2023): adversarial robustness distillation from a teacher, each
class's distillation loss weighted by how hard its samples are to attack (how many PGD steps
the student keeps them correct in the previous epoch).

Read from NISP-official/Fair-ARD (Fair-ARD.py). Each step: the student's PGD on its CE, from a
uniform start, counting per sample kappa_i = the number of the K attack iterates x_0..x_{K-1}
(before each step; x_0 the random start) it still classifies correctly; the loss
    alpha * T^2 * mean_i w_{y_i} KL(softmax(t(x_i) / T) || softmax(s(x_adv_i) / T)) / C
  + (1 - alpha) * mean_i w_{y_i} CE(s(x_i), y_i),
t the teacher (eval mode) on the natural input, s the student; T = 30, alpha = 1, and KL / C
as their nn.KLDivLoss() averages over the C classes of one sample. After each epoch, per class
c: kappa_c = the epoch's sum of kappa_i over c's samples / c's sample count, and
    w_c = clamp(C * k_c / sum(k), 5/6, 5/2),   k_c = (kappa_c + 1e-5)^(-beta),   beta = 2;
the first epoch trains with w = 1.
Where fastfat differs, and why:
  - Their attack runs with the student in train mode (BatchNorm on batch statistics, its running
    statistics moved by every attack step); fastfat's attacks run in eval mode by default, as
    every method's here; --attack-bn train gives theirs (official_attack_bn below records it).
  - Their step always runs the student on the clean batch in train mode (used only when
    alpha < 1, but it moves BatchNorm's running statistics); fastfat's runs it only when used.
  - kappa_c divides by the class's own sample count, theirs by N / C (the same on a balanced
    training set such as CIFAR-10's).
  - The student's checkpoint is chosen on the validation split (fastfat.selection), not the test set.
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

# their weight_assign's clamp of the normalised class weights
W_MIN, W_MAX = 5 / 6, 5 / 2


@dataclass
class FairARDParams:
    """Fair-ARD's hyperparameters (TrainConfig fields, flags and sweep keys)."""
    fair_ard_beta: float = opt(2.0, "Fair-ARD: the class weights' exponent on 1 / kappa (their code's 2)")
    fair_ard_temp: float = opt(30.0, "Fair-ARD: the distillation temperature T (their code's 30)")
    fair_ard_alpha: float = opt(1.0, "Fair-ARD: weight of the distillation term; 1 - alpha weighs the "
                                     "student's natural CE (their code's 1)")


def check(cfg) -> None:
    """FairARDParams' ranges."""
    check_range("fair_ard_beta", cfg.fair_ard_beta, 0.0, math.inf)
    check_range("fair_ard_temp", cfg.fair_ard_temp, 0.0, math.inf, low_open=True)
    check_range("fair_ard_alpha", cfg.fair_ard_alpha, 0.0, 1.0)


def class_weights(kappa: torch.Tensor, beta: float) -> torch.Tensor:
    """Fair-ARD's class weights [C] from the per-class mean kappa [C] (PGD steps a class's samples
    stay correct): (kappa + 1e-5)^-beta scaled to sum C, then clamped to [5/6, 5/2]."""
    w = (kappa + 1e-5).pow(-beta)
    w = w * (kappa.numel() / w.sum())
    return w.clamp(W_MIN, W_MAX)


def distill_loss(student_adv: torch.Tensor, teacher_nat: torch.Tensor, w: torch.Tensor,
                 temp: float) -> torch.Tensor:
    """T^2 * mean_i w_i KL(softmax(teacher_i / T) || softmax(student_i / T)) / C: logits [N, C],
    per-sample weights w [N]; fp32 (logits are upcast)."""
    s = F.log_softmax(kernels.upcast(student_adv) / temp, dim=1)
    t = F.softmax(kernels.upcast(teacher_nat) / temp, dim=1)
    kl = (torch.special.xlogy(t, t) - t * s).sum(1) / s.shape[1]
    return temp * temp * (kl * w).mean()


def pgd_counting(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                 steps: int, *, generator=None, amp=None, fold_bn: bool = True,
                 batch_stats: bool = False):
    """(x_adv [N, C, H, W], kappa [N] float) of a CE PGD from the uniform start: fastfat.attacks.pgd
    run one step at a time from each iterate (its start noise set to the iterate's offset), with
    kappa_i the number of iterates x_0..x_{steps-1} the model classifies correctly: in eval mode,
    or in train mode with batch_stats (their code's: every forward moves BN's running statistics)."""
    kw = dict(amp=amp, fold_bn=fold_bn, batch_stats=batch_stats)
    x_k = attacks.pgd(model, x, y, eps, alpha, 0, generator=generator, **kw)
    kappa = torch.zeros(y.shape, device=y.device)
    scale = eps if eps > 0 else 1.0
    for _ in range(steps):
        with torch.no_grad(), autocast(x.device, amp):
            if batch_stats:
                was = model.training
                logits = model.train()(x_k)
                model.train(was)
            else:
                with attacks.eval_mode(model):
                    logits = model(x_k)
        kappa += (logits.argmax(1) == y).float()
        # pgd starts at clamp(x + noise * eps): the offset / eps starts it at x_k, ball around x
        x_k = attacks.pgd(model, x, y, eps, alpha, 1, noise=(x_k - x) / scale, **kw)
    return x_k, kappa


class FairARD(MethodState):
    """fair-ard: the student's state (class weights, the epoch's kappa) and the teacher's logits
    of the current batch; the teacher (cfg.teacher's model) comes in begin()."""

    def __init__(self, cfg, num_classes: int, device, base: str):
        super().__init__(cfg, num_classes, device, base)
        self.teacher: nn.Module | None = None
        self.weights = torch.ones(num_classes, dtype=torch.float64, device=self.device)
        self.kappa: ClassSums | None = None
        self._teacher_logits = None

    @property
    def natural_forward(self) -> bool:
        return self.cfg.fair_ard_alpha < 1

    def start_epoch(self, epoch: int) -> None:
        self.kappa = ClassSums(self.num_classes, None, self.device)

    def begin(self, model, validation, start_epoch: int, teacher=None) -> None:
        self.teacher = teacher

    def attack(self, model, x, y, generator=None, amp=None):
        with torch.no_grad(), autocast(x.device, amp):
            self._teacher_logits = kernels.upcast(self.teacher(x))
        eps, alpha = self.radii(y)
        x_adv, kappa = pgd_counting(model, x, y, eps, alpha, self.cfg.steps, generator=generator,
                                    amp=amp, fold_bn=self.cfg.fold_bn,
                                    batch_stats=self.cfg.attack_bn == "train")
        self.kappa.add(kappa, y)
        return x_adv

    def loss(self, y, logits_adv, logits_nat):
        cfg = self.cfg
        w = gather(self.weights, y).float()
        loss = cfg.fair_ard_alpha * distill_loss(logits_adv, self._teacher_logits, w, cfg.fair_ard_temp)
        if cfg.fair_ard_alpha < 1:
            ce = F.cross_entropy(kernels.upcast(logits_nat), y, reduction="none")
            loss = loss + (1 - cfg.fair_ard_alpha) * (ce * w).mean()
        self._teacher_logits = None
        return loss, self.zero()

    def end_epoch(self, epoch: int, model: nn.Module, row: dict) -> dict:
        kappa = self.kappa.means()
        self.weights = class_weights(kappa, self.cfg.fair_ard_beta)
        self.kappa = None
        return {"fair_ard_kappa": kappa.tolist(), "fair_ard_weights": self.weights.tolist()}

    def state_dict(self) -> dict:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].to(self.device)


METHOD = Method(bases={"fair-ard": "madry"}, titles={"fair-ard": "Fair-ARD"}, state=FairARD,
                params=FairARDParams, check=check, teacher=True, official_attack_bn="train", single_step=False,
                alone="it distils from a teacher model, which a fused group does not carry",
                source="Yue et al., NeurIPS 2023; github.com/NISP-official/Fair-ARD")
