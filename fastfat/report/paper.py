"""The paper's tables from the seed means (report.Data.means, last checkpoint): Table 1 (var and
rob.acc per attack and eps_test, rows model x eps_train), Tables 3-4 (a base method beside its
FAT) and Table 2 (class-wise robust accuracy per eps_train at one attack and eps_test)."""
from __future__ import annotations

import math

import pandas as pd

from ..config import base_method, has_lambda
from .labels import (attack_title, class_names, dataset_name, eps_label, lam_suffix, method_label,
                     method_name, model_name)
from .seeds import eps_key as _key
from .tables import Table

MAX_CLASS_COLUMNS = 10   # Table 2 shows at most this many classes (those that move most)


def _robust_columns(data, rows: pd.DataFrame) -> list[tuple[str, float]]:
    """(attack, eps) pairs that these rows have, in the data's attack order and eps order."""
    have = set(zip(rows.attack, rows.eps))
    return [(a, e) for a in data.attacks for e in data.eps[a] if (a, _key(e)) in have]


def _attack_header(cols: list[tuple[str, float]], per: int) -> list[list[tuple[str, int]]]:
    """Header levels attack / eps_test over `per` columns for each (attack, eps)."""
    top, mid = [], []
    for a, e in cols:
        if top and top[-1][0] == attack_title(a):
            top[-1] = (top[-1][0], top[-1][1] + per)
        else:
            top.append((attack_title(a), per))
        mid.append((eps_label(e), per))
    return [top, mid]


def _grid(rows: pd.DataFrame, index, columns, values, row_order, col_order) -> list[list[float]]:
    """values x100 (display units) pivoted to rows x columns, in the given orders; NaN if missing."""
    wide = rows.pivot(index=index, columns=columns, values=values).reindex(index=row_order, columns=col_order)
    return (100.0 * wide).to_numpy().tolist()


def _seeds_note(rows: pd.DataFrame) -> str:
    n = rows.seeds.max()
    return f" Mean over {n} seeds." if n > 1 else ""


def table1(data) -> list[Table]:
    """Table 1: per data set and method (and lambda); rows model x eps_train."""
    tables = []
    models = list(pd.unique(data.means.model))   # a model's rows follow its first cell in the report
    for (setting, dataset, method, lam), g in data.means.groupby(["setting", "dataset", "method", "lam"],
                                                                 sort=False):
        tag, slug = data.tag(setting)
        cols = _robust_columns(data, g)
        rows = sorted(set(zip(g.model, g.eps_train)), key=lambda r: (models.index(r[0]), r[1]))
        wide = _grid(g, ["model", "eps_train"], ["attack", "eps"], ["vcra", "avg_acc"], rows,
                     [(m, a, _key(e)) for a, e in cols for m in ("vcra", "avg_acc")])
        t = Table(slug=f"table1_{dataset}_{method}{lam_suffix(method, lam)}{slug}",
                  title=f"Table 1 ({dataset_name(dataset)}, {method_label(method, lam)}{tag})",
                  caption="Average robust accuracy (rob.acc, %) and variance of class-wise robust "
                          "accuracy (var, 10^-2) per attack and eps_test." + _seeds_note(g),
                  stub=["model", "eps_train"],
                  header=_attack_header(cols, 2) + [[("var", 1), ("rob.acc", 1)] * len(cols)],
                  digits=[2] * (2 * len(cols)))
        for (model, eps_train), vals in zip(rows, wide):
            t.rows.append(([model_name(model), eps_label(eps_train)], vals, [False] * len(vals)))
        tables.append(t)
    return tables


def tables34(data) -> list[Table]:
    """Tables 3 (var) and 4 (rob.acc): each base method next to its FAT, per lambda."""
    out = []
    m = data.means
    for (setting, dataset, model, fat, lam), fat_g in m[m.method.map(has_lambda)].groupby(
            ["setting", "dataset", "model", "method", "lam"], sort=False):
        base = base_method(fat)
        # only the method and lambda may differ: the same setting, data set and model
        base_g = m[(m.setting == setting) & (m.dataset == dataset) & (m.model == model) & (m.method == base)]
        tag, slug = data.tag(setting)
        if base_g.empty:
            continue
        both = pd.concat([base_g, fat_g])
        eps_rows = sorted(set(both.eps_train))
        cols = _robust_columns(data, both)
        pair = pd.concat([base_g[base_g.lam == 0.0], fat_g])   # the base method has lambda 0
        for num, what, title, extra in (
                ("3", "vcra", "Variance of class-wise robust accuracy (10^-2)", ""),
                ("4", "avg_acc", "Average robust accuracy (%)", " Bold: the higher of the pair.")):
            t = Table(slug=f"table{num}_{dataset}_{model}_{fat}{lam_suffix(fat, lam)}{slug}",
                      title=f"Table {num} ({dataset_name(dataset)}, {model_name(model)}, "
                            f"{method_name(base)} vs {method_label(fat, lam)}{tag})",
                      caption=f"{title} of {method_name(base)} and FAT (lambda={lam:g}) per eps_train, "
                              f"attack and eps_test." + extra + _seeds_note(both),
                      stub=["eps_train"],
                      header=_attack_header(cols, 2) + [[(method_name(base), 1), ("FAT", 1)] * len(cols)],
                      digits=[2] * (2 * len(cols)), blank_repeats=False)
            wide = _grid(pair, "eps_train", ["attack", "eps", "method"], what, eps_rows,
                         [(a, _key(e), mt) for a, e in cols for mt in (base, fat)])
            for ep, vals in zip(eps_rows, wide):
                bold = [False] * len(vals)
                if num == "4":   # the higher of each pair, unless they print the same
                    for j in range(0, len(vals), 2):
                        vb, vf = vals[j], vals[j + 1]   # NaN (missing) compares False: never bold
                        if round(vb, 2) != round(vf, 2):
                            bold[j:j + 2] = [vb > vf, vf > vb]
                t.rows.append(([eps_label(ep)], vals, bold))
            out.append(t)
    return out


def moving_classes(accs: list[list[float]], most: int = MAX_CLASS_COLUMNS) -> list[int]:
    """The `most` classes whose accuracy moves most from the first row of accs (per eps_train,
    ascending) to the last, in class order (Table 2's and the class-wise figure's columns)."""
    moved = sorted(range(len(accs[0])), key=lambda c: _moved(accs[-1][c], accs[0][c]))
    return sorted(moved[:most])


def _moved(a: float, b: float) -> float:
    """Sort key: the class that moves most first; a class without samples at either end last."""
    d = abs(a - b)
    return -d if d == d else math.inf


def table2(data, attack: str, eps: float) -> list[Table]:
    """Table 2: class-wise robust accuracy per eps_train at one attack/eps, with the diff row."""
    out = []
    for (setting, dataset, model, method, lam), g in data.at(attack, eps).groupby(
            ["setting", "dataset", "model", "method", "lam"], sort=False):
        tag, slug = data.tag(setting)
        g = g.sort_values("eps_train", kind="stable")
        accs = g.class_acc.tolist()
        n = len(accs[0])
        names = class_names(dataset, n)
        classes = list(range(n))
        if n > MAX_CLASS_COLUMNS:  # many classes: those whose accuracy moves most with eps_train
            classes = moving_classes(accs)
        t = Table(slug=f"table2_{dataset}_{model}_{method}{lam_suffix(method, lam)}{slug}",
                  title=f"Table 2 ({dataset_name(dataset)}, {model_name(model)}, "
                        f"{method_label(method, lam)}{tag}, {attack_title(attack)} at eps_test {eps_label(eps)})",
                  caption="Robust accuracy (%) per class, var (10^-2) and rob.acc (%) per eps_train"
                          + ("; diff = largest eps_train minus smallest." if len(g) > 1 else ".")
                          + (" Classes whose accuracy moves most." if n > MAX_CLASS_COLUMNS else "")
                          + _seeds_note(g),
                  stub=["eps_train"],
                  header=[[(names[c], 1) for c in classes] + [("var", 1), ("rob.acc", 1)]],
                  digits=[1] * len(classes) + [2, 2], blank_repeats=False)
        rows = [[100.0 * a[c] for c in classes] + [100.0 * v, 100.0 * r]
                for a, v, r in zip(accs, g.vcra, g.avg_acc)]
        labels = [eps_label(e) for e in g.eps_train]
        if len(g) > 1:
            rows.append([x - y for x, y in zip(rows[-1], rows[0])])
            labels.append("diff")
        t.rows = [([label], vals, [False] * len(vals)) for label, vals in zip(labels, rows)]
        out.append(t)
    return out
