"""`fastfat report`'s figures (matplotlib, Agg), at the attack and eps_test of Table 2: var and
rob.acc against eps_train, one line per model (the paper's Figures 1-2) and one line per method
for each model; rob.acc against var for the base method and every lambda, the Pareto front
highlighted; class-wise robust accuracy bars per eps_train; worst-class against average robust
accuracy for every method (last and best checkpoints). Where a cell has several seeds, its point
carries error bars of +- one standard deviation over the seeds. Each is written as a PNG. Like
the tables, a figure holds points of one training setting only (report.Data.tag names it).
"""
from __future__ import annotations

import pandas as pd

from ..config import base_method
from ..files import atomic_write_png
from .labels import (METHOD_ORDER, attack_title, class_names, dataset_name, eps_label,
                     has_lambda, lam_suffix, method_label, method_name, model_name)
from .seeds import eps_key, ordered


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # A report makes all its figures before saving (and closing) each: a methods grid has dozens.
    plt.rcParams["figure.max_open_warning"] = 0
    return plt


def _has(errs) -> bool:
    return any(e == e for e in errs)   # some finite spread (NaN: a single seed)


def error_bars(ax, xs, ys, yerr=None, xerr=None, color=None) -> None:
    """+- one standard deviation over seeds at each point, where there is one (NaN: none)."""
    yerr = yerr if yerr is not None and _has(yerr) else None
    xerr = xerr if xerr is not None and _has(xerr) else None
    if yerr is not None or xerr is not None:
        ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, fmt="none", ecolor=color, elinewidth=1, capsize=0)


def plot_vs_eps(series: dict[str, list[tuple[float, float, float]]], title: str, errors: dict | None = None):
    """var (10^-2) and rob.acc (%) against eps_train; series: label -> [(eps_train, var, acc)];
    errors: label -> [(var std, acc std)] in the same order (NaN where one seed), drawn as bars."""
    plt = pyplot()
    fig, (ax_v, ax_a) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for label, pts in series.items():
        order = sorted(range(len(pts)), key=lambda i: pts[i])
        errs = [(errors or {}).get(label, [(float("nan"),) * 2] * len(pts))[i] for i in order]
        pts = [pts[i] for i in order]
        xs = [p[0] for p in pts]
        (lv,) = ax_v.plot(xs, [p[1] for p in pts], marker="o", label=label)
        (la,) = ax_a.plot(xs, [p[2] for p in pts], marker="o", label=label)
        error_bars(ax_v, xs, [p[1] for p in pts], [e[0] for e in errs], color=lv.get_color())
        error_bars(ax_a, xs, [p[2] for p in pts], [e[1] for e in errs], color=la.get_color())
    ax_v.set_ylabel("var of class-wise rob. acc (10$^{-2}$)")
    ax_a.set_ylabel("average robust accuracy (%)")
    for ax in (ax_v, ax_a):
        ax.set_xlabel(r"$\epsilon_{train}$")
        ax.grid(alpha=0.3)
    ax_a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (var, acc) points no other point beats on both (lower var and higher acc), by var."""
    front = [p for p in points
             if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in points)]
    return sorted(set(front))


def plot_pareto(series: dict[str, list[tuple[float, float, float]]], title: str, errors: dict | None = None):
    """rob.acc (%) against var (10^-2); series: label (e.g. per lambda) -> [(eps_train, var, acc)].
    Each point is marked with its eps_train; the Pareto front over all points is a line. errors:
    as plot_vs_eps's, bars along both axes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    allpts = []
    for label, pts in series.items():
        dots = ax.scatter([p[1] for p in pts], [p[2] for p in pts], label=label, s=30)
        errs = (errors or {}).get(label)
        if errs:
            error_bars(ax, [p[1] for p in pts], [p[2] for p in pts], [e[1] for e in errs], [e[0] for e in errs],
                       color=dots.get_facecolor()[0])
        for eps_train, v, a in pts:
            ax.annotate(eps_label(eps_train), (v, a), fontsize=6, xytext=(3, 3), textcoords="offset points")
        allpts += [(p[1], p[2]) for p in pts]
    front = pareto_front(allpts)
    ax.plot([p[0] for p in front], [p[1] for p in front], color="black", lw=1.2, ls="--",
            marker="o", mfc="none", ms=10, label="Pareto front")
    ax.set_xlabel("var of class-wise rob. acc (10$^{-2}$), lower is fairer")
    ax.set_ylabel("average robust accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_classwise(names: list[str], series: dict[str, list[float]], title: str, errors: dict | None = None):
    """Grouped bars: robust accuracy (%) per class, one bar series per label (eps_train); errors:
    label -> each class's std over seeds (NaN where one seed), drawn on the bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) * max(1, len(series)) / 2), 3.6), dpi=100)
    k = max(1, len(series))
    width = 0.8 / k
    for i, (label, vals) in enumerate(series.items()):
        xs = [c + (i - (k - 1) / 2) * width for c in range(len(names))]
        ax.bar(xs, vals, width=width, label=label)
        error_bars(ax, xs, vals, (errors or {}).get(label), color="black")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45 if max(len(n) for n in names) > 3 else 0, fontsize=8)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_xlabel("class")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, title=r"$\epsilon_{train}$", title_fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_fairness(series: dict[str, list[tuple]], title: str):
    """Worst-class against average robust accuracy (%) of every method; series: label ->
    [(eps_train, avg, worst, avg std, worst std)] (std NaN where one seed: no bars). Each point
    is marked with its eps_train."""
    plt = pyplot()
    methods = list(dict.fromkeys(label.removesuffix(" (best)") for label in series))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(methods) > len(cycle):   # more methods than the default 10 colours: one each from 20
        cycle = list(plt.get_cmap("tab20").colors)
    fig, ax = plt.subplots(figsize=(6 if len(series) <= 6 else 8, 4.2), dpi=100)
    for label, pts in series.items():
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        best = label.endswith(" (best)")   # the method's colour, another marker
        color = cycle[methods.index(label.removesuffix(" (best)")) % len(cycle)]
        ax.scatter(xs, ys, label=label, s=30, marker="D" if best else "o", color=color)
        error_bars(ax, xs, ys, [p[4] for p in pts], [p[3] for p in pts], color=color)
        for p in pts:
            ax.annotate(eps_label(p[0]), (p[1], p[2]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("average robust accuracy (%)")
    ax.set_ylabel("worst-class robust accuracy (%)")
    ax.grid(alpha=0.3)
    if len(series) <= 6:
        ax.legend(fontsize=7)
    else:   # beside the plot, where it covers no point
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


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


def make_figures(data, attack: str, eps: float) -> dict:
    """Every figure of the report (report.Data at one attack and eps_test): file stem -> Figure."""
    figs = {}
    at = f"{attack_title(attack)} at eps_test {eps_label(eps)}"
    rows = data.at(attack, eps)
    # Figures 1-2: one line per model, per data set and method.
    for (setting, dataset, method, lam), g in rows.groupby(["setting", "dataset", "method", "lam"], sort=False):
        tag, slug = data.tag(setting)
        series, errors = _series(g, g.model.map(model_name))
        figs[f"fig_eps_train_{dataset}_{method}{lam_suffix(method, lam)}{slug}"] = plot_vs_eps(
            series, f"{method_label(method, lam)} on {dataset_name(dataset)}{tag}, {at}", errors)
    # The same axes with one line per method (and lambda), per data set and model.
    trained = rows[rows.method != "natural"]
    for (setting, dataset, model), g in trained.groupby(["setting", "dataset", "model"], sort=False):
        tag, slug = data.tag(setting)
        label = pd.Series([method_label(m, lam).replace("lambda=", "λ=")
                           for m, lam in zip(g.method, g.lam)], index=g.index)
        series, errors = _series(g, label)
        if len(series) > 1:
            figs[f"fig_methods_{dataset}_{model}{slug}"] = plot_vs_eps(
                series, f"{model_name(model)} on {dataset_name(dataset)}{tag}, {at}", errors)
    # Pareto: the base method and every lambda of its FAT, per data set and model.
    for (setting, dataset, model), g in rows.groupby(["setting", "dataset", "model"], sort=False):
        tag, slug = data.tag(setting)
        for fat in filter(has_lambda, METHOD_ORDER):
            base = base_method(fat)
            mine = g[g.method.isin([base, fat])]
            if not (mine.method == fat).any():
                continue
            mine = (mine.assign(is_fat=mine.method == fat)
                    .sort_values(["is_fat", "lam", "eps_train"], kind="stable"))
            label = pd.Series([f"FAT λ={lam:g}" if f else method_name(base)
                               for f, lam in zip(mine.is_fat, mine.lam)], index=mine.index)
            series, errors = _series(mine, label)
            figs[f"fig_pareto_{dataset}_{model}_{fat}{slug}"] = plot_pareto(
                series, f"{model_name(model)} on {dataset_name(dataset)}{tag}: "
                        f"{method_name(base)} and FAT over lambda, {at}", errors)
    # Class-wise bars per eps_train.
    for (setting, dataset, model, method, lam), g in rows.groupby(
            ["setting", "dataset", "model", "method", "lam"], sort=False):
        tag, slug = data.tag(setting)
        g = g.sort_values("eps_train", kind="stable")
        series = {eps_label(e): [100 * a for a in accs] for e, accs in zip(g.eps_train, g.class_acc)}
        figs[f"fig_classwise_{dataset}_{model}_{method}{lam_suffix(method, lam)}{slug}"] = plot_classwise(
            class_names(dataset, len(g.class_acc.iloc[0])), series,
            f"{method_label(method, lam)}, {model_name(model)} on {dataset_name(dataset)}{tag}, {at}",
            {eps_label(r.eps_train): _class_std(data.runs, r) for r in g.itertuples(index=False)})
    # Robustness against fairness: every method, last and best checkpoints, per data set and model.
    st = ordered(data.stats, data.attacks)
    st = st[(st.attack == attack) & (st.eps == eps_key(eps))]
    for (setting, dataset, model), g in st.groupby(["setting", "dataset", "model"], sort=False):
        tag, slug = data.tag(setting)
        series = {}
        for r in g.itertuples(index=False):
            label = (method_label(r.method, r.lam).replace("lambda=", "λ=")
                     + (" (best)" if r.checkpoint == "best" else ""))
            series.setdefault(label, []).append((r.eps_train, 100 * r.avg_acc, 100 * r.worst_acc,
                                                 100 * r.avg_acc_std, 100 * r.worst_acc_std))
        figs[f"fig_fairness_{dataset}_{model}{slug}"] = plot_fairness(
            series, f"{model_name(model)} on {dataset_name(dataset)}{tag}: every method, {at}")
    return figs


def save_figure(fig, path: str) -> None:
    """Write a figure as a PNG file (atomically) and close it."""
    try:
        atomic_write_png(path, fig)
    finally:
        pyplot().close(fig)
