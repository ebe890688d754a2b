"""The reference losses in the authors' shape: VCAR (paper and authors' modes, superclass folding),
FAT on Madry and on TRADES, and TRADES."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Data, not logic: CIFAR-100 fine label -> coarse label, the dataset's own table (checked
# against it in tests/test_losses.py) and the authors' cifar100_super_map.json.
from ..data.superclasses import CIFAR100_COARSE, CIFAR100_COARSE_AUTHORS

AUTHORS_SLOTS = 100   # the authors' `torch.zeros(100)` vector of class means
SUPERCLASSES = 20


def ref_vcar(per_sample_loss: torch.Tensor, y: torch.Tensor, num_classes: int, mode: str = "paper",
             superclass: bool = False) -> torch.Tensor:
    """Variance of class-wise adversarial risk, with a Python loop over the classes.

    mode "authors": a vector of max(100, C) zeros, entry i = mean loss of class i (left 0 when
      absent), torch.var (unbiased). superclass: the 100 entries summed into 20 superclasses by
      the authors' cifar100_super_map.json, divided by 5, torch.var over the 20.
    mode "paper": population variance of the class means over the classes present (superclass:
      CIFAR-100's own superclasses, over those with at least one present class, of the same /5
      sums).
    Differentiable in per_sample_loss; computed in its dtype (so gradcheck can run in double).
    """
    if mode not in ("paper", "authors"):
        raise ValueError(f"unknown VCAR mode {mode!r}")
    if superclass and num_classes != 100:
        raise ValueError("superclass VCAR needs the 100 classes of CIFAR-100")
    dtype, device = per_sample_loss.dtype, per_sample_loss.device
    slots = max(AUTHORS_SLOTS, num_classes)
    loss_list = torch.zeros(slots, dtype=dtype, device=device)
    present = []
    for i in range(num_classes):
        mask = y == i
        if bool(mask.any()):
            loss_list[i] += torch.mean(per_sample_loss[mask])
            present.append(i)

    if superclass:
        coarse = CIFAR100_COARSE_AUTHORS if mode == "authors" else CIFAR100_COARSE
        super_loss = torch.zeros(SUPERCLASSES, dtype=dtype, device=device)
        for i in range(100):
            super_loss[coarse[i]] += loss_list[i]
        super_loss = super_loss / 5
        if mode == "authors":
            return torch.var(super_loss)
        present_super = sorted({coarse[i] for i in present})
        values = super_loss[present_super]
    else:
        if mode == "authors":
            return torch.var(loss_list)
        values = loss_list[present]
    # paper: population variance (divide by the number of classes present)
    return torch.mean((values - torch.mean(values)) ** 2)


def ref_fat_loss(logits_adv: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float,
                 mode: str = "paper", superclass: bool = False) -> torch.Tensor:
    """FAT on Madry (pgd_var.py): mean CE + lam * VCAR of the per-sample CE."""
    loss = nn.CrossEntropyLoss(reduction="none")(logits_adv, y)
    return torch.mean(loss) + float(lam) * ref_vcar(loss, y, num_classes, mode, superclass)


def ref_trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """TRADES: CE(nat) + beta * KLDivLoss(sum)(log_softmax(adv), softmax(nat)) / B (nothing detached)."""
    batch_size = len(y)
    criterion_kl = nn.KLDivLoss(reduction="sum")
    loss_natural = nn.CrossEntropyLoss(reduction="mean")(logits_nat, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(logits_adv, dim=1),
                                                    F.softmax(logits_nat, dim=1))
    return loss_natural + beta * loss_robust


def ref_fat_trades_loss(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                        num_classes: int, beta: float, lam: float, mode: str = "paper",
                        superclass: bool = False) -> torch.Tensor:
    """FAT on TRADES (trades_var.py): TRADES loss + lam * VCAR of the per-sample CE on adv logits."""
    loss = nn.CrossEntropyLoss(reduction="none")(logits_adv, y)
    loss_var = ref_vcar(loss, y, num_classes, mode, superclass)
    return ref_trades_loss(logits_nat, logits_adv, y, beta) + float(lam) * loss_var
