"""Seeds in `fastfat report`: every cell's metrics over its seeds (mean, sample standard deviation,
n and a 95% interval of the mean from the t distribution, cut to the range the quantity can take),
and paired differences of each method against its base method (config.base_method) over the seeds
both have, with their interval cut to the difference's range (docs/evaluation.md says why).

The per-seed frame these work on is report.Data.runs: one row per finished point (less its
seed: report.CELL), seed, checkpoint ('last' | 'best'), attack (including "clean") and eps_test,
with the fractions avg_acc, worst_acc, worst_k_acc, the raw vcra and nstd (std / mean).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ..config import base_method
from .labels import METHOD_ORDER, attack_title, dataset_name, eps_label, method_label, method_name, model_name
from .tables import Table

LEVEL = 0.95                     # the intervals' coverage
STAT_METRICS = ["avg_acc", "worst_acc", "worst_k_acc", "nstd", "vcra"]
PAIRED_METRICS = ["avg_acc", "worst_acc", "vcra"]
# The range each quantity can take (fractions; vcra is a population variance of values in [0, 1],
# at most 1/4 by Popoviciu's inequality); a mean lies in it, so its interval is cut to it.
RANGE = {"avg_acc": (0.0, 1.0), "worst_acc": (0.0, 1.0), "worst_k_acc": (0.0, 1.0),
         "vcra": (0.0, 0.25), "nstd": (0.0, math.inf)}


def diff_range(metric: str) -> tuple[float, float]:
    """The range of a difference of two means of the metric: [lo - hi, hi - lo]."""
    lo, hi = RANGE[metric]
    return lo - hi, hi - lo
CELL = ["setting", "dataset", "model", "method", "lam", "eps_train"]   # a grid point less its seed
SINGLE = "1 (single seed)"       # how a one-seed cell's n is printed: no interval exists

# report.md's words before the seed and the paired tables
SEEDS_INTRO = ("Intervals are for the mean over seeds: mean ± t(0.975, n-1) · std / sqrt(n), cut to "
               "the range the quantity can take (accuracies 0-100 %, var 0-25 x10^-2): the mean lies "
               "in that range, so the cut keeps the coverage.")
PAIRED_INTRO = ("Differences are taken seed by seed (the same seed trains both methods), which removes "
                "the variation the two share; the interval is the t interval of the mean difference, "
                "cut to the range a difference can take (-100 to 100 points, -25 to 25 x10^-2).")


def eps_key(x: float) -> float:
    """An eps (or lambda) as a grouping key: rounded so 8/255 from two sources compares equal."""
    return round(float(x), 10)


@dataclass(frozen=True)
class Spread:
    """Values over seeds: mean, sample standard deviation (ddof 1), n, and the two-sided LEVEL
    interval of the mean, mean -+ t_{(1+LEVEL)/2, n-1} * std / sqrt(n), cut to the bounds the
    mean can take. With n = 1 the std and the interval are NaN (undefined), with n = 0 everything is."""
    mean: float
    std: float
    n: int
    lo: float
    hi: float


def spread(values, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Spread:
    """The Spread of values (None and NaN left out), summed in order as the tables' means are;
    bounds: the range the mean can take (the interval is cut to it, which keeps its coverage:
    the true mean is always inside)."""
    from scipy.stats import t

    v = [float(x) for x in values if x is not None and x == x]
    n, nan = len(v), math.nan
    if n == 0:
        return Spread(nan, nan, 0, nan, nan)
    mean = sum(v) / n
    if n == 1:
        return Spread(mean, nan, 1, nan, nan)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = float(t.ppf((1 + LEVEL) / 2, n - 1)) * std / math.sqrt(n)
    return Spread(mean, std, n, max(bounds[0], mean - half), min(bounds[1], mean + half))


def n_text(n: int) -> str:
    return SINGLE if n == 1 else str(n)


def ordered(frame: pd.DataFrame, attacks: list[str]) -> pd.DataFrame:
    """Rows in report order: data set, setting, method (the paper's first, others as first
    seen), lambda, model, eps_train, last before best, clean then attacks in order, eps."""
    first = list(dict.fromkeys(frame.method))
    rank = {m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER) + first.index(m))
            for m in first}
    att = {a: i for i, a in enumerate(["clean"] + list(attacks))}
    keys = pd.DataFrame({"m": frame.method.map(rank), "c": frame.checkpoint != "last",
                         "a": frame.attack.map(lambda a: att.get(a, len(att)))}, index=frame.index)
    order = (pd.concat([frame, keys], axis=1)
             .sort_values(["dataset", "setting", "m", "lam", "model", "eps_train", "c", "a", "eps"],
                          kind="stable").index)
    return frame.loc[order].reset_index(drop=True)


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell, checkpoint, attack and eps: n (seeds) and, per metric m of STAT_METRICS,
    m (mean), m_std, m_lo, m_hi and m_n (the seeds that define it: nstd is undefined where every
    class is at 0). In the runs' first-seen order."""
    rows = []
    for key, g in runs.groupby(CELL + ["checkpoint", "attack", "eps"], sort=False):
        row = dict(zip(CELL + ["checkpoint", "attack", "eps"], key), n=g.seed.nunique())
        for m in STAT_METRICS:
            s = spread(g[m], RANGE[m])
            row.update({m: s.mean, f"{m}_std": s.std, f"{m}_lo": s.lo, f"{m}_hi": s.hi, f"{m}_n": s.n})
        rows.append(row)
    return pd.DataFrame(rows)


def pairs(runs: pd.DataFrame):
    """Each method cell with a base method, per checkpoint, attack and eps, matched with the base
    method's runs of the same setting, data set, model, eps_train, checkpoint, attack and eps on
    the seeds both have. Yields (key: CELL + checkpoint, attack, eps values; base method;
    [(seed, method row, base row)] in seed order)."""
    match = ["setting", "dataset", "model", "eps_train", "checkpoint", "attack", "eps"]
    by = {}
    for r in runs.itertuples(index=False):
        by.setdefault((r.method,) + tuple(getattr(r, c) for c in match), {})[r.seed] = r
    for key, g in runs.groupby(CELL + ["checkpoint", "attack", "eps"], sort=False):
        cell = dict(zip(CELL + ["checkpoint", "attack", "eps"], key))
        base = base_method(cell["method"])
        if base is None:
            continue
        theirs = by.get((base,) + tuple(cell[c] for c in match), {})
        mine = {r.seed: r for r in g.itertuples(index=False)}
        yield key, base, [(s, mine[s], theirs[s]) for s in sorted(mine) if s in theirs]


def paired(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method cell (with a base method), checkpoint, attack and eps: base, n (pairs) and per
    metric m of PAIRED_METRICS the Spread of method minus base over the pairs: d_m, d_m_lo,
    d_m_hi, d_m_std."""
    rows = []
    for key, base, matched in pairs(runs):
        if not matched:
            continue
        row = dict(zip(CELL + ["checkpoint", "attack", "eps"], key), base=base, n=len(matched))
        for m in PAIRED_METRICS:
            s = spread([getattr(a, m) - getattr(b, m) for _, a, b in matched], diff_range(m))
            row.update({f"d_{m}": s.mean, f"d_{m}_std": s.std, f"d_{m}_lo": s.lo, f"d_{m}_hi": s.hi})
        rows.append(row)
    return pd.DataFrame(rows)


def _where(attack: str, eps: float) -> list[str]:
    return [attack_title(attack), "-" if attack == "clean" else eps_label(eps)]


def seed_tables(data) -> list[Table]:
    """Per setting and data set: each cell's mean, its 95% interval and n, for the average and
    worst-class accuracy (%) and var (10^-2), clean and per attack, last and best checkpoints."""
    out = []
    stats = ordered(data.stats, data.attacks)
    for (setting, dataset), g in stats.groupby(["setting", "dataset"], sort=False):
        tag, slug = data.tag(setting)
        t = Table(slug=f"seeds_{dataset}{slug}", title=f"Seeds ({dataset_name(dataset)}{tag})",
                  caption=f"Each cell over its seeds: mean ± std (sample standard deviation), n "
                          f"seeds and the {LEVEL:.0%} interval of the mean (t distribution, n-1 "
                          f"degrees of freedom) cut to the quantity's range; n = 1: a single "
                          f"seed, no interval. avg and worst (worst class) in %, var in 10^-2; checkpoint last (final epoch) or best "
                          f"(selected on the validation split).",
                  stub=["model", "method", "eps_train", "checkpoint", "attack", "eps_test", "n"],
                  header=[[("avg", 3), ("worst", 3), ("var", 3)], [("mean", 1), ("95% lo", 1), ("95% hi", 1)] * 3],
                  digits=[2] * 9)
        for r in g.itertuples(index=False):
            vals, sds = [], []
            for m in ("avg_acc", "worst_acc", "vcra"):
                vals += [100 * getattr(r, m), 100 * getattr(r, f"{m}_lo"), 100 * getattr(r, f"{m}_hi")]
                sds += [100 * getattr(r, f"{m}_std"), None, None]
            t.rows.append(([model_name(r.model), method_label(r.method, r.lam), eps_label(r.eps_train),
                            r.checkpoint, *_where(r.attack, r.eps), n_text(r.n)], vals, [False] * 9))
            t.spread.append(sds)
        out.append(t)
    return out


def paired_tables(data) -> list[Table]:
    """Per setting and data set: each method minus its base method over the seeds both have
    (mean difference and its 95% interval) for average and worst-class accuracy and var."""
    out = []
    if data.paired.empty:
        return out
    rows = ordered(data.paired, data.attacks)
    for (setting, dataset), g in rows.groupby(["setting", "dataset"], sort=False):
        tag, slug = data.tag(setting)
        t = Table(slug=f"paired_{dataset}{slug}", title=f"Paired comparison ({dataset_name(dataset)}{tag})",
                  caption=f"Each method minus its base method, seed by seed (same data set, model, "
                          f"eps_train, checkpoint and seed): mean difference ± std over the pairs and "
                          f"its {LEVEL:.0%} interval (t distribution, cut to the difference's "
                          f"range); an interval that excludes 0 is a difference the seeds support. avg and worst in percentage points, var "
                          f"in 10^-2; n = 1: a single pair, no interval.",
                  stub=["model", "method", "base", "eps_train", "checkpoint", "attack", "eps_test", "pairs"],
                  header=[[("diff avg", 3), ("diff worst", 3), ("diff var", 3)],
                          [("mean", 1), ("95% lo", 1), ("95% hi", 1)] * 3],
                  digits=[2] * 9)
        for r in g.itertuples(index=False):
            vals, sds = [], []
            for m in PAIRED_METRICS:
                vals += [100 * getattr(r, f"d_{m}"), 100 * getattr(r, f"d_{m}_lo"), 100 * getattr(r, f"d_{m}_hi")]
                sds += [100 * getattr(r, f"d_{m}_std"), None, None]
            t.rows.append(([model_name(r.model), method_label(r.method, r.lam), method_name(r.base),
                            eps_label(r.eps_train), r.checkpoint, *_where(r.attack, r.eps), n_text(r.n)],
                           vals, [False] * 9))
            t.spread.append(sds)
        out.append(t)
    return out
