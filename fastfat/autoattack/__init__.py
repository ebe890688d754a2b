"""AutoAttack as fastfat's attacks `aa` (the standard version: APGD-CE, APGD-T, FAB-T, Square) and
`apgd` (its first two attacks), fastfat's own implementation (default) or pyautoattack's.

A sample is robust only if it is classified correctly and no attack of the ensemble fooled it.
fastfat's implementation follows pyautoattack 0.2.0's algorithms and standard settings; it batches
every eps_test and every target class, and drops a sample once it is fooled (docs/autoattack.md).
"""
from .ensemble import IMPLS, run, run_batch, settings
from .pyaa import ATTACKS, ENSEMBLES, STANDARD, TUNABLE, VERSION

__all__ = ["ATTACKS", "ENSEMBLES", "IMPLS", "STANDARD", "TUNABLE", "VERSION", "run", "run_batch", "settings"]
