"""fastfat.kernels: one dispatch point per kernel.

Each public function here picks an implementation per call: the Triton kernel for CUDA tensors
(when Triton is importable), the plain-torch twin (kernels/torch_ops.py) otherwise. The
environment variable FASTFAT_KERNELS=triton|torch forces either; with TRITON_INTERPRET=1,
"triton" runs the kernels on CPU tensors through Triton's interpreter.

Everything in fastfat that updates an adversarial example or reduces a loss per class goes
through these functions, and nothing else re-implements them.
"""
from __future__ import annotations

import functools
import os

import torch

from . import torch_ops
from .torch_ops import (AUTHORS_SLOTS, CIFAR100_COARSE, CIFAR100_COARSE_AUTHORS, VCAR_MODES, per_sample,
                        superclass_map, upcast, vcar_from_stats)

__all__ = ["backend", "pgd_step", "class_stats", "class_ce_stats", "fat_ce_loss", "vcar_from_stats",
           "cw_margin", "trades_kl", "upcast",
           "CIFAR100_COARSE", "CIFAR100_COARSE_AUTHORS", "superclass_map", "AUTHORS_SLOTS", "VCAR_MODES"]


@functools.lru_cache(maxsize=None)
def _triton_ops():
    """The Triton implementations, imported once on first use (Triton is heavy and optional).

    Any import failure (no Triton, a Triton too old for the kernels, a broken install) means
    "no Triton": the torch twins serve, silently, unless FASTFAT_KERNELS=triton asks otherwise.
    """
    try:
        from . import triton_ops
    except Exception:  # noqa: BLE001 - e.g. ImportError, or a RuntimeError from a broken Triton
        return None
    return triton_ops


def backend(t: torch.Tensor) -> str:
    """Which implementation serves tensor t: "triton" or "torch"."""
    forced = os.environ.get("FASTFAT_KERNELS", "").strip().lower()
    if forced not in ("", "triton", "torch"):
        raise ValueError(f"FASTFAT_KERNELS must be 'triton' or 'torch', not {forced!r}")
    if forced == "torch":
        return "torch"
    if forced == "triton" or t.is_cuda:
        if _triton_ops() is not None:
            return "triton"
        if forced == "triton":
            raise RuntimeError("FASTFAT_KERNELS=triton but the Triton kernels cannot be imported")
    return "torch"


def _impl(t: torch.Tensor):
    return _triton_ops() if backend(t) == "triton" else torch_ops


def pgd_step(x_adv, x_nat, grad, alpha, eps):
    """In place l_inf PGD update; see torch_ops.pgd_step. alpha, eps: floats or per-sample [N]."""
    return _impl(x_adv).pgd_step(x_adv, x_nat, grad, alpha, eps)


def class_stats(values, y, num_classes):
    """Per-class (sums, counts) of a per-sample quantity [N]; see torch_ops.class_stats."""
    return _impl(values).class_stats(values, y, num_classes)


def class_ce_stats(logits, y, num_classes):
    """(per-sample CE, class sums, class counts) of logits [N, C]; see torch_ops.class_ce_stats."""
    return _impl(logits).class_ce_stats(logits, y, num_classes)


def fat_ce_loss(logits, y, num_classes, lam, mode="paper", superclass=False, ce_weight=1.0):
    """(ce_weight * mean CE + lam * VCAR, mean CE, VCAR); see torch_ops.fat_ce_loss."""
    return _impl(logits).fat_ce_loss(logits, y, num_classes, lam, mode, superclass, ce_weight)


def cw_margin(logits, y, kappa=50.0):
    """Per-sample C&W margin objective [N] (to maximise); see torch_ops.cw_margin."""
    return _impl(logits).cw_margin(logits, y, kappa)


def trades_kl(logits_adv, logits_nat):
    """Per-sample TRADES KL(softmax(nat) || softmax(adv)) [N]; see torch_ops.trades_kl."""
    return _impl(logits_adv).trades_kl(logits_adv, logits_nat)
