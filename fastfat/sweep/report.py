"""`fastfat report`: the paper's tables and figures from a results database.

Tables (each as Markdown in report.md, and as its own CSV and LaTeX file):
  Table 1    var (VCRA x10^-2) and rob.acc (%) per attack and eps_test; rows per model and
             eps_train; one table per data set and method (and lambda).
  Tables 3-4 a base method (Madry, TRADES) and its FAT side by side, per eps_train: var (3) and
             rob.acc (4, the higher one in bold); one pair per data set, model and lambda.
  Table 2    class-wise robust accuracy (%) per eps_train at one attack and eps_test, with var,
             rob.acc and the diff row (largest eps_train minus smallest).
Figures (PNG, matplotlib Agg), at the same attack and eps_test as Table 2:
  var and rob.acc against eps_train, one line per model (the paper's Figures 1-2) and one line
  per method for each model; rob.acc against var for the base method and every lambda, the
  Pareto front highlighted; class-wise robust accuracy bars per eps_train.

Points with several seeds are averaged (each metric, and each class's accuracy, over seeds).
If the database holds the same coordinates and seed twice (e.g. a changed [train] section), the
point finished last is used.
"""
from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field

from ..files import atomic_write_text
from ..config import canonical_attack, parse_eps
from ..errors import UserError

METHOD_NAMES = {"natural": "Natural", "madry": "Madry", "trades": "TRADES",
                "fat-madry": "FAT-Madry", "fat-trades": "FAT-TRADES"}
MODEL_NAMES = {"resnet18": "ResNet18", "resnet50": "ResNet50", "wrn-32-10": "WRN-32-10",
               "preactresnet18": "PreActResNet18", "cnn": "CNN"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "digits": "digits",
                 "synthetic": "synthetic"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
METHOD_ORDER = ("natural", "madry", "trades", "fat-madry", "fat-trades")
MAX_CLASS_COLUMNS = 10   # Table 2 shows at most this many classes (those that move most)


def method_name(m: str) -> str:
    return METHOD_NAMES.get(m, m)


def model_name(m: str) -> str:
    return MODEL_NAMES.get(m, m)


def class_names(dataset: str, n: int) -> list[str]:
    return list(CIFAR10_CLASSES) if dataset == "cifar10" and n == 10 else [str(i) for i in range(n)]


def _eps_label(eps: float) -> str:
    from ..evaluate import eps_label
    return eps_label(eps) if eps > 0 else "0"


def _attack_title(attack: str) -> str:
    from ..evaluate import attack_title
    return attack_title(attack)


def _key(x: float) -> float:
    return round(float(x), 10)


# ---------------------------------------------------------------------------------------------
# Loading: the database's finished points, averaged over seeds

@dataclass
class Entry:
    """One grid cell (data set, model, method, lambda, eps_train) averaged over its seeds."""
    dataset: str
    model: str
    method: str
    lam: float
    eps_train: float
    seeds: list[int]
    metrics: dict   # (attack, eps) -> {"class_acc": [...], "avg_acc", "vcra", "worst_acc"}

    @property
    def group(self) -> str:
        """Method with its lambda, as the tables name it."""
        return method_label(self.method, self.lam)


def method_label(method: str, lam: float) -> str:
    return f"{method_name(method)} (lambda={lam:g})" if method.startswith("fat-") else method_name(method)


@dataclass
class Data:
    entries: list[Entry]
    attacks: list[str]              # robust attacks in first-seen order (no clean)
    eps: dict                       # attack -> sorted eps_test list
    points: list = field(default_factory=list)     # every store.Point (for the runs table)
    replaced: int = 0               # older duplicates left out

    def pick(self, attack: str | None = None, eps: float | None = None) -> tuple[str, float]:
        """The attack and eps_test for Table 2 and the figures: PGD-20 (else the first attack)
        at the smallest eps_test, unless given (then checked)."""
        if attack is None:
            attack = "pgd20" if "pgd20" in self.attacks else self.attacks[0]
        elif attack not in self.attacks:
            raise UserError(f"--attack {attack}: not in the results; have {', '.join(self.attacks)}")
        if eps is None:
            eps = self.eps[attack][0]
        elif _key(eps) not in [_key(e) for e in self.eps[attack]]:
            raise UserError(f"--eps {eps:g}: {attack} was evaluated at "
                            f"{', '.join(f'{e:g}' for e in self.eps[attack])} only")
        return attack, eps


def load(db_path: str) -> Data:
    """The finished points of a database, grouped and averaged over seeds."""
    from .store import Store

    with Store(db_path, create=False) as store:
        points = store.points()
    latest: dict = {}
    replaced = 0
    for p in points:
        if p.status != "done":
            continue
        ident = (p.dataset, p.model, p.method, _key(p.lam), _key(p.eps_train), p.seed)
        if ident in latest:
            replaced += 1
            if (p.finished or 0) < (latest[ident].finished or 0):
                continue
        latest[ident] = p
    if not latest:
        raise UserError(f"{db_path}: no finished points to report yet")
    cells: "OrderedDict[tuple, list]" = OrderedDict()
    attacks: list[str] = []
    eps: dict = {}
    for ident, p in latest.items():
        cells.setdefault(ident[:5], []).append(p)
        for r in p.results:
            if r["attack"] == "clean":
                continue
            if r["attack"] not in attacks:
                attacks.append(r["attack"])
            if _key(r["eps"]) not in [_key(e) for e in eps.setdefault(r["attack"], [])]:
                eps[r["attack"]].append(r["eps"])
    for a in eps:
        eps[a].sort()
    entries = []
    for (dataset, model, method, lam, eps_train), ps in cells.items():
        entries.append(Entry(dataset, model, method, lam, eps_train, sorted(p.seed for p in ps),
                             _average([p.results for p in ps])))
    entries.sort(key=lambda e: (e.dataset, _order(e.method, METHOD_ORDER), e.lam, e.model, e.eps_train))
    return Data(entries, attacks, eps, points, replaced)


def _order(x, seq) -> int:
    return seq.index(x) if x in seq else len(seq)


def _average(runs: list[list[dict]]) -> dict:
    """Per (attack, eps): each metric and each class accuracy averaged over the runs (seeds)."""
    acc: dict = {}
    for records in runs:
        for r in records:
            acc.setdefault((r["attack"], _key(r["eps"])), []).append(r)
    out = {}
    for k, rs in acc.items():
        n = len(rs)
        out[k] = {"class_acc": [sum(r["class_acc"][c] for r in rs) / n for c in range(len(rs[0]["class_acc"]))],
                  **{m: sum(r[m] for r in rs) / n for m in ("avg_acc", "vcra", "worst_acc")}}
    return out


# ---------------------------------------------------------------------------------------------
# Tables: one neutral structure, rendered three ways

@dataclass
class Table:
    """A table with a stub (row labels) and value columns under nested headers.

    header: levels above the value columns, top first, each a list of (text, span); the last
    level names single columns. cells are numbers in display units (or None), formatted with
    each column's number of decimals; bold marks cells to emphasise.
    """
    slug: str
    title: str
    caption: str
    stub: list[str]
    header: list[list[tuple[str, int]]]
    digits: list[int]
    rows: list[tuple[list[str], list[float | None], list[bool]]] = field(default_factory=list)
    blank_repeats: bool = True   # print a repeated first stub value once per block (the paper's look)

    def columns(self) -> list[str]:
        """Flat names of the value columns, e.g. 'FGSM 16/255 var'."""
        names = [[] for _ in self.digits]
        for level in self.header:
            i = 0
            for text, span in level:
                for j in range(i, i + span):
                    names[j].append(text)
                i += span
        return [" ".join(n) for n in names]

    def stub_rows(self) -> list[list[str]]:
        out, prev = [], None
        for stub, _, _ in self.rows:
            s = list(stub)
            if self.blank_repeats and len(s) > 1 and s[0] == prev:
                s[0] = ""
            else:
                prev = stub[0]
            out.append(s)
        return out


def fmt(v: float | None, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def render_markdown(t: Table) -> str:
    head = t.stub + t.columns()
    lines = [f"**{t.title}.** {t.caption}", "",
             "| " + " | ".join(head) + " |",
             "|" + "|".join([":---"] * len(t.stub) + ["---:"] * len(t.digits)) + "|"]
    for stub, (_, vals, bold) in zip(t.stub_rows(), t.rows):
        cells = [fmt(v, d) for v, d in zip(vals, t.digits)]
        cells = [f"**{c}**" if b and c != "-" else c for c, b in zip(cells, bold)]
        lines.append("| " + " | ".join(stub + cells) + " |")
    return "\n".join(lines) + "\n"


def render_csv(t: Table) -> str:
    """Every stub value repeated, 4 decimals, empty for a missing cell; same units as the table."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(t.stub + t.columns())
    for stub, vals, _ in t.rows:
        w.writerow(list(stub) + ["" if v is None or math.isnan(v) else f"{v:.4f}" for v in vals])
    return buf.getvalue()


_TEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}
_TEX_HEADERS = {"eps_train": r"$\epsilon_{train}$", "eps_test": r"$\epsilon_{test}$"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(s))


def _tex_text(s: str) -> str:
    s = tex_escape(s).replace("lambda=", r"$\lambda$=")
    return s


def render_latex(t: Table) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); headers span with \\multicolumn."""
    ns = len(t.stub)
    spec = "l" * ns + "r" * len(t.digits)
    out = ["% written by fastfat report; needs \\usepackage{booktabs}",
           r"\begin{table}[t]", r"\centering", r"\small",
           rf"\caption{{{_tex_text(t.title)}. {_tex_text(t.caption)}}}",
           rf"\label{{tab:{t.slug}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    for li, level in enumerate(t.header):
        last = li == len(t.header) - 1
        cells = [(_TEX_HEADERS.get(s, _tex_text(s)) if last else "") for s in t.stub]
        rules, col = [], ns + 1
        for text, span in level:
            cells.append(_tex_text(text) if span == 1 else rf"\multicolumn{{{span}}}{{c}}{{{_tex_text(text)}}}")
            if span > 1:
                rules.append(rf"\cmidrule(lr){{{col}-{col + span - 1}}}")
            col += span
        out.append(" & ".join(cells) + r" \\")
        if rules:
            out.append(" ".join(rules))
    out.append(r"\midrule")
    for stub, (_, vals, bold) in zip(t.stub_rows(), t.rows):
        cells = [fmt(v, d) for v, d in zip(vals, t.digits)]
        cells = [rf"\textbf{{{c}}}" if b and c != "-" else c for c, b in zip(cells, bold)]
        out.append(" & ".join([_tex_text(s) for s in stub] + cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def _metric(e: Entry | None, attack: str, eps: float, what: str) -> float | None:
    """A metric in display units: var x100 (10^-2), accuracies in %."""
    if e is None:
        return None
    m = e.metrics.get((attack, _key(eps)))
    return None if m is None else 100.0 * m[what]


def _robust_columns(data: Data, entries: list[Entry]) -> list[tuple[str, float]]:
    """(attack, eps) pairs that these entries have, in the data's attack order and eps order."""
    have = {k for e in entries for k in e.metrics}
    return [(a, e) for a in data.attacks for e in data.eps[a] if (a, _key(e)) in have]


def _attack_header(cols: list[tuple[str, float]], per: int) -> list[list[tuple[str, int]]]:
    """Header levels attack / eps_test over `per` columns for each (attack, eps)."""
    top, mid = [], []
    for a, e in cols:
        if top and top[-1][0] == _attack_title(a):
            top[-1] = (top[-1][0], top[-1][1] + per)
        else:
            top.append((_attack_title(a), per))
        mid.append((_eps_label(e), per))
    return [top, mid]


def table1(data: Data) -> list[Table]:
    """Table 1: per data set and method (and lambda); rows model x eps_train."""
    tables = []
    groups: "OrderedDict[tuple, list[Entry]]" = OrderedDict()
    for e in data.entries:
        groups.setdefault((e.dataset, e.method, e.lam), []).append(e)
    for (dataset, method, lam), es in groups.items():
        cols = _robust_columns(data, es)
        if not cols:
            continue
        es = sorted(es, key=lambda e: (_first_index(data, e.model), e.eps_train))
        lam_s = f"_lam{lam:g}" if method.startswith("fat-") else ""
        t = Table(slug=f"table1_{dataset}_{method}{lam_s}",
                  title=f"Table 1 ({DATASET_NAMES.get(dataset, dataset)}, {method_label(method, lam)})",
                  caption="Average robust accuracy (rob.acc, %) and variance of class-wise robust "
                          "accuracy (var, 10^-2) per attack and eps_test." + _seeds_note(es),
                  stub=["model", "eps_train"],
                  header=_attack_header(cols, 2) + [[("var", 1), ("rob.acc", 1)] * len(cols)],
                  digits=[2] * (2 * len(cols)))
        for e in es:
            vals = []
            for a, ep in cols:
                vals += [_metric(e, a, ep, "vcra"), _metric(e, a, ep, "avg_acc")]
            t.rows.append(([model_name(e.model), _eps_label(e.eps_train)], vals, [False] * len(vals)))
        tables.append(t)
    return tables


def _first_index(data: Data, model: str) -> int:
    return next(i for i, e in enumerate(data.entries) if e.model == model)


def _seeds_note(es: list[Entry]) -> str:
    n = max(len(e.seeds) for e in es)
    return f" Mean over {n} seeds." if n > 1 else ""


def tables34(data: Data) -> list[Table]:
    """Tables 3 (var) and 4 (rob.acc): each base method next to its FAT, per lambda."""
    out = []
    index = {(e.dataset, e.model, e.method, _key(e.lam), _key(e.eps_train)): e for e in data.entries}
    fats: "OrderedDict[tuple, None]" = OrderedDict()
    for e in data.entries:
        if e.method.startswith("fat-"):
            fats[(e.dataset, e.model, e.method, e.lam)] = None
    for (dataset, model, fat, lam) in fats:
        base = fat[len("fat-"):]
        base_es = [e for e in data.entries if (e.dataset, e.model, e.method) == (dataset, model, base)]
        fat_es = [e for e in data.entries if (e.dataset, e.model, e.method, e.lam) == (dataset, model, fat, lam)]
        if not base_es:
            continue
        eps_rows = sorted({_key(e.eps_train) for e in base_es + fat_es})
        cols = _robust_columns(data, base_es + fat_es)
        for num, what, title, extra in (
                ("3", "vcra", "Variance of class-wise robust accuracy (10^-2)", ""),
                ("4", "avg_acc", "Average robust accuracy (%)", " Bold: the higher of the pair.")):
            t = Table(slug=f"table{num}_{dataset}_{model}_{fat}_lam{lam:g}",
                      title=f"Table {num} ({DATASET_NAMES.get(dataset, dataset)}, {model_name(model)}, "
                            f"{method_name(base)} vs {method_label(fat, lam)})",
                      caption=f"{title} of {method_name(base)} and FAT (lambda={lam:g}) per eps_train, "
                              f"attack and eps_test." + extra + _seeds_note(base_es + fat_es),
                      stub=["eps_train"],
                      header=_attack_header(cols, 2) + [[(method_name(base), 1), ("FAT", 1)] * len(cols)],
                      digits=[2] * (2 * len(cols)), blank_repeats=False)
            for ep in eps_rows:
                b = index.get((dataset, model, base, 0.0, ep))
                f = index.get((dataset, model, fat, _key(lam), ep))
                vals, bold = [], []
                for a, e in cols:
                    vb, vf = _metric(b, a, e, what), _metric(f, a, e, what)
                    vals += [vb, vf]
                    if num == "4" and vb is not None and vf is not None and round(vb, 2) != round(vf, 2):
                        bold += [vb > vf, vf > vb]
                    else:
                        bold += [False, False]
                t.rows.append(([_eps_label(ep)], vals, bold))
            out.append(t)
    return out


def table2(data: Data, attack: str, eps: float) -> list[Table]:
    """Table 2: class-wise robust accuracy per eps_train at one attack/eps, with the diff row."""
    out = []
    groups: "OrderedDict[tuple, list[Entry]]" = OrderedDict()
    for e in data.entries:
        if (attack, _key(eps)) in e.metrics:
            groups.setdefault((e.dataset, e.model, e.method, e.lam), []).append(e)
    for (dataset, model, method, lam), es in groups.items():
        es = sorted(es, key=lambda e: e.eps_train)
        accs = [e.metrics[(attack, _key(eps))]["class_acc"] for e in es]
        n = len(accs[0])
        names = class_names(dataset, n)
        classes = list(range(n))
        if n > MAX_CLASS_COLUMNS:  # many classes: those whose accuracy moves most with eps_train
            moved = sorted(classes, key=lambda c: -abs(accs[-1][c] - accs[0][c]))
            classes = sorted(moved[:MAX_CLASS_COLUMNS])
        lam_s = f"_lam{lam:g}" if method.startswith("fat-") else ""
        t = Table(slug=f"table2_{dataset}_{model}_{method}{lam_s}",
                  title=f"Table 2 ({DATASET_NAMES.get(dataset, dataset)}, {model_name(model)}, "
                        f"{method_label(method, lam)}, {_attack_title(attack)} at eps_test {_eps_label(eps)})",
                  caption="Robust accuracy (%) per class, var (10^-2) and rob.acc (%) per eps_train"
                          + ("; diff = largest eps_train minus smallest." if len(es) > 1 else ".")
                          + (" Classes whose accuracy moves most." if n > MAX_CLASS_COLUMNS else "")
                          + _seeds_note(es),
                  stub=["eps_train"],
                  header=[[(names[c], 1) for c in classes] + [("var", 1), ("rob.acc", 1)]],
                  digits=[1] * len(classes) + [2, 2], blank_repeats=False)
        rows = []
        for e, a in zip(es, accs):
            vals = [100.0 * a[c] for c in classes] + [_metric(e, attack, eps, "vcra"),
                                                     _metric(e, attack, eps, "avg_acc")]
            rows.append(vals)
            t.rows.append(([_eps_label(e.eps_train)], vals, [False] * len(vals)))
        if len(es) > 1:
            diff = [None if x is None or y is None else x - y for x, y in zip(rows[-1], rows[0])]
            t.rows.append((["diff"], diff, [False] * len(diff)))
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# Figures (each function returns its matplotlib Figure; write_report saves and closes them)

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_vs_eps(series: "OrderedDict[str, list[tuple[float, float, float]]]", title: str):
    """var (10^-2) and rob.acc (%) against eps_train; series: label -> [(eps_train, var, acc)]."""
    plt = _plt()
    fig, (ax_v, ax_a) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for label, pts in series.items():
        pts = sorted(pts)
        xs = [p[0] for p in pts]
        ax_v.plot(xs, [p[1] for p in pts], marker="o", label=label)
        ax_a.plot(xs, [p[2] for p in pts], marker="o", label=label)
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


def plot_pareto(series: "OrderedDict[str, list[tuple[float, float, float]]]", title: str):
    """rob.acc (%) against var (10^-2); series: label (e.g. per lambda) -> [(eps_train, var, acc)].
    Each point is marked with its eps_train; the Pareto front over all points is a line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    allpts = []
    for label, pts in series.items():
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], label=label, s=30)
        for eps_train, v, a in pts:
            ax.annotate(_eps_label(eps_train), (v, a), fontsize=6, xytext=(3, 3), textcoords="offset points")
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


def plot_classwise(names: list[str], series: "OrderedDict[str, list[float]]", title: str):
    """Grouped bars: robust accuracy (%) per class, one bar series per label (eps_train)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) * max(1, len(series)) / 2), 3.6), dpi=100)
    k = max(1, len(series))
    width = 0.8 / k
    for i, (label, vals) in enumerate(series.items()):
        xs = [c + (i - (k - 1) / 2) * width for c in range(len(names))]
        ax.bar(xs, vals, width=width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45 if max(len(n) for n in names) > 3 else 0, fontsize=8)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_xlabel("class")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, title=r"$\epsilon_{train}$", title_fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def figures(data: Data, attack: str, eps: float) -> "OrderedDict[str, object]":
    """Every figure of the report: file stem -> Figure."""
    figs: "OrderedDict[str, object]" = OrderedDict()
    at = f"{_attack_title(attack)} at eps_test {_eps_label(eps)}"
    k = (attack, _key(eps))
    es = [e for e in data.entries if k in e.metrics]

    def point(e):
        return (e.eps_train, 100 * e.metrics[k]["vcra"], 100 * e.metrics[k]["avg_acc"])

    # Figures 1-2: one line per model, per data set and method.
    by_method: "OrderedDict[tuple, OrderedDict]" = OrderedDict()
    for e in es:
        by_method.setdefault((e.dataset, e.method, e.lam), OrderedDict()).setdefault(
            model_name(e.model), []).append(point(e))
    for (dataset, method, lam), series in by_method.items():
        lam_s = f"_lam{lam:g}" if method.startswith("fat-") else ""
        figs[f"fig_eps_train_{dataset}_{method}{lam_s}"] = plot_vs_eps(
            series, f"{method_label(method, lam)} on {DATASET_NAMES.get(dataset, dataset)}, {at}")
    # The same axes with one line per method (and lambda), per data set and model.
    by_model: "OrderedDict[tuple, OrderedDict]" = OrderedDict()
    for e in es:
        if e.method != "natural":
            by_model.setdefault((e.dataset, e.model), OrderedDict()).setdefault(
                method_label(e.method, e.lam).replace("lambda=", "λ="), []).append(point(e))
    for (dataset, model), series in by_model.items():
        if len(series) > 1:
            figs[f"fig_methods_{dataset}_{model}"] = plot_vs_eps(
                series, f"{model_name(model)} on {DATASET_NAMES.get(dataset, dataset)}, {at}")
    # Pareto: the base method and every lambda of its FAT, per data set and model.
    for (dataset, model) in OrderedDict.fromkeys((e.dataset, e.model) for e in es):
        for base in ("madry", "trades"):
            mine = [e for e in es if (e.dataset, e.model) == (dataset, model)
                    and e.method in (base, "fat-" + base)]
            if not any(e.method == "fat-" + base for e in mine):
                continue
            series = OrderedDict()
            for e in sorted(mine, key=lambda e: (e.method != base, e.lam, e.eps_train)):
                label = method_name(base) if e.method == base else f"FAT λ={e.lam:g}"
                series.setdefault(label, []).append(point(e))
            figs[f"fig_pareto_{dataset}_{model}_fat-{base}"] = plot_pareto(
                series, f"{model_name(model)} on {DATASET_NAMES.get(dataset, dataset)}: "
                        f"{method_name(base)} and FAT over lambda, {at}")
    # Class-wise bars per eps_train.
    groups: "OrderedDict[tuple, list[Entry]]" = OrderedDict()
    for e in es:
        groups.setdefault((e.dataset, e.model, e.method, e.lam), []).append(e)
    for (dataset, model, method, lam), ges in groups.items():
        ges = sorted(ges, key=lambda e: e.eps_train)
        n = len(ges[0].metrics[k]["class_acc"])
        series = OrderedDict((_eps_label(e.eps_train), [100 * a for a in e.metrics[k]["class_acc"]])
                             for e in ges)
        lam_s = f"_lam{lam:g}" if method.startswith("fat-") else ""
        figs[f"fig_classwise_{dataset}_{model}_{method}{lam_s}"] = plot_classwise(
            class_names(dataset, n), series,
            f"{method_label(method, lam)}, {model_name(model)} on {DATASET_NAMES.get(dataset, dataset)}, {at}")
    return figs


def save_figure(fig, path: str) -> None:
    """PNG written to a temporary file in the same directory, then renamed into place."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        _plt().close(fig)


# ---------------------------------------------------------------------------------------------
# The report

def runs_table(data: Data) -> str:
    """Markdown: every point of the database with its status, epochs and timings."""
    lines = ["| dataset | model | method | eps_train | lambda | seed | status | epochs | train s | eval s | error |",
             "|:---|:---|:---|---:|---:|---:|:---|---:|---:|---:|:---|"]
    for p in data.points:
        lam = f"{p.lam:g}" if p.method.startswith("fat-") else ""
        t = "" if p.train_seconds is None else f"{p.train_seconds:.0f}"
        v = "" if p.eval_seconds is None else f"{p.eval_seconds:.0f}"
        err = (p.error or "").replace("|", "/")
        lines.append(f"| {p.dataset} | {model_name(p.model)} | {method_name(p.method)} | "
                     f"{_eps_label(p.eps_train)} | {lam} | {p.seed} | {p.status} | "
                     f"{p.epochs_done}/{p.epochs_total} | {t} | {v} | {err} |")
    return "\n".join(lines) + "\n"


def build(data: Data, attack: str | None = None, eps: float | None = None):
    """All tables (Table 1, Tables 3-4, Table 2) and figures for the data."""
    attack, eps = data.pick(attack, eps)
    return table1(data) + tables34(data) + table2(data, attack, eps), figures(data, attack, eps), (attack, eps)


def write_report(db_path: str, out_dir: str, attack: str | None = None, eps: float | None = None) -> list[str]:
    """Write report.md, one CSV and one .tex per table and one PNG per figure; returns the paths."""
    data = load(db_path)
    tables, figs, (attack, eps) = build(data, attack, eps)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for t in tables:
        for ext, render in (("csv", render_csv), ("tex", render_latex)):
            path = os.path.join(out_dir, f"{t.slug}.{ext}")
            atomic_write_text(path, render(t))
            written.append(path)
    for stem, fig in figs.items():
        path = os.path.join(out_dir, f"{stem}.png")
        save_figure(fig, path)
        written.append(path)

    done = sum(p.status == "done" for p in data.points)
    md = ["# fastfat sweep report", "",
          f"Database `{os.path.basename(db_path)}`: {len(data.points)} points, {done} done, "
          f"{sum(p.status == 'failed' for p in data.points)} failed, "
          f"{sum(p.status in ('pending', 'running') for p in data.points)} pending or running.",
          "var is the variance of class-wise robust accuracy in 10^-2 (population variance x100); "
          "rob.acc is the average robust accuracy in %. "
          f"Table 2 and the figures use {_attack_title(attack)} at eps_test {_eps_label(eps)}."]
    if data.replaced:
        md.append(f"{data.replaced} older result(s) of the same grid point were left out "
                  f"(the latest finished one is used).")
    sections = (("Table 1: robust accuracy and its class-wise variance against eps_train", "table1_"),
                ("Tables 3 and 4: the base method against FAT", ("table3_", "table4_")),
                ("Table 2: class-wise robust accuracy", "table2_"))
    for heading, prefix in sections:
        ts = [t for t in tables if t.slug.startswith(prefix)]
        if ts:
            md += ["", f"## {heading}", ""]
            for t in ts:
                md += [render_markdown(t), f"Files: [{t.slug}.csv]({t.slug}.csv), [{t.slug}.tex]({t.slug}.tex)", ""]
    if figs:
        md += ["", "## Figures", ""]
        for stem in figs:
            md += [f"![{stem}]({stem}.png)", ""]
    md += ["", "## Runs", "", runs_table(data)]
    path = os.path.join(out_dir, "report.md")
    atomic_write_text(path, "\n".join(md))
    written.append(path)
    return written
