"""AutoAttack as fastfat's attacks `aa` (the standard version: APGD-CE, APGD-T, FAB-T, Square) and
`apgd` (its first two attacks), fastfat's own implementation (default) or pyautoattack's; and
`AutoAttack`, the drop-in for the AutoAttack authors' class (dropin.py, docs/backend.md).

A sample is robust only if it is classified correctly and no attack of the ensemble fooled it.
fastfat's implementation follows pyautoattack 0.2.0's algorithms and standard settings; it batches
every eps_test and every target class, and drops a sample once it is fooled (docs/autoattack.md).
The names load on first use, so fastfat.config can read the settings without torch's attack code.
"""
import importlib

from .standard import ATTACKS, ENSEMBLES, IMPLS, STANDARD, TUNABLE, settings

_HOME = {"run": "ensemble", "run_batch": "ensemble", "run_plan": "ensemble", "VERSION": "pyaa",
         "AutoAttack": "dropin"}

__all__ = ["ATTACKS", "ENSEMBLES", "IMPLS", "STANDARD", "TUNABLE", "settings", *_HOME]


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module("." + _HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
