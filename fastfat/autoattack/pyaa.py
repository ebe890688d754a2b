"""AutoAttack through pyautoattack (its authors' package; --aa-impl pyautoattack, the cross-check
of fastfat's own): which samples of a batch stay robust at one radius, with the standard
settings of fastfat.autoattack.standard. A sample is robust only if it is classified correctly
and no attack of the ensemble fooled it.

pyautoattack draws from torch's global generator, reseeding it with the attack's seed before each
attack; fastfat evaluate gives it fastfat.seeding.eval_noise_seed(seed, batch, "aa", eps index)
for aa and apgd alike, and the caller's global generator state is saved and restored around it.
"""
from __future__ import annotations

import pyautoattack
import torch
import torch.nn as nn
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

from .common import Logits, input_grads_only
from .standard import parameters

VERSION = pyautoattack.__version__


def build(model: nn.Module, attack: str, eps: float, seed: int, num_classes: int, *,
          amp: torch.dtype | None = None, device=None, threads: int | None = None,
          **overrides) -> pyautoattack.AutoAttack:
    """A pyautoattack.AutoAttack for `attack` at l_inf radius eps (pixel units) with the settings
    of standard.parameters(attack, num_classes, **overrides), on `model` as common.Logits wraps it."""
    s = parameters(attack, num_classes, **overrides)
    device = device if device is not None else next(model.parameters()).device
    logits = Logits(model, amp, threads)
    aa = pyautoattack.AutoAttack(logits, norm="Linf", eps=eps, seed=seed, device=device,
                                 version="custom", attacks=list(s["attacks"]))
    aa.verbose = False
    # APGD derives its step-size checkpoints from n_iter in its constructor: build anew, with
    # the arguments AutoAttack's constructor uses
    apgd = dict(n_iter=s["n_iter"], norm="Linf", eps=eps, seed=seed, eot_iter=1, rho=s["rho"],
                verbose=False, device=device, logger=aa.logger)
    aa.apgd = APGDAttack(logits, n_restarts=s["apgd_ce_restarts"], **apgd)
    aa.apgd_targeted = APGDAttack_targeted(logits, n_restarts=s["apgd_t_restarts"],
                                           n_target_classes=s["n_target_classes"], **apgd)
    aa.fab.n_iter, aa.fab.n_restarts = s["n_iter"], s.get("fab_t_restarts", 1)
    aa.fab.n_target_classes = s["n_target_classes"]
    aa.square.n_queries = s.get("square_n_queries", 5000)
    return aa


def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str, eps: float, seed: int,
        num_classes: int, *, amp: torch.dtype | None = None, threads: int | None = None,
        **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `attack` ("aa" | "apgd") on one batch at radius eps; the model must be in eval mode.

    x [N, C, H, W] in [0, 1]; y [N] int64; eps in pixel units; seed: the attack's seed (the same
    seed, model and batch give the same result). Only input gradients are computed: parameters'
    requires_grad are off during the run and their .grad untouched. threads: on the CPU the
    model's forward and backward are split over this many single-threaded workers (None:
    torch.get_num_threads(); 1: inline), as fastfat's attacks split theirs. torch's global generator
    state is restored after. Returns (x_adv [N, C, H, W] fp32: the adversarial example of each
    fooled sample, x itself elsewhere; pred [N] int64: the model's class for x_adv as pyautoattack
    found it). A sample is robust iff pred == y: classified correctly and fooled by no attack of
    the ensemble (a clean misclassification keeps its wrong clean prediction)."""
    aa = build(model, attack, eps, seed, num_classes, amp=amp, device=x.device, threads=threads,
               **overrides)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), input_grads_only(model):
        x_adv, pred = aa.run_standard_evaluation(x.detach().float(), y, batch_size=x.shape[0])
    return x_adv, pred
