"""`fastfat report`: a results database's finished points (pandas), laid out as the paper's
tables (paper.py) and the tables beyond it, written as Markdown (report.md), CSV and LaTeX
(tables.py) beside the figures (figures.py), the verdicts (verdicts.py) and report.html (html.py),
all under one attack: the strongest evaluated (strongest()) unless --attack or [report] attack
chooses another.

Tables (each as Markdown in report.md, and as its own CSV and LaTeX file):
  Table 1    var (VCRA x10^-2) and rob.acc (%) per attack and eps_test; rows per model and
             eps_train; one table per data set and method (and lambda).
  Tables 3-4 a base method (Madry, TRADES) and its FAT side by side, per eps_train: var (3) and
             rob.acc (4, the higher one in bold); one pair per data set, model and lambda.
  Table 2    class-wise robust accuracy (%) per eps_train at the report's attack and eps_test, with var,
             rob.acc and the diff row (largest eps_train minus smallest).
  Methods    every method: clean and robust avg / worst / k-worst / NSD and rho against its base
             method, mean +- std over seeds, last and best checkpoints (methods_table.py).
  Attack gap PGD-20 minus APGD or AutoAttack (apgd, aa) class by class (methods_table.py).
  Seeds      each cell's mean +- std, n and 95% interval; Paired: each method minus its base
             method over common seeds, with its interval (seeds.py).

Tables 1-4 and 2 and their figures show the last checkpoint, averaged over seeds (each metric,
and each class's accuracy over the seeds that have test samples of the class); the methods,
seeds, paired and gap tables show the best checkpoint too, marked. A table or figure only sets
side by side points whose training settings differ along its own axes: a database holding
points of several settings (a changed [train] section, another grid file) gets one set of tables
per setting, named by the fields that differ. If it holds the same point twice, the one finished
last is used.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field

import pandas as pd

from ..errors import UserError
from ..files import atomic_write_text, made_dirs
from .labels import METHOD_ORDER, attack_title, eps_label, lam_text, method_name, model_name
from . import methods_table, seeds
from .seeds import CELL
from .seeds import eps_key as _key
from .tables import render_csv, render_latex, render_markdown

METRICS = ["avg_acc", "vcra", "worst_acc", "class_acc"]
RUN_METRICS = ["avg_acc", "vcra", "worst_acc", "worst_k_acc", "nstd", "class_acc"]
INTROS = {"methods_": methods_table.METHODS_INTRO, "attack_gap_": methods_table.gap_intro,   # report.md's
          "seeds_": seeds.SEEDS_INTRO, "paired_": seeds.PAIRED_INTRO}   # words before them (or a function of Data)


# ---------------------------------------------------------------------------------------------
# Loading: the database's finished points, averaged over seeds

@dataclass
class Data:
    """The finished points of a database: per seed, and averaged over seeds."""
    means: pd.DataFrame   # one row per cell (CELL) and robust (attack, eps), in report order:
                          # CELL, attack, eps (rounded), seeds (the cell's count), METRICS and
                          # avg_acc_std, vcra_std (over seeds; NaN for one); last checkpoint only
    attacks: list[str]    # robust attacks in first-seen order (no clean)
    eps: dict             # attack -> sorted eps_test list
    points: list = field(default_factory=list)     # every store.Point (for the runs table)
    replaced: int = 0     # older duplicates left out
    settings: list[str] = field(default_factory=lambda: [""])   # each setting's name ('' if one)
    setting_of: dict = field(default_factory=dict)   # point key -> its setting (index)
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)   # per seed: CELL, seed, checkpoint,
                          # attack (and clean), eps, worst_k and RUN_METRICS (seeds.py's frame)
    stats: pd.DataFrame = field(default_factory=pd.DataFrame)    # seeds.aggregate(runs)
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)   # seeds.paired(runs)
    rho: dict = field(default_factory=dict)                      # methods_table.rho_spreads(runs)
    gaps: pd.DataFrame = field(default_factory=pd.DataFrame)     # methods_table.attack_gaps(runs)

    def tag(self, setting: int) -> tuple[str, str]:
        """(title suffix, slug suffix) naming a setting when the database holds several."""
        if len(self.settings) < 2:
            return "", ""
        return f", {self.settings[setting]}", f"_set{setting + 1}"

    def at(self, attack: str, eps: float) -> pd.DataFrame:
        """The rows of one attack and eps_test."""
        m = self.means
        return m[(m.attack == attack) & (m.eps == _key(eps))]

    def pick(self, attack: str | None = None, eps: float | None = None) -> tuple[str, float]:
        """The attack and eps_test of the answer, Table 2, the figures and the verdicts: the
        strongest attack evaluated (strongest()) at the smallest eps_test, unless given (then
        checked)."""
        if attack is None:
            attack = strongest(self.eps)
        elif attack not in self.attacks:
            raise UserError(f"--attack {attack}: not in the results; have {', '.join(self.attacks)}")
        if eps is None:
            eps = self.eps[attack][0]
        elif _key(eps) not in [_key(e) for e in self.eps[attack]]:
            raise UserError(f"--eps {eps:g}: {attack} was evaluated at "
                            f"{', '.join(f'{e:g}' for e in self.eps[attack])} only")
        return attack, eps


def strength(attack: str) -> tuple[int, int]:
    """How strong an attack is, for sorting: AutoAttack (aa) > its APGD pair (apgd) > C&W > PGD-K
    (more steps stronger) > FGSM; an unknown name between FGSM and PGD."""
    if attack.startswith("pgd") and attack[3:].isdigit():
        return 2, int(attack[3:])
    return {"aa": (5, 0), "apgd": (4, 0), "cw": (3, 0), "fgsm": (0, 0)}.get(attack, (1, 0))


def strongest(eps: dict) -> str:
    """The strongest attack (strength()) among those evaluated at every eps_test the results
    hold (else among all); eps: attack -> its eps_test list."""
    every = set.union(*({_key(e) for e in es} for es in eps.values()))
    full = [a for a, es in eps.items() if {_key(e) for e in es} == every] or list(eps)
    return max(full, key=strength)


def _seed_mean(values: pd.Series):
    """The mean of a metric (or of each class's accuracy, over the seeds where the class had test
    samples; NaN if none had) over seeds, summed in order: pandas' own mean sums with
    compensation, which can change the last bit and so a printed digit."""
    rows = values.tolist()
    if isinstance(rows[0], list):
        have = [[a for a in c if a is not None and a == a] for c in zip(*rows)]
        return [sum(h) / len(h) if h else math.nan for h in have]
    return sum(rows) / len(rows)


def _run_row(r: dict, k: int) -> dict:
    """A stored record with worst_k_acc and nstd as stored, or derived from its class accuracies
    (rows from before schema 3; k: the point's eval worst_k); nstd NaN where undefined."""
    from .. import metrics
    accs = [math.nan if a is None else a for a in r["class_acc"]]
    row = dict(r)
    if r.get("worst_k_acc") is None:
        row["worst_k_acc"], row["worst_k"] = metrics.worst_k_accuracy(accs, k), k
    nstd = r.get("nstd")
    if nstd is None:
        nstd = metrics.normalized_std(accs)
    row["nstd"] = math.nan if nstd is None else nstd
    row.setdefault("checkpoint", "last")
    return row


def load(db_path: str) -> Data:
    """The finished points of a database, per seed and grouped and averaged over seeds."""
    from ..sweep.grid import setting_names, setting_of
    from ..sweep.store import Store

    with Store(db_path, readonly=True) as store:
        points = store.points()
    done = [p for p in points if p.status == "done"]
    if not done:
        raise UserError(f"{db_path}: no finished points to report yet")
    settings = list(dict.fromkeys(setting_of(p.train_config) for p in points))   # first-seen order
    which = {p.key: settings.index(setting_of(p.train_config)) for p in points}

    def ident(p):
        return which[p.key], p.dataset, p.model, p.method, _key(p.lam), _key(p.eps_train), p.seed

    latest = {ident(p): p for p in sorted(done, key=lambda p: p.finished or 0)}  # ties: the later row
    chosen = [latest[i] for i in dict.fromkeys(map(ident, done))]              # in first-seen order
    runs = pd.DataFrame([dict(zip(CELL + ["seed"], ident(p)), **_run_row(r, int(p.eval_config.get("worst_k", 3))))
                         for p in chosen for r in p.results],
                        columns=CELL + ["seed", "checkpoint", "attack", "eps", "worst_k"] + RUN_METRICS)
    runs["raw_eps"], runs["eps"] = runs.eps, runs.eps.map(_key)
    # The paper's tables: the last checkpoint's robust rows, as before checkpoints were stored.
    recs = runs[(runs.attack != "clean") & (runs.checkpoint == "last")][CELL + ["seed", "attack", "eps", "raw_eps"]
                                                                         + METRICS].reset_index(drop=True)
    recs["seeds"] = recs.groupby(CELL).seed.transform("nunique")
    means = (recs.groupby(CELL + ["attack", "eps", "seeds"], sort=False)[METRICS].agg(_seed_mean)
             .reset_index())
    order = means.method.map(lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))
    means = (means.assign(order=order)
             .sort_values(["dataset", "setting", "order", "lam", "model", "eps_train"], kind="stable")
             .drop(columns="order").reset_index(drop=True))
    stats = seeds.aggregate(runs)
    last = stats[stats.checkpoint == "last"][CELL + ["attack", "eps", "avg_acc_std", "vcra_std"]]
    means = means.merge(last, on=CELL + ["attack", "eps"], how="left")   # keeps means' order
    eps = {a: sorted(g.raw_eps)   # each eps_test as first seen
           for a, g in recs.drop_duplicates(["attack", "eps"]).groupby("attack", sort=False)}
    return Data(means, list(eps), eps, points, len(done) - len(chosen), setting_names(settings), which,
                runs=runs, stats=stats, paired=seeds.paired(runs), rho=methods_table.rho_spreads(runs),
                gaps=methods_table.attack_gaps(runs))


# ---------------------------------------------------------------------------------------------
# The report

def runs_table(data: Data) -> str:
    """Markdown: every point of the database with its status, epochs and timings (and its
    setting, when the database holds several)."""
    several = len(data.settings) > 1
    lines = ["| dataset | model | method | eps_train | lambda | seed | status | epochs | train s | eval s | error |"
             + (" setting |" if several else ""),
             "|:---|:---|:---|---:|---:|---:|:---|---:|---:|---:|:---|" + (":---|" if several else "")]
    for p in data.points:
        t = "" if p.train_seconds is None else f"{p.train_seconds:.0f}"
        v = "" if p.eval_seconds is None else f"{p.eval_seconds:.0f}"
        err = (p.error or "").replace("|", "/")
        lines.append(f"| {p.dataset} | {model_name(p.model)} | {method_name(p.method)} | "
                     f"{eps_label(p.eps_train)} | {lam_text(p.method, p.lam)} | {p.seed} | {p.status} | "
                     f"{p.epochs_done}/{p.epochs_total} | {t} | {v} | {err} |"
                     + (f" set{data.setting_of[p.key] + 1} |" if several else ""))
    return "\n".join(lines) + "\n"


def build(data: Data, attack: str | None = None, eps: float | None = None):
    """All tables (Table 1, Tables 3-4, Table 2, methods, attack gap, seeds, paired), the figures
    (figures.Figures, with their captions) and the verdicts, at the chosen (attack, eps)."""
    from .figures import make_figures
    from .methods_table import gap_tables, methods_tables
    from .paper import table1, table2, tables34
    from .seeds import paired_tables, seed_tables
    from .verdicts import verdicts

    attack, eps = data.pick(attack, eps)
    return (table1(data) + tables34(data) + table2(data, attack, eps) + methods_tables(data)
            + gap_tables(data) + seed_tables(data) + paired_tables(data),
            make_figures(data, attack, eps), (attack, eps), verdicts(data, attack, eps))


def write_report(db_path: str, out_dir: str, attack: str | None = None, eps: float | None = None) -> list[str]:
    """Write report.md, report.html (html.py), a CSV and a .tex per table, a PNG per figure; returns
    the paths. A report that cannot be finished (a full disk) takes the files it added away again."""
    data = load(db_path)
    tables, figs, (attack, eps), said = build(data, attack, eps)
    with made_dirs(out_dir):
        before = set(os.listdir(out_dir))
        try:
            return _write_files(data, tables, figs, (attack, eps), said, db_path, out_dir)
        except BaseException:
            for name in set(os.listdir(out_dir)) - before:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(out_dir, name))
            raise


def sections(data: Data) -> tuple[tuple[str, str | tuple[str, ...]], ...]:
    """(heading, slug prefix or prefixes) of report.md's and report.html's table sections; the
    attack-gap heading names the attacks it compares."""
    strong = [attack_title(a) for a in data.attacks if a in methods_table.STRONG]
    return (("Table 1: robust accuracy and its class-wise variance against eps_train", "table1_"),
            ("Tables 3 and 4: the base method against FAT", ("table3_", "table4_")),
            ("Table 2: class-wise robust accuracy", "table2_"),
            ("Methods: fairness beyond the variance, and rho against the base method", "methods_"),
            (f"Attack gap: how much {attack_title(methods_table.WEAK)} overstates robust accuracy "
             f"against {' and '.join(strong) or 'a stronger attack'}, class by class", "attack_gap_"),
            ("Seeds: mean, standard deviation and 95% interval per cell", "seeds_"),
            ("Paired comparison: each method against its base method over seeds", "paired_"))


def _intro(data: Data, db_path: str, attack: str, eps: float) -> list[str]:
    """report.md's opening sentences, which report.html shows too."""
    done = sum(p.status == "done" for p in data.points)
    md = [f"Database `{os.path.basename(db_path)}`: {len(data.points)} points, {done} done, "
          f"{sum(p.status == 'failed' for p in data.points)} failed, "
          f"{sum(p.status in ('pending', 'running') for p in data.points)} pending or running; "
          f"attacks evaluated: {', '.join(attack_title(a) for a in data.attacks)}.",
          f"The answer, the verdicts, Table 2 and every figure use {attack_title(attack)} at eps_test "
          f"{eps_label(eps)}" + (" (the strongest attack evaluated; `fastfat report --attack` or a sweep "
                                 "file's [report] attack chooses another)." if attack == strongest(data.eps)
                                 else " (chosen with --attack or [report] attack; the strongest evaluated is "
                                      f"{attack_title(strongest(data.eps))})."),
          "var is the variance of class-wise robust accuracy in 10^-2 (population variance x100); "
          "rob.acc is the average robust accuracy in %."]
    if len(data.settings) > 1:
        md.append(f"The database holds points of {len(data.settings)} training settings (they differ "
                  f"beyond the grid's coordinates); no table or figure mixes them: "
                  + "; ".join(f"set{i + 1}: {name}" for i, name in enumerate(data.settings)) + ".")
    if data.replaced:
        md.append(f"{data.replaced} older result(s) of the same grid point were left out "
                  f"(the latest finished one is used).")
    if any(data.runs.checkpoint == "best"):
        md.append("Points trained with a validation split (val_per_class) were evaluated twice: "
                  "checkpoint last (the final epoch) and best (selected on the validation split). "
                  "Tables 1 to 4 and the figures but the methods scatter show the last one; the "
                  "tables from Methods on show both.")
    return md


def _write_files(data, tables, figs, chosen, said, db_path, out_dir) -> list[str]:
    from .co_flags import report_section
    from .figures import save_figure
    from .html import write_html

    written = []
    for t in tables:
        for ext, render in (("csv", render_csv), ("tex", render_latex)):
            path = os.path.join(out_dir, f"{t.slug}.{ext}")
            atomic_write_text(path, render(t))
            written.append(path)
    pngs = {stem: os.path.join(out_dir, f"{stem}.png") for stem in figs}
    for stem, fig in figs.items():
        save_figure(fig, pngs[stem])
    written += pngs.values()

    intro = _intro(data, db_path, *chosen)
    md = ["# fastfat sweep report", "", *intro]
    if said:
        md += ["", "## Verdicts", "", *[f"- {line}" for line in said]]
    guard = report_section(db_path)   # the epochs the CO guard flagged; "" where none was guarded
    if guard:
        md += ["", guard.rstrip()]
    for heading, prefix in sections(data):
        ts = [t for t in tables if t.slug.startswith(prefix)]
        if ts:
            intro_words = INTROS[prefix](data) if callable(INTROS.get(prefix)) else INTROS.get(prefix)
            md += ["", f"## {heading}", ""] + ([intro_words, ""] if intro_words else [])
            for t in ts:
                md += [render_markdown(t), f"Files: [{t.slug}.csv]({t.slug}.csv), [{t.slug}.tex]({t.slug}.tex)", ""]
    if figs:
        md += ["", "## Figures", ""]
        for stem in figs:
            md += [f"![{stem}]({stem}.png)", "", f"*{figs.captions[stem]}*", ""]
    md += ["", "## Runs", "", runs := runs_table(data)]
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(md))
    page = write_html(data, tables, pngs, figs.captions, sections(data), intro, said, chosen, runs, out_dir,
                      guard)
    return written + [os.path.join(out_dir, "report.md"), page]
