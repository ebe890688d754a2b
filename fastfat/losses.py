"""Training objectives: VCAR, FAT (on Madry and on TRADES), TRADES and their class-weighted forms,
which the methods' states (fastfat.methods) compute their losses with.

Per-class reductions go through fastfat.kernels (class_stats / fat_ce_loss), so that the fused
Triton kernels serve them on CUDA. All losses are 0-dim fp32 tensors, differentiable in logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels


def vcar(per_sample_loss: torch.Tensor, y: torch.Tensor, num_classes: int, mode: str = "paper",
         superclass: bool = False) -> torch.Tensor:
    """Variance of class-wise adversarial risk (the paper's VCAR), differentiable.

    per_sample_loss [N] (e.g. CE on adversarial examples), y [N] int64.
    mode "paper": population variance over the classes present in the batch of their mean loss
      (Eq. 12 with the expectation taken on the minibatch).
    mode "authors": the class means, 0 for absent classes, padded to 100 entries, torch.var
      (unbiased, /99) over them, as wzekai99/FAT pgd_var.py.
    superclass: CIFAR-100 class means summed into the 20 superclasses, divided by 5, then the
      variance over the 20 (the authors' CIFAR-100 option).
    """
    sums, counts = kernels.class_stats(per_sample_loss, y, num_classes)
    return kernels.vcar_from_stats(sums, counts, mode, superclass)


def fat_loss(logits_adv: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float,
             mode: str = "paper", superclass: bool = False, return_vcar: bool = False):
    """FAT on Madry: mean CE(logits_adv, y) + lam * VCAR(per-sample CE). logits_adv [N, C].

    return_vcar: also return the VCAR value (detached), as (loss, vcar).
    """
    loss, _, v = kernels.fat_ce_loss(logits_adv, y, num_classes, lam, mode, superclass)
    return (loss, v) if return_vcar else loss


def trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                beta: float) -> torch.Tensor:
    """TRADES: CE(logits_nat, y) + beta * sum_i KL(softmax(nat_i) || softmax(adv_i)) / N.

    Both logits [N, C]; neither is detached (as in TRADES and the authors' trades_var.py).
    """
    n = logits_nat.shape[0]
    return F.cross_entropy(kernels.upcast(logits_nat), y) + beta * kernels.trades_kl(logits_adv, logits_nat).sum() / n


def fat_trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                    num_classes: int, beta: float, lam: float, mode: str = "paper",
                    superclass: bool = False, return_vcar: bool = False):
    """FAT on TRADES as the authors do it (trades_var.py): the TRADES loss + lam * VCAR of the
    per-sample CE on the adversarial logits. return_vcar: return (loss, detached VCAR)."""
    term, _, v = kernels.fat_ce_loss(logits_adv, y, num_classes, lam, mode, superclass, ce_weight=0.0)
    loss = trades_loss(logits_nat, logits_adv, y, beta) + term
    return (loss, v) if return_vcar else loss


def weighted_ce(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean_i weight_i * CE(logits_i, y_i): logits [N, C], y [N], weight [N] (one weight per
    sample, e.g. its class's weight gathered by label; not normalised). 0-dim fp32 (fp64 for
    fp64 logits), differentiable in logits. DAFA's loss on Madry."""
    ce = F.cross_entropy(kernels.upcast(logits), y, reduction="none")
    return (ce * weight.to(ce.dtype)).mean()


def weighted_trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                         ce_weight: torch.Tensor | float, kl_weight: torch.Tensor | float) -> torch.Tensor:
    """TRADES with per-sample weights: mean_i [ce_weight_i * CE(nat_i, y_i) + kl_weight_i *
    KL(softmax(nat_i) || softmax(adv_i))]. Logits [N, C]; weights [N] or floats (ce_weight 1 and
    kl_weight beta is trades_loss). Neither logits is detached, as trades_loss. CFA's class-wise
    beta (CCR) and DAFA's class-weighted CE term on TRADES."""
    ce = F.cross_entropy(kernels.upcast(logits_nat), y, reduction="none")
    kl = kernels.trades_kl(logits_adv, logits_nat).to(ce.dtype)
    w = lambda v: v.to(ce.dtype) if isinstance(v, torch.Tensor) else v
    return (w(ce_weight) * ce + w(kl_weight) * kl).mean()
