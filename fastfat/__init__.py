"""fastfat: fast, correct adversarial training for robust fairness.

Functional API (inputs in [0, 1], eps in pixel units, floats or per-sample tensors [N]):

    fastfat.pgd / fgsm / cw_inf / PGD         attacks (fastfat.attacks)
    fastfat.vcar / fat_loss / trades_loss /   losses (fastfat.losses)
        fat_trades_loss
    fastfat.classwise_accuracy / vcra / ...   metrics (fastfat.metrics)
    fastfat.fuse_models / split_models        train K same-architecture models as one
                                              (fastfat.fused; example in fuse_models)
"""
from .attacks import PGD, cw_inf, fgsm, pgd
from .fused import fuse_models, split_models
from .losses import fat_loss, fat_trades_loss, trades_loss, vcar
from .metrics import (average_accuracy, classwise_accuracy, classwise_loss, vca, vcra,
                      worst_class_accuracy)

__version__ = "0.1.0"

__all__ = ["pgd", "fgsm", "cw_inf", "PGD", "vcar", "fat_loss", "trades_loss", "fat_trades_loss",
           "classwise_accuracy", "average_accuracy", "vcra", "vca", "worst_class_accuracy",
           "classwise_loss", "fuse_models", "split_models"]
