"""BAT (Sun et al., AAAI 2023): TRADES trained on two early-stopped attacks per sample (the last
clean and the first adversarial step) plus a pull of both predictions toward the uniform one.

Read from silvercherry/Improving-Robust-Fairness-via-Balance-Adversarial-Training (train.py,
train_mode/stop_to_lastclean.py, train_mode/stop_to_firstadv.py; both after FAT's code).
Their attack is TRADES' (KL to the clean prediction, eval mode, start x + 0.001 N(0, 1) clamped
to [0, 1], PGD-10 at step 0.007, eps 0.031), stopped per sample:
  source-class term (per-class attack strength, set by each sample's own boundary distance):
    last clean x_lc: the iterate before the first one the model misclassifies (the start
        itself if that is misclassified), where the cross-entropy is taken;
    first adversarial x_fa: the iterate at the (tau + 1)-th misclassified check (their tau 1:
        one more step past the first misclassified one), where TRADES' KL is taken;
    a sample never stopped keeps the last iterate;
  target-class term: KL(p || u) of both predictions to the uniform distribution u = 1 / C, so
    that no class collects the adversarial examples.
Loss, all forwards in train mode:
    CE(f(x_lc), y) + beta KL(p(x) || p(x_fa)) + gamma [KL(p(x_lc) || u) + KL(p(x_fa) || u)],
each KL summed over classes and averaged over the batch; their beta 6 is TRADES' --beta, their
gamma 1 (an unweighted sum).
Where fastfat differs, and why:
  - Both stopping rules read one attack trajectory from one start noise; their code runs two
    (two independent 0.001 N(0, 1) starts). Samples are independent in eval mode, so each rule's
    point is exactly theirs for that start; one trajectory halves the attack's cost.
  - Their functions return the batch regrouped (stopped samples first, a random permutation);
    every term is a sum over samples, so fastfat keeps the batch's order.
  - Their forwards run last clean, first adversarial, clean; fastfat's run first adversarial,
    clean (the Trainer's TRADES order), then last clean (BatchNorm's running statistics move in
    that order).
  - Every attack step runs the whole batch (their code drops stopped samples): no host sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..attacks import start_noise
from ..config_values import check_int_at_least, check_range, opt
from ..runtime import autocast
from .base import Method, MethodState


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits_i) || u) per sample [N] for logits [N, C], u = 1 / C (float32; their
    KLDivLoss against log_softmax of constant logits): log C - H(p_i)."""
    return kernels.trades_kl(torch.zeros_like(logits), logits)


def stop_points(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps, alpha, steps: int,
                tau: int = 1, noise: torch.Tensor | None = None, amp: torch.dtype | None = None):
    """(x_lc, x_fa), each [N, C, H, W]: BAT's last-clean and first-adversarial points of one KL
    attack (TRADES' objective) on model as given (eval mode for their attack) of x [N, C, H, W] in
    [0, 1], labels y [N], radius eps and step alpha (pixel units, floats), steps >= 0, tau >= 0
    misclassified checks before the first-adversarial rule stops; noise: N(0, 1) of x's shape
    (the start is clamp(x + 0.001 noise, 0, 1), as their code), None for none; amp: autocast dtype
    of the forwards (the objective and its gradient stay fp32)."""
    x = x.detach()
    with torch.no_grad(), autocast(x.device, amp):
        p_nat = F.softmax(kernels.upcast(model(x)), dim=1)
    cur = x if noise is None else (x + 0.001 * noise.to(x.dtype)).clamp(0.0, 1.0)
    prev, lc, fa = cur, cur.clone(), cur.clone()
    lc_open = torch.ones(len(y), dtype=torch.bool, device=x.device)
    fa_open = lc_open.clone()
    control = torch.full((len(y),), tau, dtype=torch.int64, device=x.device)
    for _ in range(steps):
        cur = cur.detach().requires_grad_()
        with autocast(x.device, amp):
            logits = kernels.upcast(model(cur))
        wrong = logits.detach().argmax(1) != y
        lc_stop = lc_open & wrong                      # stop: keep the iterate before this one
        lc = torch.where(lc_stop[:, None, None, None], prev, lc)
        lc_open = lc_open & ~wrong
        fa_wrong = fa_open & wrong
        fa_stop = fa_wrong & (control == 0)            # stop: keep this iterate
        fa = torch.where(fa_stop[:, None, None, None], cur.detach(), fa)
        control = control - (fa_wrong & (control > 0)).to(control.dtype)
        fa_open = fa_open & ~fa_stop
        obj = F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum")
        grad, = torch.autograd.grad(obj, cur)
        prev = cur.detach()
        cur = torch.min(torch.max(prev + alpha * grad.sign(), x - eps), x + eps).clamp(0.0, 1.0)
    lc = torch.where(lc_open[:, None, None, None], cur.detach(), lc)
    fa = torch.where(fa_open[:, None, None, None], cur.detach(), fa)
    return lc, fa


def bat_loss(y, logits_lc, logits_fa, logits_nat, beta: float, gamma: float) -> torch.Tensor:
    """BAT's loss from the train-mode logits [N, C] of the last-clean, first-adversarial and
    clean inputs, labels y [N]: CE(lc) + beta mean KL(nat || fa) + gamma mean [KL(lc || u) +
    KL(fa || u)] (fp32 scalar)."""
    n = y.numel()
    lc, fa, nat = (kernels.upcast(t) for t in (logits_lc, logits_fa, logits_nat))
    robust = kernels.trades_kl(fa, nat).sum() / n
    uniform = (kl_to_uniform(lc).sum() + kl_to_uniform(fa).sum()) / n
    return F.cross_entropy(lc, y) + beta * robust + gamma * uniform


@dataclass
class BATParams:
    """BAT's hyperparameters (TrainConfig fields, flags and sweep keys); beta is TRADES' --beta."""
    bat_tau: int = opt(1, "BAT: misclassified attack steps before the first-adversarial point "
                          "stops (their code's tau 1)")
    bat_gamma: float = opt(1.0, "BAT: the weight of the uniform-prediction (target-class) term "
                                "(their code's 1)")


def check(cfg) -> None:
    """BATParams' ranges."""
    check_int_at_least("bat_tau", cfg.bat_tau, 0)
    check_range("bat_gamma", cfg.bat_gamma, 0.0, math.inf)


class BAT(MethodState):
    """bat: its own attack (both stopping points); no state across steps or epochs."""

    def begin(self, model, validation, start_epoch, teacher=None):
        self.model = model     # the trainable model: the last-clean forward in loss()

    def attack(self, model, x, y, generator=None, amp=None):
        noise = start_noise(x, "kl", generator=generator)
        self._lc, fa = stop_points(model, x, y, self.cfg.eps_train, self.alpha, self.cfg.steps,
                                   self.cfg.bat_tau, noise, amp)
        self._amp = amp
        return fa

    def loss(self, y, logits_adv, logits_nat):
        with autocast(self._lc.device, self._amp):
            logits_lc = self.model(self._lc)
        self._lc = None
        return bat_loss(y, logits_lc, logits_adv, logits_nat, self.cfg.beta, self.cfg.bat_gamma), self.zero()


METHOD = Method(bases={"bat": "trades"}, titles={"bat": "BAT"}, state=BAT, params=BATParams,
                check=check, official_attack_bn="eval", single_step=False,
                alone="its attack stops each sample at its own step, so one attack cannot serve the "
                      "members",
                source="Sun et al., AAAI 2023; "
                       "github.com/silvercherry/Improving-Robust-Fairness-via-Balance-Adversarial-Training")
