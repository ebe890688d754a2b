"""Class-wise metrics: the paper's (class accuracy, VCRA) and the fairness measures beyond the
variance (worst class, mean of the k worst, std / mean, the trade-off score rho).

Accuracies are fractions in [0, 1] (tables print %); VCRA / VCA are the population variance
(ddof 0) of the class accuracies, which the paper prints x100 as "10^-2" units.
"""
from __future__ import annotations

import torch

from . import kernels


def _pred(pred_or_logits: torch.Tensor) -> torch.Tensor:
    return pred_or_logits.argmax(1) if pred_or_logits.dim() == 2 else pred_or_logits


def class_correct(pred_or_logits: torch.Tensor, y: torch.Tensor, num_classes: int):
    """(correct [C], total [C]) as float64 counts; pred [N] or logits [N, C], y [N].

    Both by index_add into a fixed-size vector: no host sync (torch.bincount syncs twice on
    CUDA to size its output), and exact (integer counts in float64) whatever the order."""
    hit = (_pred(pred_or_logits) == y).to(torch.float64)
    correct = torch.zeros(num_classes, dtype=torch.float64, device=y.device).index_add_(0, y, hit)
    total = torch.zeros(num_classes, dtype=torch.float64, device=y.device).index_add_(0, y, torch.ones_like(hit))
    return correct, total


def classwise_accuracy(pred_or_logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class accuracy [C] as fractions (float64); NaN for a class with no samples."""
    correct, total = class_correct(pred_or_logits, y, num_classes)
    return correct / total


def average_accuracy(class_acc) -> float:
    """Mean of the class accuracies (classes without samples left out)."""
    a = torch.as_tensor(class_acc, dtype=torch.float64)
    return float(a[~a.isnan()].mean())


def vcra(class_acc) -> float:
    """Variance of class-wise (robust) accuracy: population variance, raw (x100 for the paper)."""
    a = torch.as_tensor(class_acc, dtype=torch.float64)
    a = a[~a.isnan()]
    return float(((a - a.mean()) ** 2).mean())


# VCA, the variance of class-wise clean accuracy, is the same statistic on clean accuracies.
vca = vcra


def worst_class_accuracy(class_acc) -> float:
    """The lowest class accuracy."""
    a = torch.as_tensor(class_acc, dtype=torch.float64)
    return float(a[~a.isnan()].min())


def worst_k_accuracy(class_acc, k: int = 3) -> float:
    """Mean of the k lowest class accuracies (all present classes if fewer than k). On many
    classes the single worst is near 0 and says little; the k worst move with the method."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    a = torch.as_tensor(class_acc, dtype=torch.float64)
    a = a[~a.isnan()]
    return float(a.sort().values[:k].mean())


def normalized_std(class_acc) -> float | None:
    """Population standard deviation of the class accuracies over their mean (the coefficient
    of variation): spread relative to the level, comparable across eps and attacks. None when
    the mean is 0 (every class at 0: undefined; None so that eval.json stays valid JSON)."""
    a = torch.as_tensor(class_acc, dtype=torch.float64)
    a = a[~a.isnan()]
    mean = a.mean()
    return None if mean == 0 else float(((a - mean) ** 2).mean().sqrt() / mean)


def tradeoff_rho(worst_new: float, avg_new: float, worst_base: float, avg_base: float) -> float:
    """The trade-off score of a method against its base method:
    rho = (worst_new - worst_base) / worst_base - (avg_base - avg_new) / avg_base,
    the relative gain in worst-class accuracy minus the relative loss in average accuracy
    (> 0: the worst class gained more than the average lost). Accuracies are fractions;
    NaN when worst_base or avg_base is 0 (no relative change is defined)."""
    if worst_base == 0 or avg_base == 0:
        return float("nan")
    return (worst_new - worst_base) / worst_base - (avg_base - avg_new) / avg_base


def classwise_loss(per_sample_loss: torch.Tensor, y: torch.Tensor, num_classes: int):
    """(class-wise mean loss [C] fp32, NaN where absent; population variance over present classes)."""
    sums, counts = kernels.class_stats(per_sample_loss.detach(), y, num_classes)
    means = sums / counts
    present = means[counts > 0]
    return means, float(((present - present.mean()) ** 2).mean())


def summarize(class_acc, k: int = 3) -> dict:
    """The derived numbers for one attack: avg_acc, vcra (raw), worst_acc, worst_k_acc (mean of
    the k worst classes) with worst_k = k, and nstd (std / mean; None when the mean is 0)."""
    return {"avg_acc": average_accuracy(class_acc), "vcra": vcra(class_acc),
            "worst_acc": worst_class_accuracy(class_acc), "worst_k_acc": worst_k_accuracy(class_acc, k),
            "worst_k": k, "nstd": normalized_std(class_acc)}


def check_finite_logits(logits: torch.Tensor, what: str) -> None:
    """Raise UserError (a ValueError) when logits hold NaN or inf: a diverged or broken model,
    whose accuracy would be meaningless. what: how the message names them."""
    from .errors import UserError
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        rows = int(bad.reshape(bad.shape[0], -1).any(1).sum()) if logits.dim() else 1
        raise UserError(f"{what} are not finite (NaN or inf in {rows} of {logits.shape[0] if logits.dim() else 1} "
                        "samples): a diverged or broken model cannot be evaluated")
