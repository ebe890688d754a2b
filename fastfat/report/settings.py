"""What a sweep file says about its report: `report = "DIR"`, or a [report] table with dir, attack
and eps (the attack and eps_test of the answer, the verdicts, Table 2 and every figure), checked
against the sweep's evaluation before anything runs."""
from __future__ import annotations

import os

from ..config_values import canonical_attack, parse_eps
from ..errors import UserError

KEYS = ("dir", "attack", "eps")


def report_section(value, base: str, attacks: list[str], eps_test: list[float]) -> tuple[str | None, dict]:
    """(report directory or None, write_report's keyword options) from a sweep file's `report`
    entry: a path string or a table of KEYS; base: the sweep file's directory; attacks and
    eps_test: what the sweep evaluates (a chosen attack or eps must be among them).

    Raises UserError naming the key at fault."""
    if value is None:
        return None, {}
    if isinstance(value, str):
        return os.path.join(base, value), {}
    if not isinstance(value, dict):
        raise UserError(f"report must be a path (report = \"DIR\") or a [report] table, got {value!r}")
    bad = sorted(set(value) - set(KEYS))
    if bad:
        raise UserError(f"unknown [report] key(s): {', '.join(bad)}; valid: {', '.join(KEYS)}")
    out, options = None, {}
    if "dir" in value:
        if not isinstance(value["dir"], str):
            raise UserError(f"[report] dir must be a string (a path), got {value['dir']!r}")
        out = os.path.join(base, value["dir"])
    if "attack" in value:
        if not isinstance(value["attack"], str):
            raise UserError(f"[report] attack must be a string, got {value['attack']!r}")
        attack = canonical_attack(value["attack"])
        if attack not in attacks:
            raise UserError(f"[report] attack = \"{value['attack']}\": the sweep evaluates "
                            f"{', '.join(attacks)} only ([eval] attacks)")
        options["attack"] = attack
    if "eps" in value:
        eps = parse_eps(value["eps"])
        if not any(abs(eps - e) < 1e-9 for e in eps_test):
            raise UserError(f"[report] eps = {value['eps']!r}: the sweep evaluates eps_test "
                            f"{', '.join(f'{e:g}' for e in eps_test)} only ([eval] eps_test)")
        options["eps"] = eps
    return out, options
