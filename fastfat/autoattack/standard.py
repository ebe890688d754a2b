"""AutoAttack's standard settings (pyautoattack 0.2.0's l_inf standard version), the attack names
fastfat runs, the implementations, and the settings record eval.json carries.

`aa` is the standard version (APGD-CE, APGD-T with 9 targets, FAB-T with 9 targets, Square with
5000 queries, 100 iterations each); `apgd` is its first two attacks, the cheap strong pair, with
the same settings, so its robust set after them is the one standard AutoAttack starts FAB-T from.
"""
from __future__ import annotations

from ..errors import UserError

ATTACKS = ("aa", "apgd")
IMPLS = ("fastfat", "pyautoattack")   # fastfat's own (batched) | the authors' package
SPEC = "pyautoattack 0.2.0"           # what fastfat's implementation reproduces

# the sub-attacks per fastfat attack, in the order they run (pyautoattack's names)
ENSEMBLES = {"aa": ("apgd-ce", "apgd-t", "fab-t", "square"), "apgd": ("apgd-ce", "apgd-t")}

# The standard version's l_inf settings (pyautoattack's AutoAttack constructor and
# _set_version("standard")). Tests may lower n_iter and square_n_queries; fastfat eval never does.
STANDARD = dict(n_iter=100, apgd_ce_restarts=1, apgd_t_restarts=1, n_target_classes=9, rho=0.75,
                fab_t_restarts=1, square_n_queries=5000, square_p_init=0.8)
TUNABLE = ("n_iter", "square_n_queries")


def parameters(attack: str, num_classes: int, **overrides) -> dict:
    """The parameters of `attack` ("aa" | "apgd") on a num_classes problem: norm, the attacks run
    in order and their parameters (n_iter is each of APGD-CE's, APGD-T's and FAB-T's iteration
    count; the target count is capped at num_classes - 1). overrides: n_iter, square_n_queries
    (tests only)."""
    if attack not in ENSEMBLES:
        raise ValueError(f"unknown AutoAttack attack {attack!r}; expected one of {ATTACKS}")
    unknown = set(overrides) - set(TUNABLE)
    if unknown:
        raise ValueError(f"unknown AutoAttack setting(s) {sorted(unknown)}; valid: {list(TUNABLE)}")
    s = {**STANDARD, **overrides}
    s["n_target_classes"] = min(s["n_target_classes"], num_classes - 1)
    if attack == "apgd":
        for k in ("fab_t_restarts", "square_n_queries", "square_p_init"):
            del s[k]
    return {"norm": "Linf", "attacks": list(ENSEMBLES[attack]), **s}


def settings(attack: str, num_classes: int, impl: str = "fastfat", **overrides) -> dict:
    """The settings of `attack` ("aa" | "apgd") as eval.json records them: the implementation
    (fastfat | pyautoattack), its package and version, (fastfat's) the spec it follows, then
    parameters(attack, num_classes, **overrides)."""
    if impl == "fastfat":
        from .. import __version__
        head = dict(implementation="fastfat", package="fastfat", version=__version__, spec=SPEC)
    elif impl == "pyautoattack":
        from importlib.metadata import version
        head = dict(implementation="pyautoattack", package="pyautoattack", version=version("pyautoattack"))
    else:
        raise ValueError(f"unknown AutoAttack implementation {impl!r}; expected one of {IMPLS}")
    s = parameters(attack, num_classes, **overrides)
    return {**head, "norm": s.pop("norm"), "attacks": s.pop("attacks"), **s}


def check_classes(attack: str, num_classes: int) -> None:
    """UserError (a ValueError) when `attack` cannot run on num_classes classes: APGD-T's targeted
    DLR loss reads the 4th largest logit, so aa and apgd need at least 4 (pyautoattack's check)."""
    if attack in ENSEMBLES and "apgd-t" in ENSEMBLES[attack] and num_classes < 4:
        raise UserError(f"{attack}: AutoAttack's APGD-T (targeted DLR loss) needs at least 4 classes; "
                        f"the model has {num_classes}")
