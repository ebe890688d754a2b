"""fastfat.kernels: one dispatch point per kernel.

Each public function here picks an implementation per call: the Triton kernel for CUDA tensors
(when Triton is importable), the plain-torch twin (kernels/torch_ops.py) otherwise. The
environment variable FASTFAT_KERNELS=triton|torch forces either; with TRITON_INTERPRET=1,
"triton" runs the kernels on CPU tensors through Triton's interpreter.

Everything in fastfat that updates an adversarial example or reduces a loss per class goes
through these functions, and nothing else re-implements them. A CUDA tensor served by a torch
twin (Triton does not import, or a kernel cannot take the input) is counted and warned about
once (kernels/fallbacks.py; `fallback_counts()`).
"""
from __future__ import annotations

import functools
import os

import torch

from . import fallbacks, torch_ops
from .fallbacks import KernelFallbackWarning
from .torch_ops import (AUTHORS_SLOTS, CIFAR100_COARSE, CIFAR100_COARSE_AUTHORS, VCAR_MODES, per_sample,
                        superclass_map, upcast, vcar_from_stats)

__all__ = ["backend", "fallback_counts", "reset_fallback_counts", "KernelFallbackWarning",
           "pgd_step", "class_stats", "class_ce_stats", "fat_ce_loss", "vcar_from_stats",
           "cw_margin", "trades_kl", "upcast", "per_sample",
           "CIFAR100_COARSE", "CIFAR100_COARSE_AUTHORS", "superclass_map", "AUTHORS_SLOTS", "VCAR_MODES"]


_TRITON_IMPORT_ERROR: list[str] = []   # why `import triton_ops` failed, for the fallback warning


@functools.lru_cache(maxsize=None)
def _triton_ops():
    """The Triton implementations, imported once on first use (Triton is heavy and optional).

    Any import failure (no Triton, a Triton too old for the kernels, a broken install) means
    "no Triton": the torch twins serve CUDA tensors, each call counted as a fallback and the
    first one warned about with the import error; FASTFAT_KERNELS=triton raises instead.
    """
    try:
        from . import triton_ops
    except Exception as e:  # noqa: BLE001 - e.g. ImportError, or a RuntimeError from a broken Triton
        _TRITON_IMPORT_ERROR.append(f"{type(e).__name__}: {e}")
        return None
    return triton_ops


def fallback_counts() -> dict[str, int]:
    """{"op: reason": calls} of CUDA (or forced-Triton) calls served by a torch twin since the
    last reset_fallback_counts(); empty when Triton served everything."""
    return fallbacks.counts()


def reset_fallback_counts() -> None:
    fallbacks.reset()


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


def _impl(t: torch.Tensor, op: str):
    if backend(t) == "triton":
        return _triton_ops()
    if t.is_cuda and _TRITON_IMPORT_ERROR and os.environ.get("FASTFAT_KERNELS", "").strip().lower() != "torch":
        fallbacks.record(op, f"Triton did not import ({_TRITON_IMPORT_ERROR[0]})")
    return torch_ops


def pgd_step(x_adv, x_nat, grad, alpha, eps):
    """In place l_inf PGD update; see torch_ops.pgd_step. alpha, eps: floats or per-sample [N]."""
    return _impl(x_adv, "pgd_step").pgd_step(x_adv, x_nat, grad, alpha, eps)


def class_stats(values, y, num_classes):
    """Per-class (sums, counts) of a per-sample quantity [N]; see torch_ops.class_stats."""
    return _impl(values, "class_stats").class_stats(values, y, num_classes)


def class_ce_stats(logits, y, num_classes):
    """(per-sample CE, class sums, class counts) of logits [N, C]; see torch_ops.class_ce_stats."""
    return _impl(logits, "class_ce_stats").class_ce_stats(logits, y, num_classes)


def fat_ce_loss(logits, y, num_classes, lam, mode="paper", superclass=False, ce_weight=1.0):
    """(ce_weight * mean CE + lam * VCAR, mean CE, VCAR); see torch_ops.fat_ce_loss."""
    return _impl(logits, "fat_ce_loss").fat_ce_loss(logits, y, num_classes, lam, mode, superclass, ce_weight)


def cw_margin(logits, y, kappa=50.0):
    """Per-sample C&W margin objective [N] (to maximise); see torch_ops.cw_margin."""
    return _impl(logits, "cw_margin").cw_margin(logits, y, kappa)


def trades_kl(logits_adv, logits_nat):
    """Per-sample TRADES KL(softmax(nat) || softmax(adv)) [N]; see torch_ops.trades_kl."""
    return _impl(logits_adv, "trades_kl").trades_kl(logits_adv, logits_nat)
