"""fastfat: fast, correct adversarial training for robust fairness.

Functional API (inputs in [0, 1], eps in pixel units, floats or per-sample tensors [N]):

    fastfat.pgd / fgsm / cw_inf / PGD         attacks (fastfat.attacks); PGDOptions: pgd's
                                              options as one object
    fastfat.vcar / fat_loss / trades_loss /   losses (fastfat.losses)
        fat_trades_loss
    fastfat.classwise_accuracy / vcra / ...   metrics (fastfat.metrics)
    fastfat.fuse_models / split_models        train K same-architecture models as one
                                              (fastfat.fused; example in fuse_models)
    fastfat.AutoAttack                        the AutoAttack authors' class over fastfat's
                                              batched attacks (docs/backend.md)
    fastfat.evaluate_model / classwise_report any model class by class: eval.json's records,
                                              and their table (fastfat.backend)

The names load on first use (PEP 562), so `import fastfat` and the command's start are quick
and hold no half-imported torch when Ctrl-C comes early.
"""
import importlib

__version__ = "0.1.0"

_HOME = {"AutoAttack": "autoattack", "classwise_report": "backend.table", "evaluate_model": "backend.evaluation",
         "pgd": "attacks", "PGDOptions": "attacks", "fgsm": "attacks", "cw_inf": "attacks", "PGD": "attacks",
         "vcar": "losses", "fat_loss": "losses", "trades_loss": "losses", "fat_trades_loss": "losses",
         "classwise_accuracy": "metrics", "average_accuracy": "metrics", "vcra": "metrics",
         "vca": "metrics", "worst_class_accuracy": "metrics", "classwise_loss": "metrics",
         "fuse_models": "fused", "split_models": "fused"}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module("." + _HOME[name], __name__), name)
    raise AttributeError(f"module 'fastfat' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
