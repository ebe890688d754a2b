"""Peer robust-fairness methods (CFA, DAFA, ...) as per-run state the Trainer consults.

How a method plugs in (natural, madry, trades and fat-* have no state and keep their own code):
1. fastfat/config.py: its name in METHODS, BASE_METHODS[name] = "madry" or "trades" (the method
   it modifies: the attack objective, the forwards and the rho of the report follow it), and its
   hyperparameters as TrainConfig fields named after it (cfa_*, dafa_*), with the papers'
   defaults; their checks go in check_config below (TrainConfig.validate calls it).
2. A module here with a subclass of base.MethodState that overrides what the method changes:
   start_epoch, radii (per-sample attack eps/alpha from labels), loss (from the train-mode
   logits; accumulate per-class statistics there through fastfat.kernels, e.g. base.ClassSums),
   end_epoch (update from the epoch's statistics and its validation scores, return log fields),
   state_dict/load_state_dict (saved in every checkpoint: resume stays exact). See MethodState.
3. Its class in REGISTRY below. The Trainer then builds it (build), train() drives the epochs,
   checkpoints and resumes it, and load_model evaluates its EVAL_MODEL weights if it has any.
4. It does not fuse (fastfat.fused.train.check_fusable refuses methods outside FAMILIES): fused
   groups carry no method state.
"""
from __future__ import annotations

import math

from ..errors import UserError
from .base import EVAL_MODEL, MethodState, epochs_of
from .cfa import CFA
from .dafa import DAFA
from .frl import FRL
from .wat import WAT

REGISTRY: dict[str, type[MethodState]] = {
    "cfa-madry": CFA, "cfa-trades": CFA,
    "dafa-madry": DAFA, "dafa-trades": DAFA,
    "wat": WAT, "frl-rw": FRL, "frl-rwrm": FRL,
}


def build(cfg, num_classes: int, device) -> MethodState | None:
    """The method state of cfg's run, or None for a method without one (natural, madry, trades,
    fat-*), whose training does not change at all."""
    cls = REGISTRY.get(cfg.method)
    return None if cls is None else cls(cfg, num_classes, device)


def eval_weights(checkpoint: dict) -> dict | None:
    """The model state dict a checkpoint's evaluation takes instead of its trained weights (a
    method's EVAL_MODEL, e.g. CFA's FAWA average), or None."""
    return (checkpoint.get("method") or {}).get(EVAL_MODEL)


def check_config(cfg) -> None:
    """UserError for a peer method's hyperparameter out of range or a combination that cannot
    run; called by TrainConfig.validate, after the generic checks."""
    from ..config import _range

    for name in ("cfa_lambda1", "cfa_lambda2", "dafa_lambda"):
        _range(name, getattr(cfg, name), 0.0, math.inf)
    _range("cfa_fawa_decay", cfg.cfa_fawa_decay, 0.0, 1.0)
    _range("cfa_fawa_threshold", cfg.cfa_fawa_threshold, 0.0, 1.0)
    for name in ("cfa_begin", "dafa_warmup"):
        _epoch_count(name, getattr(cfg, name))
    if cfg.method.startswith("cfa-"):
        begin = epochs_of(cfg.cfa_begin, cfg.epochs)
        if begin >= cfg.epochs:
            raise UserError(f"cfa_begin {cfg.cfa_begin:g}: CFA calibrates from epoch {begin + 1} on, "
                            f"but the run has {cfg.epochs} epochs; give a smaller --cfa-begin")
        if cfg.cfa_fawa and cfg.val_per_class is None:
            raise UserError(f"{cfg.method}: FAWA updates its weight average only in epochs whose "
                            f"validation worst-class robust accuracy reaches cfa_fawa_threshold; "
                            f"give --val-per-class (CFA holds out 2% of each class: 0.02) or "
                            f"turn FAWA off with --no-cfa-fawa")
    if cfg.method.startswith("dafa-"):
        warm = epochs_of(cfg.dafa_warmup, cfg.epochs)
        if warm >= cfg.epochs:
            raise UserError(f"dafa_warmup {cfg.dafa_warmup:g}: DAFA sets its class weights after "
                            f"epoch {warm}, but the run has {cfg.epochs} epochs; give a smaller "
                            f"--dafa-warmup (an epoch count, or a fraction such as 0.64)")
    _check_wat_frl(cfg)


def _check_wat_frl(cfg) -> None:
    """WAT's and FRL's fields; both update from the validation split. FRL's bounds stay None for
    their per-method default (frl.bounds), so a sweep's points keep one setting."""
    from ..config import _range

    if cfg.method in ("wat", "frl-rw", "frl-rwrm") and cfg.val_per_class is None:
        raise UserError(f"method {cfg.method} updates its class weights from a validation split: "
                        f"give --val-per-class (their code holds out 300 of CIFAR-10's 5000 per "
                        f"class: 0.06)")
    _range("wat_eta", cfg.wat_eta, 0.0, math.inf, low_open=True)
    for name in ("frl_bound_nat", "frl_bound_bndy"):
        if getattr(cfg, name) is not None:
            _range(name, getattr(cfg, name), 0.0, 1.0)
    for name in ("frl_rate_nat", "frl_rate_bndy", "frl_rate_margin"):
        _range(name, getattr(cfg, name), 0.0, math.inf)
    _range("frl_lim", cfg.frl_lim, 0.0, 1.0)
    if cfg.frl_lim == 1.0:   # 1/C + lam_c - sum(lam)/C reaches 0 for a class at lam_c = 0
        raise UserError("frl_lim must be below 1 (at 1 a class's loss weight can reach 0), got 1.0")
    _range("frl_margin_max", cfg.frl_margin_max, 1.0, math.inf)


def _epoch_count(name: str, value) -> None:
    from ..config import _range
    _range(name, value, 0.0, math.inf, low_open=True)
    if value >= 1 and not float(value).is_integer():
        raise UserError(f"{name} must be a whole number of epochs (>= 1) or a fraction of the "
                        f"epochs in (0, 1), got {value:g}")


__all__ = ["EVAL_MODEL", "MethodState", "REGISTRY", "build", "check_config", "eval_weights"]
