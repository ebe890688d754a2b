"""Class-wise metrics, as the paper reports them.

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


def classwise_loss(per_sample_loss: torch.Tensor, y: torch.Tensor, num_classes: int):
    """(class-wise mean loss [C] fp32, NaN where absent; population variance over present classes)."""
    sums, counts = kernels.class_stats(per_sample_loss.detach(), y, num_classes)
    means = sums / counts
    present = means[counts > 0]
    return means, float(((present - present.mean()) ** 2).mean())


def summarize(class_acc) -> dict:
    """The derived numbers for one attack: avg_acc, vcra (raw), worst_acc."""
    return {"avg_acc": average_accuracy(class_acc), "vcra": vcra(class_acc),
            "worst_acc": worst_class_accuracy(class_acc)}
