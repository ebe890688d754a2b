"""Plain-PyTorch reference implementation, in the shape of the FAT authors' code.

This package is the ground truth the fast path (fastfat.attacks / losses / metrics / train /
evaluate) is pinned against. It is written independently of the fast path on purpose: it does
not import fastfat.attacks, fastfat.losses, fastfat.metrics or the kernels' logic, and it keeps
the authors' code shape (wzekai99/FAT attack_generator.py, pgd_var.py, trades_var.py,
var_acc_test.py, and the original TRADES), including what makes it slow:

- the attack calls `loss.backward()`, so every step also computes all parameter gradients;
- the model is put in eval mode for the attack and back in train mode for the update;
- per-class reductions are Python loops over the classes (one host sync per class);
- fp32 (float64 when given float64 inputs, for pinning runs), contiguous NCHW, no torch.compile,
  no AMP, no BN folding, no kernel dispatch.

Conventions shared with the fast path (so the two can be compared bit for bit):
- uniform random start: `torch.empty(x.shape).uniform_(-eps, eps, generator=g)` drawn in
  contiguous NCHW order; the fast path draws U(-1, 1) and multiplies by eps, which is the same
  float32 numbers (tests/test_attacks.py pins that);
- TRADES start: `x + 0.001 * torch.randn(x.shape, generator=g)`, not clamped (as TRADES);
- the random streams (data order, training attack noise, evaluation start noise) follow the
  contract in fastfat.seeding, which both sides import.

Where the paper and the authors' code disagree, both are available (the README's "fidelity modes"):
VCAR mode "paper" (population variance over the classes present) or "authors" (100 slots,
unbiased torch.var; superclass folding by their cifar100_super_map.json, which puts fine class 39
in superclass 9 where CIFAR-100 says 5) and the "authors" schedule is their adjust_learning_rate
called with epoch + 1. Known deviations from the authors' files, on purpose:
- a class whose mean loss is NaN propagates NaN (the authors skip any NaN class mean, which
  would hide a diverged run); absent classes are skipped in both;
- ref_pgd restores the model's mode after the attack (the authors leave it in eval mode and
  rely on the training loop's model.train()).
"""
from __future__ import annotations

from .attacks import ref_cw, ref_cwloss, ref_fgsm, ref_fgsm_rs, ref_nfgsm, ref_pgd
from .evaluate import ref_class_accuracy, ref_classwise_loss, ref_evaluate, ref_summary
from .losses import ref_fat_loss, ref_fat_trades_loss, ref_trades_loss, ref_vcar
from .train import METHODS, ref_lr, ref_train, ref_train_step

__all__ = ["METHODS", "ref_class_accuracy", "ref_classwise_loss", "ref_cw", "ref_cwloss", "ref_evaluate", "ref_fat_loss",
           "ref_fat_trades_loss", "ref_fgsm", "ref_fgsm_rs", "ref_lr", "ref_nfgsm", "ref_pgd", "ref_summary",
           "ref_trades_loss", "ref_train", "ref_train_step", "ref_vcar"]
