"""The report's verdicts: one sentence per method against its base method at each eps_train, read
from the paired table (seeds.paired) under the chosen attack: the change in var, the cost in
average robust accuracy, and the cost in clean average and worst-class accuracy, with intervals."""
from __future__ import annotations

from .labels import attack_title, dataset_name, eps_label, method_label, method_name, model_name
from .seeds import LEVEL, eps_key, ordered
from .tables import fmt


def _interval(mean: float, lo: float, hi: float, digits: int) -> str:
    """'1.6 [0.2, 3.0]', or the mean alone where there is no interval (one pair)."""
    if lo != lo or hi != hi:
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def supported(lo: float, hi: float) -> bool:
    """The seeds support a difference when its interval exists and excludes 0."""
    return lo == lo and hi == hi and (lo > 0 or hi < 0)


def _cost(r, metric: str, what: str) -> str:
    """The method's cost in a metric against its base (base minus method, in points); a negative
    cost is said as a gain."""
    d, lo, hi = (100 * getattr(r, f"d_{metric}{s}") for s in ("", "_lo", "_hi"))
    word = "a gain" if d > 0 and fmt(d, 1) != "0.0" else "a cost"
    if word == "a cost":   # the cost's interval is the difference's, turned around
        d, lo, hi = -d, -hi, -lo
    return f"{word} of {_interval(d, lo, hi, 1)} points of {what}"


def _with(cost: str) -> str:
    return ("at " if cost.startswith("a cost") else "with ") + cost


def sentence(r, clean) -> str:
    """One paired row (robust) and its clean twin (or None) as a verdict sentence."""
    d, lo, hi = (100 * getattr(r, f"d_vcra{s}") for s in ("", "_lo", "_hi"))
    verb = "raises" if d > 0 and fmt(d, 2) != "0.00" else "lowers"
    size = _interval(abs(d), *(sorted((-hi, -lo)) if verb == "lowers" else (lo, hi)), 2)
    if r.n < 2:
        judged = "one pair: no interval"
    else:
        judged = "supported by the seeds" if supported(lo, hi) else "not supported by the seeds"
    out = (f"{method_label(r.method, r.lam, greek=True)} against {method_name(r.base)} at eps_train "
           f"{eps_label(r.eps_train)} ({r.n} pairs): {verb} var by {size} x10^-2 ({judged}), "
           + _with(_cost(r, 'avg_acc', 'average robust accuracy')))
    if clean is not None:
        out += (f"; clean: {_cost(clean, 'avg_acc', 'average')} and "
                f"{_cost(clean, 'worst_acc', 'worst-class accuracy')}")
    return out + "."


def verdicts(data, attack: str, eps: float) -> list[str]:
    """The verdict sentences (plain text) under `attack` at `eps` (last checkpoint), per setting,
    data set and model (named when the database holds more than one), in report order."""
    p = data.paired
    if p.empty:
        return []
    p = ordered(p, data.attacks)
    p = p[p.checkpoint == "last"]
    clean = {(r.setting, r.dataset, r.model, r.method, r.lam, r.eps_train): r
             for r in p[p.attack == "clean"].itertuples(index=False)}
    rows = p[(p.attack == attack) & (p.eps == eps_key(eps))]
    groups = list(rows.groupby(["setting", "dataset", "model"], sort=False))
    out = []
    for (setting, dataset, model), g in groups:
        tag, _ = data.tag(setting)
        where = f"{dataset_name(dataset)}, {model_name(model)}{tag}: " if len(groups) > 1 else ""
        for r in g.itertuples(index=False):
            key = (r.setting, r.dataset, r.model, r.method, r.lam, r.eps_train)
            out.append(where + sentence(r, clean.get(key)))
    return out


def heading(attack: str, eps: float) -> str:
    """The words above the verdicts."""
    return (f"Each method against its base method, seed by seed, under {attack_title(attack)} at "
            f"eps_test {eps_label(eps)} (last checkpoint); [{LEVEL:.0%} interval]; a cost is the base "
            f"method's accuracy minus the method's, in percentage points.")


