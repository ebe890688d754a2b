"""`fastfat report` across methods: the methods table (every method in the database, clean and
robust average / worst-class / k-worst accuracy, NSD = std / mean and the trade-off score rho
against its base method, last and best checkpoints, mean +- std over seeds) and the attack-gap
table (class by class, how much PGD-20 overstates robust accuracy against APGD or AutoAttack).

Generic over method names: a method's base is config.base_method (the registry's bases,
fastfat.methods), so methods added later need no change here.
"""
from __future__ import annotations

import math

import pandas as pd

from ..metrics import tradeoff_rho
from .labels import attack_title, class_names, dataset_name, eps_label, method_label, model_name
from .seeds import CELL, n_text, ordered, pairs, spread
from .tables import Table

WEAK = "pgd20"              # the attack the paper reports, whose gap the gap table measures
STRONG = ("apgd", "aa")     # AutoAttack's pair and its standard version
MAX_GAP_COLUMNS = 10        # on many classes, those with the largest gap

# report.md's words before the methods and the attack-gap tables
METHODS_INTRO = (
    "One table per robust attack and eps_test. avg is the average of the class accuracies, worst "
    "the lowest class, k-worst the mean of the k lowest (k: the evaluation's worst_k), NSD their "
    "standard deviation over their mean (lower is fairer, comparable across attacks; undefined "
    "where every class is at 0, and then left out of the seed mean); rho = (worst - worst_base) / "
    "worst_base - (avg_base - avg) / avg_base against the method's base method (FAT-Madry: Madry) "
    "on the same seed, then averaged (> 0: the worst class gained more, relatively, than the "
    "average lost). Each cell is the mean ± std over its seeds.")


def _strong_names(attacks) -> str:
    """The strong attacks among `attacks`, as titles: 'APGD', 'APGD and AA'."""
    return " and ".join(attack_title(a) for a in STRONG if a in set(attacks)) or "a stronger attack"


def gap_intro(data) -> str:
    """report.md's words before the attack-gap tables, naming the attacks the database holds."""
    what = {"apgd": "APGD (APGD-CE + APGD-T, AutoAttack's pair)", "aa": "standard AutoAttack (AA)"}
    run = " and ".join(what[a] for a in STRONG if a in data.attacks)
    return (f"PGD-20 is the paper's attack; {run or 'a stronger attack'} is stronger, and unevenly so "
            f"across classes: a fairness claim under PGD-20 alone can be wrong in the very quantity it "
            f"is about. Positive: PGD-20 overstates that class's robust accuracy.")


def _slug_eps(e: float) -> str:
    return eps_label(e).replace("/", "_")


def rho_spreads(runs: pd.DataFrame) -> dict:
    """{(CELL + checkpoint, attack, eps values): Spread of rho over seeds}: per seed, rho =
    metrics.tradeoff_rho of the method's worst-class and average accuracy against its base
    method's on the same seed (seeds.pairs matches them); methods without a base are absent."""
    return {key: spread([tradeoff_rho(a.worst_acc, a.avg_acc, b.worst_acc, b.avg_acc) for _, a, b in matched])
            for key, _, matched in pairs(runs) if matched}


def methods_tables(data) -> list[Table]:
    """Per setting, data set, model and robust (attack, eps_test): one row per method (and
    lambda), eps_train and checkpoint; clean and robust avg, worst, k-worst (%), NSD and rho,
    each mean ± std over the cell's seeds."""
    out = []
    stats = ordered(data.stats, data.attacks)
    rho = data.rho
    key_of = lambda r: tuple(getattr(r, c) for c in CELL + ["checkpoint", "attack", "eps"])
    clean = {key_of(r)[:-2]: r for r in stats[stats.attack == "clean"].itertuples(index=False)}
    ks = sorted({int(k) for k in data.runs.worst_k.dropna()})
    k_text = "/".join(map(str, ks)) or "3"
    for (setting, dataset, model, attack, eps), g in stats[stats.attack != "clean"].groupby(
            ["setting", "dataset", "model", "attack", "eps"], sort=False):
        tag, slug = data.tag(setting)
        t = Table(slug=f"methods_{dataset}_{model}_{attack}_{_slug_eps(eps)}{slug}",
                  title=f"Methods ({dataset_name(dataset)}, {model_name(model)}{tag}, "
                        f"{attack_title(attack)} at eps_test {eps_label(eps)})",
                  caption=f"Clean and robust average (avg), worst-class (worst) and mean of the {k_text} "
                          f"worst classes (k-worst) accuracy in %, NSD = std / mean of the class "
                          f"accuracies, rho against the base method; mean ± std over n seeds ((n=2) after a "
                          f"cell: only 2 of them define it). "
                          f"checkpoint: last (final epoch) or best (selected on the validation split).",
                  stub=["method", "eps_train", "checkpoint", "n"],
                  header=[[("clean", 5), (attack_title(attack), 5)],
                          [("avg", 1), ("worst", 1), ("k-worst", 1), ("NSD", 1), ("rho", 1)] * 2],
                  digits=[2, 2, 2, 3, 3] * 2)
        for r in g.itertuples(index=False):
            vals, sds, ns = [], [], []
            for x in (clean.get(key_of(r)[:-2]), r):
                if x is None:
                    vals += [math.nan] * 5
                    sds += [None] * 5
                    ns += [None] * 5
                    continue
                s = rho.get(key_of(x))
                vals += [100 * x.avg_acc, 100 * x.worst_acc, 100 * x.worst_k_acc, x.nstd,
                         math.nan if s is None else s.mean]
                sds += [100 * x.avg_acc_std, 100 * x.worst_acc_std, 100 * x.worst_k_acc_std, x.nstd_std,
                        None if s is None else s.std]
                # NSD (every class at 0) and rho (base's worst or avg at 0) some seeds leave undefined
                ns += [None] * 3 + [_fewer(x.nstd_n, r.n), None if s is None else _fewer(s.n, r.n)]
            t.rows.append(([method_label(r.method, r.lam), eps_label(r.eps_train), r.checkpoint, n_text(r.n)],
                           vals, [False] * 10))
            t.spread.append(sds)
            t.counts.append(ns)
        out.append(t)
    return out


def _fewer(n: int, of: int) -> int | None:
    """n where fewer than the row's `of` seeds define a statistic, else None (nothing to say)."""
    return int(n) if n < of else None


def attack_gaps(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell, checkpoint, eps_test and strong attack (apgd, aa) evaluated beside PGD-20: n
    (seeds with both), gap (PGD-20 minus strong, class by class, a list of fractions: the mean
    over seeds of each seed's difference, over the seeds where the class has test samples) and
    avg_gap (the same for the average accuracy)."""
    weak = runs[runs.attack == WEAK]
    if weak.empty:
        return pd.DataFrame()
    by = {(tuple(getattr(r, c) for c in CELL), r.checkpoint, r.eps, r.seed): r
          for r in weak.itertuples(index=False)}
    rows = []
    for key, g in runs[runs.attack.isin(STRONG)].groupby(CELL + ["checkpoint", "eps", "attack"], sort=False):
        matched = [(by[(key[:len(CELL)], key[-3], key[-2], r.seed)], r) for r in g.itertuples(index=False)
                   if (key[:len(CELL)], key[-3], key[-2], r.seed) in by]
        if not matched:
            continue
        per_class = zip(*[[None if a is None or b is None or a != a or b != b else a - b
                           for a, b in zip(w.class_acc, s.class_acc)] for w, s in matched])
        rows.append(dict(zip(CELL + ["checkpoint", "eps", "strong"], key), n=len(matched),
                         gap=[spread(c).mean for c in per_class],
                         avg_gap=spread([w.avg_acc - s.avg_acc for w, s in matched]).mean))
    return pd.DataFrame(rows)


def gap_tables(data) -> list[Table]:
    """Per setting, data set and model: PGD-20's robust accuracy minus AutoAttack's (apgd, aa)
    class by class in percentage points, at each eps_test both were run at; empty without them."""
    gaps = data.gaps
    out = []
    if gaps.empty:
        return out
    gaps = ordered(gaps.assign(attack=gaps.strong), data.attacks)
    for (setting, dataset, model), g in gaps.groupby(["setting", "dataset", "model"], sort=False):
        tag, slug = data.tag(setting)
        n = len(g.gap.iloc[0])
        classes = list(range(n))
        if n > MAX_GAP_COLUMNS:   # the classes PGD-20 overstates most, anywhere in the table
            top = sorted(classes, key=lambda c: -max((x[c] for x in g.gap if x[c] == x[c]), default=-math.inf))
            classes = sorted(top[:MAX_GAP_COLUMNS])
        names = class_names(dataset, n)
        t = Table(slug=f"attack_gap_{dataset}_{model}{slug}",
                  title=f"Attack gap ({dataset_name(dataset)}, {model_name(model)}{tag}, "
                        f"{attack_title(WEAK)} against {_strong_names(g.strong)})",
                  caption=f"How much {attack_title(WEAK)} overstates robust accuracy: its class accuracy "
                          f"minus the stronger attack's ("
                          + "; ".join({"apgd": "APGD: APGD-CE + APGD-T", "aa": "AA: standard AutoAttack"}[a]
                                      for a in STRONG if a in set(g.strong))
                          + "), in percentage points, per class, for the average (avg) and "
                          "the largest over the classes (max); mean over n seeds."
                          + (" Classes with the largest gaps." if n > MAX_GAP_COLUMNS else ""),
                  stub=["method", "eps_train", "checkpoint", "eps_test", "against", "n"],
                  header=[[(names[c], 1) for c in classes] + [("avg", 1), ("max", 1)]],
                  digits=[1] * len(classes) + [2, 2])
        for r in g.itertuples(index=False):
            present = [x for x in r.gap if x == x]
            vals = [100 * r.gap[c] for c in classes] + [100 * r.avg_gap, 100 * max(present) if present else math.nan]
            t.rows.append(([method_label(r.method, r.lam), eps_label(r.eps_train), r.checkpoint, eps_label(r.eps),
                            attack_title(r.strong), n_text(r.n)], vals, [False] * len(vals)))
        out.append(t)
    return out

