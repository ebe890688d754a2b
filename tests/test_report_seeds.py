"""The report beyond the paper's tables, on a database built here with numbers chosen by hand:
seed statistics (mean, std, n, 95% t interval), paired differences against the base method, rho,
worst-k and NSD, the attack-gap table, best and last checkpoints, and error bars in the figures.
Every expected number is computed by hand in the comments (t quantiles from a t table)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from matplotlib.collections import LineCollection, PathCollection

from fastfat.report import figures, plots, report, seeds
from fastfat.sweep.store import Point, Store
from test_report import _csv, _md_table

T2, T1 = 4.302652729911275, 12.706204736174698   # t(0.975, 2 and 1 degrees of freedom)

# (method, lam, eps_train, seed, checkpoint) -> class accuracies per attack (eps_test 0.25); 4 classes
ACC = {
    ("madry", 0.0, 0.1, 0, "last"): {"pgd20": [0.6, 0.4, 0.2, 0.4], "apgd": [0.5, 0.4, 0.1, 0.4]},
    ("madry", 0.0, 0.1, 1, "last"): {"pgd20": [0.7, 0.5, 0.3, 0.3], "apgd": [0.6, 0.5, 0.1, 0.3]},
    ("madry", 0.0, 0.1, 2, "last"): {"pgd20": [0.5, 0.5, 0.1, 0.3], "apgd": [0.5, 0.3, 0.1, 0.3]},
    ("madry", 0.0, 0.1, 0, "best"): {"pgd20": [0.7, 0.5, 0.3, 0.5], "apgd": [0.7, 0.5, 0.3, 0.5]},
    ("fat-madry", 0.5, 0.1, 0, "last"): {"pgd20": [0.5, 0.4, 0.3, 0.4], "apgd": [0.5, 0.4, 0.3, 0.4]},
    ("fat-madry", 0.5, 0.1, 1, "last"): {"pgd20": [0.5, 0.4, 0.4, 0.3], "apgd": [0.5, 0.4, 0.4, 0.3]},
    ("fat-madry", 0.5, 0.1, 2, "last"): {"pgd20": [0.4, 0.4, 0.3, 0.3], "apgd": [0.4, 0.4, 0.3, 0.3]},
    ("fat-madry", 0.5, 0.2, 0, "last"): {"pgd20": [0.4, 0.4, 0.4, 0.4], "apgd": [0.4, 0.4, 0.4, 0.4]},
}
CLEAN = [0.9, 0.8, 0.7, 0.6]


def _record(attack, accs, checkpoint):
    a = np.array(accs)
    return {"attack": attack, "eps": 0.0 if attack == "clean" else 0.25, "class_acc": list(accs),
            "avg_acc": float(a.mean()), "vcra": float(a.var()), "worst_acc": float(a.min()),
            "checkpoint": checkpoint}   # no worst_k_acc / nstd: the report derives them (k = 2)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("seeds") / "s.db")
    with Store(path) as st:
        cells = dict.fromkeys(k[:4] for k in ACC)
        for method, lam, eps_train, seed in cells:
            key = f"{method}_{eps_train}_{seed}"
            st.add_point(Point(key=key, method=method, model="cnn", dataset="digits", eps_train=eps_train,
                               lam=lam, seed=seed, train_config={"method": method}, eval_config={"worst_k": 2},
                               run_dir=key, epochs_total=1))
            st.claim(key)
            recs = [_record(a, accs, ck) for (m, l, e, s, ck), by in ACC.items()
                    if (m, l, e, s) == (method, lam, eps_train, seed)
                    for a, accs in [("clean", CLEAN)] + list(by.items())]
            st.finish(key, recs, train_seconds=1.0, eval_seconds=1.0)
    return path


@pytest.fixture(scope="module")
def md(db, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("seeds_out"))
    report.write_report(db, out)
    return out, open(os.path.join(out, "report.md")).read()


def test_spread_by_hand():
    s = seeds.spread([0.4, 0.45, 0.35])
    # mean 0.4; std sqrt((0 + 0.05^2 + 0.05^2) / 2) = 0.05; half width 4.3027 * 0.05 / sqrt(3)
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.4), pytest.approx(0.05))
    assert (s.lo, s.hi) == (pytest.approx(0.4 - 0.12420689), pytest.approx(0.4 + 0.12420689))
    s = seeds.spread([1.0, None, 2.0, float("nan")])     # None and NaN left out: n = 2
    assert (s.n, s.mean, s.std) == (2, 1.5, pytest.approx(math.sqrt(0.5)))
    assert s.hi - s.mean == pytest.approx(T1 * math.sqrt(0.5) / math.sqrt(2))
    one = seeds.spread([0.3])
    assert one.n == 1 and one.mean == 0.3 and all(math.isnan(x) for x in (one.std, one.lo, one.hi))
    assert seeds.spread([]).n == 0


def test_seed_table_mean_std_n_and_interval(md):
    out, text = md
    rows = _md_table(text, "Seeds (digits)")
    assert rows[0][:7] == ["model", "method", "eps_train", "checkpoint", "attack", "eps_test", "n"]
    by = {tuple(r[1:6]): r for r in rows[2:]}
    # Madry PGD-20 avg: 0.40, 0.45, 0.35 -> 40.00 +- 5.00, interval 40 -+ 12.42
    r = by[("Madry", "0.1", "last", "PGD-20", "0.25")]
    assert r[6] == "3" and r[7:10] == ["40.00 ± 5.00", "27.58", "52.42"]
    # worst 0.2, 0.3, 0.1 -> 20.00 +- 10.00, interval 20 -+ 24.84, cut to [0, 100]: an accuracy's
    # mean is never below 0
    assert r[10:13] == ["20.00 ± 10.00", "0.00", "44.84"]
    # a cell with one seed says so and has no interval
    r = by[("Madry", "0.1", "best", "PGD-20", "0.25")]
    assert r[6] == "1 (single seed)" and r[7:10] == ["50.00", "-", "-"]
    r = by[("Madry", "0.1", "last", "clean", "-")]
    assert r[7:10] == ["75.00 ± 0.00", "75.00", "75.00"]
    # AutoAttack's rows are there too
    assert ("FAT-Madry (lambda=0.5)", "0.1", "last", "APGD", "0.25") in by
    c = _csv(os.path.join(out, "seeds_digits.csv"))
    i = c[0].index("avg mean std")
    row = next(x for x in c if x[1:6] == ["Madry", "0.1", "last", "PGD-20", "0.25"])
    assert float(row[i]) == pytest.approx(5.0) and float(row[i - 1]) == pytest.approx(40.0)
    assert "avg 95% lo std" not in c[0]    # intervals carry no spread column


def test_paired_comparison_against_the_base_method(md):
    _, text = md
    rows = _md_table(text, "Paired comparison (digits)")
    by = {tuple(r[1:7]): r for r in rows[2:]}
    # FAT minus Madry, seed by seed (PGD-20): avg 0, -0.05, 0; worst +0.1, 0, +0.2; var by hand
    r = by[("FAT-Madry (lambda=0.5)", "Madry", "0.1", "last", "PGD-20", "0.25")]
    d_avg = [0.0, -0.05, 0.0]
    m, sd = np.mean(d_avg), np.std(d_avg, ddof=1)
    assert r[7] == "3"
    assert r[8:11] == [f"{100 * m:.2f} ± {100 * sd:.2f}", f"{100 * (m - T2 * sd / math.sqrt(3)):.2f}",
                       f"{100 * (m + T2 * sd / math.sqrt(3)):.2f}"]
    assert r[11:14] == ["10.00 ± 10.00", "-14.84", "34.84"]
    var = lambda a: np.var(a)
    d_var = [var(ACC[("fat-madry", 0.5, 0.1, s, "last")]["pgd20"]) - var(ACC[("madry", 0.0, 0.1, s, "last")]["pgd20"])
             for s in range(3)]
    assert r[14] == f"{100 * np.mean(d_var):.2f} ± {100 * np.std(d_var, ddof=1):.2f}"
    # eps_train 0.2 has no Madry run: no pair; Madry's own best has no FAT best to pair with
    assert not any(k[2] == "0.2" for k in by) and not any(k[3] == "best" for k in by)
    assert not any(k[0] == "Madry" for k in by)


def test_methods_table_worst_k_nsd_rho_best_and_last(md):
    out, text = md
    rows = _md_table(text, "Methods (digits, CNN, PGD-20 at eps_test 0.25)")
    assert rows[0] == ["method", "eps_train", "checkpoint", "n"] + [
        f"{w} {c}" for w in ("clean", "PGD-20") for c in ("avg", "worst", "k-worst", "NSD", "rho")]
    by = {tuple(r[:3]): r for r in rows[2:]}
    madry, best, fat = by[("Madry", "0.1", "last")], by[("", "0.1", "best")], by[("FAT-Madry (lambda=0.5)", "0.1", "last")]
    # k-worst with the evaluation's k = 2: Madry 0.3, 0.3, 0.2 -> 26.67 +- 5.77
    assert madry[11] == "26.67 ± 5.77"
    # NSD per seed = population std / mean of the class accuracies
    nsd = [np.std(ACC[("madry", 0.0, 0.1, s, "last")]["pgd20"]) / np.mean(ACC[("madry", 0.0, 0.1, s, "last")]["pgd20"])
           for s in range(3)]
    assert madry[12] == f"{np.mean(nsd):.3f} ± {np.std(nsd, ddof=1):.3f}"
    assert madry[13] == "-" and madry[8] == "-"          # a base method has no rho
    # rho per seed: (0.3-0.2)/0.2 - 0 = 0.5; 0 - 0.05/0.45 = -0.1111; (0.3-0.1)/0.1 - 0 = 2
    rho = [0.5, -0.05 / 0.45, 2.0]
    assert fat[13] == f"{np.mean(rho):.3f} ± {np.std(rho, ddof=1):.3f}" == "0.796 ± 1.086"
    assert fat[8] == "0.000 ± 0.000"                     # the same clean accuracies: rho 0
    # the best checkpoint, marked, one seed
    assert best[3] == "1 (single seed)" and best[9:11] == ["50.00", "30.00"]
    # FAT at eps_train 0.2 has no Madry to compare with
    assert by[("", "0.2", "last")][13] == "-"
    assert _md_table(text, "Methods (digits, CNN, APGD at eps_test 0.25)")
    assert os.path.exists(os.path.join(out, "methods_digits_cnn_apgd_0.25.csv"))


def test_attack_gap_table(md):
    out, text = md
    rows = _md_table(text, "Attack gap (digits, CNN, PGD-20 against APGD)")
    assert rows[0] == ["method", "eps_train", "checkpoint", "eps_test", "against", "n", "0", "1", "2", "3", "avg", "max"]
    madry = rows[2]
    # PGD-20 minus APGD per class and seed: [.1 0 .1 0], [.1 0 .2 0], [0 .2 0 0] -> mean over seeds
    assert madry[:6] == ["Madry", "0.1", "last", "0.25", "APGD", "3"]
    assert madry[6:10] == ["6.7", "6.7", "10.0", "0.0"]
    # avg: (0.05 + 0.075 + 0.05) / 3 = 5.83; max over the classes 10.00
    assert madry[10:] == ["5.83", "10.00"]
    best = next(r for r in rows[2:] if r[2] == "best")
    assert best[6:] == ["0.0"] * 4 + ["0.00", "0.00"]
    c = _csv(os.path.join(out, "attack_gap_digits_cnn.csv"))
    assert float(c[1][c[0].index("2")]) == pytest.approx(10.0)


def test_autoattack_columns_in_table1(md):
    _, text = md
    head = _md_table(text, "Table 1 (digits, Madry)")[0]
    assert "APGD 0.25 var" in head and "APGD 0.25 rob.acc" in head
    # the paper's tables show the last checkpoint: Madry PGD-20 rob.acc over 3 seeds = 40.00
    assert _md_table(text, "Table 1 (digits, Madry)")[2][3] == "40.00"


def test_error_bars_and_fairness_scatter(db):
    data = report.load(db)
    figs = figures.make_figures(data, "pgd20", 0.25)
    ax_v, ax_a = figs["fig_eps_train_digits_fat-madry_lam0.5"].axes
    (bars,) = [c for c in ax_a.collections if isinstance(c, LineCollection)]
    # FAT avg 0.40, 0.40, 0.35 at eps_train 0.1: 38.33 +- 2.89 (one std); 0.2 has one seed: no bar
    (seg,) = [s for s in bars.get_segments() if len(s)]   # the NaN one draws nothing
    sd = 100 * np.std([0.4, 0.4, 0.35], ddof=1)
    assert seg[:, 0] == pytest.approx([0.1, 0.1])
    assert seg[:, 1] == pytest.approx([100 * 0.38333333 - sd, 100 * 0.38333333 + sd])
    (ax,) = figs["fig_fairness_digits_cnn"].axes
    dots = {c.get_label(): c.get_offsets().tolist() for c in ax.collections if isinstance(c, PathCollection)}
    assert set(dots) == {"Madry", "Madry (best)", "FAT-Madry (λ=0.5)"}
    assert dots["Madry (best)"] == [[50.0, 30.0]]                       # avg, worst of the best checkpoint
    assert dots["Madry"] == [[pytest.approx(40.0), pytest.approx(20.0)]]
    for f in figs.values():
        plots.pyplot().close(f)


def test_classwise_bars_carry_the_seeds_std(db):
    data = report.load(db)
    figs = figures.make_figures(data, "pgd20", 0.25)
    (ax,) = figs["fig_classwise_digits_cnn_madry"].axes
    (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    # class 0 under PGD-20 over Madry's three seeds: 0.6, 0.7, 0.5 -> 60 +- 10 (%)
    seg = bars.get_segments()[0]
    assert seg[:, 1] == pytest.approx([50.0, 70.0])
    assert [len(s) for s in bars.get_segments()] == [2, 2, 2, 2]
    for f in figs.values():
        plots.pyplot().close(f)
