"""Single config values: the field maker with --help text (opt), radii and step sizes in pixel
units (parse_eps, resolve_step), attack names (canonical_attack), and the checks
TrainConfig/EvalConfig.validate and the methods' checks make of one value (check_choice,
check_range, check_seed, check_int_at_least), each failing with one clear UserError line."""
from __future__ import annotations

import dataclasses
import math
import re

from .errors import UserError


def opt(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING):
    """A config field with its --help text (read by fastfat.cli.flags); method modules declare
    their hyperparameters with it too."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


def parse_eps(value) -> float:
    """A radius or step in pixel units: 0.03, "0.03" or "8/255" -> float."""
    if isinstance(value, bool):
        raise UserError(f"not a number: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    s = str(value).strip()
    m = re.fullmatch(r"([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)", s)
    try:
        v = float(m.group(1)) / float(m.group(2)) if m else float(s)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"not a number or fraction: {value!r} (examples: 0.03, 8/255)") from None
    return v


def resolve_step(spec: str | float, eps: float) -> float:
    """Attack step size from a spec: a number ("0.007", "2/255") or relative ("eps/10", "eps/4")."""
    s = str(spec).strip().replace(" ", "")
    try:
        m = re.fullmatch(r"eps/([0-9.]+)", s)
        if m:
            return eps / float(m.group(1))
        m = re.fullmatch(r"([0-9.]+)\*eps", s)
        if m:
            return float(m.group(1)) * eps
    except (ValueError, ZeroDivisionError):   # "eps/0", "eps/."
        raise UserError(f"not a step size: {spec!r} (examples: 0.007, 2/255, eps/4, 2*eps)") from None
    return parse_eps(s)


def canonical_attack(name: str) -> str:
    """'fgsm' | 'pgdK' (e.g. 'pgd20', 'PGD-20') | 'cw' (C&W-inf, also 'cw-inf', 'cw30') |
    'aa' (standard AutoAttack, also 'autoattack') | 'apgd' (its APGD-CE + APGD-T pair)."""
    s = name.strip().lower().replace("-", "").replace("_", "").replace("&", "")
    if s == "fgsm":
        return "fgsm"
    if s in ("cw", "cwinf", "cw30"):
        return "cw"
    if s in ("aa", "autoattack"):
        return "aa"
    if s == "apgd":
        return "apgd"
    m = re.fullmatch(r"pgd(\d+)", s)
    if m and int(m.group(1)) >= 1:
        return f"pgd{int(m.group(1))}"
    raise UserError(f"unknown attack {name!r}; choose from fgsm, pgd20 (pgdK for K steps), cw, "
                    f"aa (AutoAttack), apgd (APGD-CE + APGD-T)")


def check_choice(name, value, choices):
    """UserError naming `name` and the choices unless value is one of them."""
    if value not in choices:
        raise UserError(f"{name}: unknown value {value!r}; choose one of {', '.join(choices)}")


def check_range(name, value, low, high, low_open=False):
    """value in [low, high] ((low, high] with low_open); never inf (high=math.inf means unbounded)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise UserError(f"{name}: expected a number, got {value!r}")
    if value < low or value > high or (low_open and value == low) or math.isinf(value):
        lo = "(" if low_open else "["
        hi = ")" if math.isinf(high) else "]"
        raise UserError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")


# Seeds are 32-bit: epoch_generator seeds torch with (seed * SEED_SCALE + epoch) * 2 + stream,
# which must stay below 2**64 (torch.Generator.manual_seed), with room for any epoch count.
SEED_LIMIT = 2 ** 32


def check_seed(value):
    """UserError unless value is an int seed in [0, SEED_LIMIT)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < SEED_LIMIT:
        raise UserError(f"seed must be an integer in [0, 2**32), got {value!r}")


def check_int_at_least(name, value, low):
    """UserError naming `name` unless value is an int (not a bool) >= low."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
