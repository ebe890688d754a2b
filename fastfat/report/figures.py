"""`fastfat report`'s figures (matplotlib, Agg), all at the report's one attack and eps_test (the
strongest attack evaluated unless chosen): var and rob.acc against eps_train, one line per model
(the paper's Figures 1-2) and one line per method for each model; rob.acc against var for the
base method and every lambda, the Pareto front highlighted; class-wise robust accuracy bars per
eps_train; worst-class against average robust accuracy for every method (last and best
checkpoints); and, beside them, the attack-gap view (rob.acc under PGD-20, dashed, against the
chosen attack). Every figure is 800 x 450 px with a caption (Figures.captions) saying what it
plots, at which attack and eps_test, and what its error bars are (+- one standard deviation over
the seeds); legends hold at most MAX_LEGEND entries (more methods: several figures on the same
axes) and point labels are placed so they do not collide. Like the tables, a figure holds points
of one training setting only (report.Data.tag names it).
"""
from __future__ import annotations

import pandas as pd

from ..config import attacks_in_training, base_method, has_lambda
from ..files import atomic_write_png
from .labels import (METHOD_ORDER, attack_title, class_names, dataset_name, eps_label,
                     lam_suffix, method_label, method_name, model_name)
from .paper import MAX_CLASS_COLUMNS, moving_classes
from .plots import plot_classwise, plot_fairness, plot_pareto, plot_vs_eps, pyplot
from .seeds import eps_key, ordered

MAX_LEGEND = 10      # entries in one legend; more methods are split over figures with the same axes
WEAK = "pgd20"       # the attack the gap view sets beside the chosen one


class Figures(dict):
    """File stem -> matplotlib Figure, in report order, with each figure's caption (captions)."""

    def __init__(self):
        super().__init__()
        self.captions: dict[str, str] = {}

    def add(self, stem: str, fig, caption: str) -> None:
        self[stem] = fig
        self.captions[stem] = caption


def _points(rows) -> list[tuple[float, float, float]]:
    """(eps_train, var in 10^-2, rob.acc in %) of each row."""
    return list(zip(rows.eps_train, 100 * rows.vcra, 100 * rows.avg_acc))


def _errors(rows) -> list[tuple[float, float]]:
    """(var std in 10^-2, rob.acc std in %) over seeds of each row (NaN: one seed)."""
    return list(zip(100 * rows.vcra_std, 100 * rows.avg_acc_std))


def _class_std(runs, cell) -> list[float]:
    """Each class's robust accuracy std over the seeds of a means row's cell (last checkpoint,
    its attack and eps), in % (NaN where fewer than two seeds have the class)."""
    from .seeds import CELL, spread
    mine = runs[(runs.checkpoint == "last") & (runs.attack == cell.attack) & (runs.eps == cell.eps)]
    for c in CELL:
        mine = mine[mine[c] == getattr(cell, c)]
    return [100 * spread(col).std for col in zip(*mine.class_acc)]


def _series(g, label):
    """(label -> _points, label -> _errors) of rows g grouped by the label Series."""
    groups = list(g.groupby(label, sort=False))
    return {n: _points(mg) for n, mg in groups}, {n: _errors(mg) for n, mg in groups}


def split(labels: list[str], keep: list[str], most: int = MAX_LEGEND) -> list[list[str]]:
    """labels in parts of at most `most`, each part led by the labels in `keep` (the base methods,
    the reference every part is read against); one part when they all fit."""
    keep = [k for k in labels if k in keep]
    rest = [x for x in labels if x not in keep]
    if len(labels) <= most:
        return [labels]
    room = max(1, most - len(keep))
    return [keep + rest[i:i + room] for i in range(0, len(rest), room)]


def _range(means, stds=None, floor: float | None = None, pad: float = 0.06) -> tuple[float, float]:
    """An axis range holding each mean -+ its std (NaN left out) with a margin, not reaching
    further than half a unit below `floor` (0 for an accuracy or a var)."""
    pairs = list(zip(means, stds if stds is not None else [0.0] * len(means)))
    lo = [m - (s if s == s else 0.0) for m, s in pairs if m == m]
    hi = [m + (s if s == s else 0.0) for m, s in pairs if m == m]
    a, b = (min(lo), max(hi)) if lo else (0.0, 1.0)
    d = (b - a) * pad or 1.0
    return (a - d if floor is None else max(a - d, floor - 0.5)), b + d


def _part(stem: str, i: int, n: int) -> str:
    return stem if n == 1 else f"{stem}_part{i + 1}"


def _bars(several: bool) -> str:
    return ("Error bars: ± one standard deviation over the seeds, cut at the ends of the quantity's range "
            "(0-100% for an accuracy, 0 for a variance; none where a point has one seed)."
            if several else "One seed per point: no error bars.")


def _on_both(bars: str) -> str:
    """The error-bar sentence of a scatter, whose bars run along both axes."""
    return bars.replace(" (none", ", along both axes (none") if "standard deviation" in bars else bars


def make_figures(data, attack: str, eps: float) -> Figures:
    """Every figure of the report (report.Data at one attack and eps_test) with its caption."""
    figs = Figures()
    at = f"{attack_title(attack)} at eps_test {eps_label(eps)}"
    rows = data.at(attack, eps)
    several = bool((rows.seeds > 1).any()) if len(rows) else False
    n = f" Mean over {rows.seeds.max()} seeds." if several else ""
    _eps_figures(figs, data, rows, at, n + " " + _bars(several))
    _pareto_figures(figs, data, rows, at, n + " " + _bars(several))
    _classwise_figures(figs, data, rows, at, n + " " + _bars(several))
    _fairness_figures(figs, data, attack, eps, at, n + " " + _bars(several))
    if attack != WEAK and WEAK in data.eps and eps_key(eps) in map(eps_key, data.eps[WEAK]):
        _gap_figures(figs, data, rows, data.at(WEAK, eps), attack, eps, n)
    return figs


def _eps_figures(figs: Figures, data, rows, at: str, bars: str) -> None:
    """Figures 1-2: one line per model, per data set and method; then one line per method (and
    lambda) per data set and model, split where the legend would pass MAX_LEGEND."""
    for (setting, dataset, method, lam), g in rows.groupby(["setting", "dataset", "method", "lam"], sort=False):
        tag, slug = data.tag(setting)
        series, errors = _series(g, g.model.map(model_name))
        figs.add(f"fig_eps_train_{dataset}_{method}{lam_suffix(method, lam)}{slug}",
                 plot_vs_eps(series, f"{method_label(method, lam, greek=True)} on {dataset_name(dataset)}{tag}, {at}",
                             errors),
                 f"var of class-wise robust accuracy (left, 10^-2) and average robust accuracy (right, %) "
                 f"against eps_train, one line per model: {method_label(method, lam)} on "
                 f"{dataset_name(dataset)}{tag}, {at}, last checkpoint.{bars}")
    trained = rows[rows.method.map(attacks_in_training)]
    for (setting, dataset, model), g in trained.groupby(["setting", "dataset", "model"], sort=False):
        tag, slug = data.tag(setting)
        label = pd.Series([method_label(m, lam, greek=True) for m, lam in zip(g.method, g.lam)], index=g.index)
        series, errors = _series(g, label)
        if len(series) < 2:
            continue
        bases = [method_label(m, 0.0, greek=True) for m in set(g.method) if base_method(m) is None]
        parts = split(list(series), bases)
        limits = (_range(100 * g.vcra, 100 * g.vcra_std, 0), _range(100 * g.avg_acc, 100 * g.avg_acc_std, 0))
        for i, part in enumerate(parts):
            figs.add(_part(f"fig_methods_{dataset}_{model}{slug}", i, len(parts)),
                     plot_vs_eps({k: series[k] for k in part},
                                 f"{model_name(model)} on {dataset_name(dataset)}{tag}, {at}"
                                 + (f" ({i + 1}/{len(parts)})" if len(parts) > 1 else ""),
                                 {k: errors[k] for k in part}, limits),
                     f"var (left, 10^-2) and average robust accuracy (right, %) against eps_train, one "
                     f"line per method: {model_name(model)} on {dataset_name(dataset)}{tag}, {at}, last "
                     f"checkpoint." + (f" Part {i + 1} of {len(parts)} (same axes; the base methods in "
                                       f"each)." if len(parts) > 1 else "") + bars)


def _pareto_figures(figs: Figures, data, rows, at: str, bars: str) -> None:
    """Pareto: the base method and every lambda of its FAT, per data set and model."""
    for (setting, dataset, model), g in rows.groupby(["setting", "dataset", "model"], sort=False):
        tag, slug = data.tag(setting)
        for fat in filter(has_lambda, METHOD_ORDER):
            base = base_method(fat)
            mine = g[g.method.isin([base, fat])]
            if not (mine.method == fat).any():
                continue
            mine = (mine.assign(is_fat=mine.method == fat)
                    .sort_values(["is_fat", "lam", "eps_train"], kind="stable"))
            label = pd.Series([method_label(m, lam, greek=True) for m, lam in zip(mine.method, mine.lam)],
                              index=mine.index)
            series, errors = _series(mine, label)
            figs.add(f"fig_pareto_{dataset}_{model}_{fat}{slug}",
                     plot_pareto(series, f"{model_name(model)} on {dataset_name(dataset)}{tag}: "
                                         f"{method_name(base)} and FAT over lambda, {at}", errors),
                     f"Average robust accuracy (%) against var (10^-2) of {method_name(base)} and "
                     f"{method_name(fat)} at every lambda, each point labelled with its eps_train; the "
                     f"dashed line is the Pareto front (no other point has both lower var and higher "
                     f"accuracy): {model_name(model)} on {dataset_name(dataset)}{tag}, {at}, last "
                     f"checkpoint.{_on_both(bars)}")


def _classwise_figures(figs: Figures, data, rows, at: str, bars: str) -> None:
    """Class-wise bars per eps_train, per data set, model and method."""
    for (setting, dataset, model, method, lam), g in rows.groupby(
            ["setting", "dataset", "model", "method", "lam"], sort=False):
        tag, slug = data.tag(setting)
        g = g.sort_values("eps_train", kind="stable")
        accs = g.class_acc.tolist()
        names = class_names(dataset, len(accs[0]))
        keep = moving_classes(accs) if len(names) > MAX_CLASS_COLUMNS else list(range(len(names)))
        series = {eps_label(e): [100 * a[c] for c in keep] for e, a in zip(g.eps_train, accs)}
        std = {eps_label(r.eps_train): _class_std(data.runs, r) for r in g.itertuples(index=False)}
        figs.add(f"fig_classwise_{dataset}_{model}_{method}{lam_suffix(method, lam)}{slug}",
                 plot_classwise([names[c] for c in keep], series,
                                f"{method_label(method, lam, greek=True)}, {model_name(model)} on "
                                f"{dataset_name(dataset)}{tag}, {at}",
                                {k: [v[c] for c in keep] for k, v in std.items()}),
                 f"Robust accuracy (%) per class, one bar per eps_train: {method_label(method, lam)}, "
                 f"{model_name(model)} on {dataset_name(dataset)}{tag}, {at}, last checkpoint"
                 + (f"; the {len(keep)} of {len(names)} classes whose accuracy moves most with eps_train (as "
                    f"Table 2)." if len(keep) < len(names) else ".") + bars)


def _fairness_figures(figs: Figures, data, attack: str, eps: float, at: str, bars: str) -> None:
    """Worst-class against average robust accuracy: every method, last and best checkpoints, per
    data set and model, split where the legend would pass MAX_LEGEND (same axes, same colours)."""
    plt = pyplot()
    st = ordered(data.stats, data.attacks)
    st = st[(st.attack == attack) & (st.eps == eps_key(eps))]
    for (setting, dataset, model), g in st.groupby(["setting", "dataset", "model"], sort=False):
        tag, slug = data.tag(setting)
        series = {}
        for r in g.itertuples(index=False):
            label = method_label(r.method, r.lam, greek=True) + (" (best)" if r.checkpoint == "best" else "")
            series.setdefault(label, []).append((r.eps_train, 100 * r.avg_acc, 100 * r.worst_acc,
                                                 100 * r.avg_acc_std, 100 * r.worst_acc_std))
        methods = list(dict.fromkeys(label.removesuffix(" (best)") for label in series))
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        if len(methods) > len(cycle):   # more methods than 10 colours: one each from 20
            cycle = list(plt.get_cmap("tab20").colors)
        colors = {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}
        bases = [method_label(m, 0.0, greek=True) for m in set(g.method) if base_method(m) is None]
        best = any(k.endswith(" (best)") for k in series)
        groups = split(methods, bases, MAX_LEGEND // (2 if best else 1))
        limits = (_range(100 * g.avg_acc, 100 * g.avg_acc_std, 0), _range(100 * g.worst_acc, 100 * g.worst_acc_std, 0))
        for i, part in enumerate(groups):
            mine = {k: v for k, v in series.items() if k.removesuffix(" (best)") in part}
            figs.add(_part(f"fig_fairness_{dataset}_{model}{slug}", i, len(groups)),
                     plot_fairness(mine, f"{model_name(model)} on {dataset_name(dataset)}{tag}: every method, {at}"
                                   + (f" ({i + 1}/{len(groups)})" if len(groups) > 1 else ""), limits, colors),
                     "Worst-class against average robust accuracy (%) of every method, each point "
                     "labelled with its eps_train" + (" (diamonds: the best checkpoint, selected on the "
                                                       "validation split; dots: the last)" if best else "")
                     + f": {model_name(model)} on {dataset_name(dataset)}{tag}, {at}."
                     + (f" Part {i + 1} of {len(groups)} (same axes; the base methods in each)."
                        if len(groups) > 1 else "") + _on_both(bars))


def _gap_figures(figs: Figures, data, rows, weak, attack: str, eps: float, n: str) -> None:
    """The attack-gap view: average robust accuracy against eps_train under the chosen attack
    (solid) and PGD-20 (dashed), one colour per method, per data set and model."""
    both = pd.concat([rows.assign(under=attack), weak.assign(under=WEAK)])
    both = both[both.method.map(attacks_in_training)]
    for (setting, dataset, model), g in both.groupby(["setting", "dataset", "model"], sort=False):
        tag, slug = data.tag(setting)
        methods = list(dict.fromkeys(method_label(m, lam, greek=True) for m, lam in zip(g.method, g.lam)))
        bases = [method_label(m, 0.0, greek=True) for m in set(g.method) if base_method(m) is None]
        parts = split(methods, bases, MAX_LEGEND // 2)
        label = pd.Series([f"{method_label(m, lam, greek=True)}, {attack_title(u)}"
                           for m, lam, u in zip(g.method, g.lam, g.under)], index=g.index)
        series, errors = _series(g, label)
        limits = (_range(100 * g.vcra, 100 * g.vcra_std, 0), _range(100 * g.avg_acc, 100 * g.avg_acc_std, 0))
        for i, part in enumerate(parts):
            keep = [k for k in series if k.rsplit(", ", 1)[0] in part]
            styles = {k: {"ls": "--" if k.endswith(attack_title(WEAK)) else "-", "marker": "o",
                          "color": f"C{part.index(k.rsplit(', ', 1)[0]) % 10}"} for k in keep}
            figs.add(_part(f"fig_attack_gap_{dataset}_{model}{slug}", i, len(parts)),
                     plot_vs_eps({k: series[k] for k in keep},
                                 f"Attack-gap view: {attack_title(WEAK)} (dashed) against {attack_title(attack)} "
                                 f"(solid), {model_name(model)} on {dataset_name(dataset)}{tag}, eps_test {eps_label(eps)}",
                                 {k: errors[k] for k in keep}, limits, styles),
                     f"The attack-gap view, not the answer: var (left, 10^-2) and average robust accuracy "
                     f"(right, %) against eps_train under {attack_title(WEAK)} (dashed; the paper's attack) "
                     f"and {attack_title(attack)} (solid; the report's), one colour per method: "
                     f"{model_name(model)} on {dataset_name(dataset)}{tag}, eps_test {eps_label(eps)}, "
                     f"last checkpoint. The distance between a method's two lines is how much "
                     f"{attack_title(WEAK)} overstates it.{n} Error bars: ± one standard deviation over the seeds, "
                     f"cut at 0 and 100%.")


def save_figure(fig, path: str) -> None:
    """Write a figure as a PNG file (atomically) and close it."""
    try:
        atomic_write_png(path, fig)
    finally:
        pyplot().close(fig)
