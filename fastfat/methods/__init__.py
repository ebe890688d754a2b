"""The registry of training methods, one line each in REGISTRY below: the base methods (natural,
Madry, TRADES, FAT on both; fastfat.methods.standard) and the robust-fairness methods that
followed (one module each); everything else (config fields, flags, sweep keys, report names,
fusion rules) reads it here.

Adding a method (the one-file recipe, docs/methods.md):
1. fastfat/methods/<name>.py: its hyperparameters as a dataclass of prefixed fields made with
   config_values.opt (the paper's defaults, help text), check(cfg) for their ranges and
   combinations, a base.MethodState subclass overriding what the method changes (radii, loss,
   start_epoch, end_epoch, state_dict/load_state_dict; see MethodState), and a module-level
   METHOD = base.Method(...) naming its method names, bases, titles and needs.
2. Its METHOD in REGISTRY below.
3. Its tests (tests/test_methods_*.py) and its section in docs/methods.md.
A method module imports neither fastfat.config nor fastfat.train (no import circle): the losses
are fastfat.losses', the checks fastfat.config_values'.
The peer methods do not fuse (Method.family None; Method.alone says why).
"""
from __future__ import annotations

from . import absld, bat, cfa, dafa, faal, fair_ard, frl, standard, wat
from .base import EVAL_MODEL, Method, MethodState, epochs_of

REGISTRY: tuple[Method, ...] = (
    standard.NATURAL,
    standard.MADRY,
    standard.TRADES,
    standard.FAT,
    cfa.METHOD,
    dafa.METHOD,
    wat.METHOD,
    frl.METHOD,
    faal.METHOD,
    fair_ard.METHOD,
    absld.METHOD,
    bat.METHOD,
)

# method name -> its Method, in registry order (the order of --help, tables and figures)
BY_NAME: dict[str, Method] = {name: m for m in REGISTRY for name in m.bases}
NAMES: tuple[str, ...] = tuple(BY_NAME)
# method name -> the method it is compared against (fat-madry -> madry), None for a base method
BASES: dict[str, str | None] = {name: m.bases[name] for name, m in BY_NAME.items()}
TITLES: dict[str, str] = {name: m.titles[name] for name, m in BY_NAME.items()}
LAMBDA: tuple[str, ...] = tuple(n for n, m in BY_NAME.items() if m.lam)
NO_ATTACK: tuple[str, ...] = tuple(n for n, m in BY_NAME.items() if not m.attacks)
FINE_TUNE: tuple[str, ...] = tuple(n for n, m in BY_NAME.items() if m.fine_tune)
TEACHER: tuple[str, ...] = tuple(n for n, m in BY_NAME.items() if m.teacher)
NEEDS_VALIDATION: tuple[str, ...] = tuple(n for n, m in BY_NAME.items() if m.needs_validation)
# methods whose own multi-step attack schedule has no single-step form (train_attack refused)
NO_SINGLE_STEP: tuple[str, ...] = tuple(n for n, m in BY_NAME.items() if m.attacks and not m.single_step)
# the hyperparameter dataclasses TrainConfig inherits, each once
PARAMS: tuple[type, ...] = tuple(dict.fromkeys(m.params for m in REGISTRY if m.params is not None))


def family(name: str) -> str | None:
    """The fusion family of a method (points of one family can train as one fused group), or
    None for a method that trains alone (its Method.alone says why)."""
    fam = BY_NAME[name].family
    return None if fam is None else fam[name]


def build(cfg, num_classes: int, device) -> MethodState:
    """The state of cfg.method's training for a run (fastfat.train.Trainer consults it)."""
    m = BY_NAME[cfg.method]
    return m.state(cfg, num_classes, device, BASES[cfg.method])


def eval_weights(checkpoint: dict) -> dict | None:
    """The model state dict a checkpoint's evaluation takes instead of its trained weights (a
    method's EVAL_MODEL, e.g. CFA's FAWA average), or None."""
    return (checkpoint.get("method") or {}).get(EVAL_MODEL)


def check_config(cfg) -> None:
    """UserError for a method's hyperparameter out of range or a combination that cannot run:
    every registered method's check (a bad value is an error even where unused); called by
    TrainConfig.validate after the generic checks, which cover needs_validation, fine_tune and
    teacher."""
    for m in REGISTRY:
        if m.check is not None:
            m.check(cfg)


__all__ = ["BASES", "BY_NAME", "EVAL_MODEL", "FINE_TUNE", "LAMBDA", "Method", "MethodState",
           "NAMES", "NEEDS_VALIDATION", "NO_ATTACK", "NO_SINGLE_STEP", "PARAMS", "REGISTRY", "TEACHER", "TITLES",
           "build", "check_config", "epochs_of", "eval_weights", "family"]
