"""The report on a database built here with known numbers, checked cell by cell."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer

from fastfat import cli
from fastfat.report import figures, paper, plots, report
from fastfat.report.tables import render_csv
from fastfat.sweep.store import Point, Store

# (method, lam, eps_train, seed) -> class accuracies per (attack, eps_test); 4 classes.
ACC = {
    ("madry", 0.0, 0.1, 0): {("pgd20", 0.25): [0.5, 0.4, 0.3, 0.2], ("pgd20", 0.3): [0.3, 0.2, 0.2, 0.1],
                             ("fgsm", 0.25): [0.7, 0.6, 0.5, 0.4], ("fgsm", 0.3): [0.6, 0.5, 0.4, 0.3]},
    ("madry", 0.0, 0.1, 1): {("pgd20", 0.25): [0.7, 0.4, 0.1, 0.2], ("pgd20", 0.3): [0.3, 0.4, 0.2, 0.1],
                             ("fgsm", 0.25): [0.7, 0.6, 0.5, 0.4], ("fgsm", 0.3): [0.6, 0.5, 0.4, 0.3]},
    ("madry", 0.0, 0.2, 0): {("pgd20", 0.25): [0.9, 0.6, 0.2, 0.1], ("pgd20", 0.3): [0.6, 0.4, 0.1, 0.1],
                             ("fgsm", 0.25): [0.9, 0.8, 0.4, 0.3], ("fgsm", 0.3): [0.8, 0.7, 0.3, 0.2]},
    ("fat-madry", 0.5, 0.1, 0): {("pgd20", 0.25): [0.45, 0.4, 0.35, 0.3], ("pgd20", 0.3): [0.3, 0.2, 0.2, 0.2],
                                 ("fgsm", 0.25): [0.7, 0.6, 0.6, 0.5], ("fgsm", 0.3): [0.6, 0.5, 0.5, 0.4]},
    ("fat-madry", 0.5, 0.2, 0): {("pgd20", 0.25): [0.8, 0.6, 0.3, 0.2], ("pgd20", 0.3): [0.5, 0.4, 0.2, 0.1],
                                 ("fgsm", 0.25): [0.8, 0.8, 0.5, 0.4], ("fgsm", 0.3): [0.7, 0.6, 0.4, 0.3]},
}


def _record(attack, eps, accs):
    a = np.array(accs)
    return {"attack": attack, "eps": eps, "class_acc": list(accs), "avg_acc": float(a.mean()),
            "vcra": float(a.var()), "worst_acc": float(a.min())}


def _cell(method, lam, eps_train, attack, eps):
    """Expected (var x100, rob.acc %) averaged over the seeds, computed independently."""
    runs = [v[(attack, eps)] for (m, l, e, s), v in ACC.items() if (m, l, e) == (method, lam, eps_train)]
    return (100 * np.mean([np.var(r) for r in runs]), 100 * np.mean([np.mean(r) for r in runs]))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rep") / "fixture.db")
    with Store(path) as st:
        for (method, lam, eps_train, seed), recs in ACC.items():
            key = f"{method}_{eps_train}_{lam}_{seed}"
            st.add_point(Point(key=key, method=method, model="cnn", dataset="digits", eps_train=eps_train,
                               lam=lam, seed=seed, train_config={"method": method}, eval_config={},
                               run_dir=key, epochs_total=3))
            st.claim(key)
            clean = _record("clean", 0.0, [1.0, 0.9, 0.9, 0.8])
            st.finish(key, [clean] + [_record(a, e, v) for (a, e), v in recs.items()],
                      train_seconds=10.0, eval_seconds=2.0)
        # A failed point shows in the runs table only.
        st.add_point(Point(key="bad", method="fat-madry", model="cnn", dataset="digits", eps_train=0.2,
                           lam=2.0, seed=0, train_config={}, eval_config={}, run_dir="bad", epochs_total=3))
        st.claim("bad")
        st.fail("bad", "training diverged: the loss is nan in epoch 2 (by step 5); lower --lr or --lam\nmore")
    return path


@pytest.fixture(scope="module")
def out(db, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("out"))
    assert cli.main(["report", db, "--out", d]) == 0
    return d


def _md_table(md: str, title: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table that follows a bold title."""
    lines = md.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith(f"**{title}.**"))
    rows = []
    for l in lines[i + 2:]:
        if not l.startswith("|"):
            break
        rows.append([c.strip() for c in l.strip("|").split("|")])
    return rows


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _f2(x):
    return f"{x:.2f}"


def test_table1_cells_md_csv_tex(out):
    md = open(os.path.join(out, "report.md")).read()
    rows = _md_table(md, "Table 1 (digits, Madry)")
    head = rows[0]
    assert head[:2] == ["model", "eps_train"]
    # attacks in evaluation order (pgd20 first here), eps_test ascending, var then rob.acc
    assert head[2:6] == ["PGD-20 0.25 var", "PGD-20 0.25 rob.acc", "PGD-20 0.3 var", "PGD-20 0.3 rob.acc"]
    assert head[6:] == ["FGSM 0.25 var", "FGSM 0.25 rob.acc", "FGSM 0.3 var", "FGSM 0.3 rob.acc"]
    body = rows[2:]
    assert [r[:2] for r in body] == [["CNN", "0.1"], ["", "0.2"]]   # model printed once per block
    for r, eps_train in zip(body, (0.1, 0.2)):
        want = []
        for attack in ("pgd20", "fgsm"):
            for eps in (0.25, 0.3):
                want += [_f2(v) for v in _cell("madry", 0.0, eps_train, attack, eps)]
        assert r[2:] == want
    # eps_train 0.1 averages two seeds: check one number by hand too
    assert body[0][2] == _f2(100 * (np.var([0.5, 0.4, 0.3, 0.2]) + np.var([0.7, 0.4, 0.1, 0.2])) / 2)

    c = _csv(os.path.join(out, "table1_digits_madry.csv"))
    assert c[0] == ["model", "eps_train"] + head[2:]
    assert c[2][:2] == ["CNN", "0.2"]                            # CSV repeats the model
    assert float(c[2][2]) == pytest.approx(_cell("madry", 0.0, 0.2, "pgd20", 0.25)[0], abs=1e-4)
    assert float(c[2][3]) == pytest.approx(_cell("madry", 0.0, 0.2, "pgd20", 0.25)[1], abs=1e-4)

    tex = open(os.path.join(out, "table1_digits_madry.tex")).read()
    assert r"\multicolumn{4}{c}{PGD-20} & \multicolumn{4}{c}{FGSM}" in tex
    assert "CNN & 0.1 & " + " & ".join(body[0][2:]) + r" \\" in tex
    assert " & 0.2 & " + " & ".join(body[1][2:]) + r" \\" in tex
    assert "FAT" not in _md_table(md, "Table 1 (digits, Madry)")[0]


def test_tables_3_and_4_side_by_side_with_bold(out):
    md = open(os.path.join(out, "report.md")).read()
    t3 = _md_table(md, "Table 3 (digits, CNN, Madry vs FAT-Madry (lambda=0.5))")
    t4 = _md_table(md, "Table 4 (digits, CNN, Madry vs FAT-Madry (lambda=0.5))")
    assert t3[0][:5] == ["eps_train", "PGD-20 0.25 Madry", "PGD-20 0.25 FAT", "PGD-20 0.3 Madry", "PGD-20 0.3 FAT"]
    for rows, idx in ((t3, 0), (t4, 1)):
        for r, eps_train in zip(rows[2:], (0.1, 0.2)):
            assert r[0] == str(eps_train)
            want = []
            for attack in ("pgd20", "fgsm"):
                for eps in (0.25, 0.3):
                    want += [_cell("madry", 0.0, eps_train, attack, eps)[idx],
                             _cell("fat-madry", 0.5, eps_train, attack, eps)[idx]]
            got = [c.strip("*") for c in r[1:]]
            assert got == [_f2(v) for v in want]
            if idx == 1:  # Table 4: the higher rob.acc of each pair in bold, ties plain
                for j in range(0, len(want), 2):
                    a, b = round(want[j], 2), round(want[j + 1], 2)
                    assert r[1 + j].startswith("**") == (a > b)
                    assert r[2 + j].startswith("**") == (b > a)
            else:
                assert not any(c.startswith("**") for c in r)
    # eps_train 0.2, PGD-20 0.25: Madry 45.00 vs FAT 47.50 -> FAT bold, in md and tex
    assert t4[3][1:3] == ["45.00", "**47.50**"]
    tex = open(os.path.join(out, "table4_digits_cnn_fat-madry_lam0.5.tex")).read()
    assert r"0.2 & 45.00 & \textbf{47.50}" in tex
    c = _csv(os.path.join(out, "table3_digits_cnn_fat-madry_lam0.5.csv"))
    assert c[1][0] == "0.1" and float(c[1][2]) == pytest.approx(_cell("fat-madry", 0.5, 0.1, "pgd20", 0.25)[0], abs=1e-4)


def test_table2_classwise_with_diff(out):
    md = open(os.path.join(out, "report.md")).read()
    rows = _md_table(md, "Table 2 (digits, CNN, Madry, PGD-20 at eps_test 0.25)")
    assert rows[0] == ["eps_train", "0", "1", "2", "3", "var", "rob.acc"]
    lo = np.mean([[0.5, 0.4, 0.3, 0.2], [0.7, 0.4, 0.1, 0.2]], axis=0) * 100
    hi = np.array([0.9, 0.6, 0.2, 0.1]) * 100
    assert rows[2][:5] == ["0.1"] + [f"{v:.1f}" for v in lo]
    assert rows[3][:5] == ["0.2"] + [f"{v:.1f}" for v in hi]
    v_lo, a_lo = _cell("madry", 0.0, 0.1, "pgd20", 0.25)
    v_hi, a_hi = _cell("madry", 0.0, 0.2, "pgd20", 0.25)
    assert rows[4] == ["diff"] + [f"{v:.1f}" for v in hi - lo] + [_f2(v_hi - v_lo), _f2(a_hi - a_lo)]
    c = _csv(os.path.join(out, "table2_digits_cnn_madry.csv"))
    assert c[3][0] == "diff" and float(c[3][1]) == pytest.approx(hi[0] - lo[0], abs=1e-4)
    tex = open(os.path.join(out, "table2_digits_cnn_madry.tex")).read()
    assert "diff & " + " & ".join(rows[4][1:]) + r" \\" in tex


def test_report_md_lists_runs_and_figures(out):
    md = open(os.path.join(out, "report.md")).read()
    assert "6 points, 5 done, 1 failed" in md
    assert "| failed |" in md and "training diverged: the loss is nan in epoch 2" in md
    assert "more" not in md.split("## Runs")[1]           # the error is one line
    for stem in ("fig_eps_train_digits_madry", "fig_methods_digits_cnn", "fig_pareto_digits_cnn_fat-madry",
                 "fig_classwise_digits_cnn_madry"):
        path = os.path.join(out, stem + ".png")
        assert f"]({stem}.png)" in md
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) < 200_000
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") or f.startswith(".")]


def test_figure_series(db):
    data = report.load(db)
    figs = figures.make_figures(data, "pgd20", 0.25)
    # Figures 1-2: one line per model, var and rob.acc against eps_train
    ax_v, ax_a = figs["fig_eps_train_digits_madry"].axes
    (lv,), (la,) = ax_v.get_lines(), ax_a.get_lines()
    assert lv.get_label() == la.get_label() == "CNN"
    assert list(lv.get_xdata()) == [0.1, 0.2]
    assert list(lv.get_ydata()) == pytest.approx([_cell("madry", 0.0, e, "pgd20", 0.25)[0] for e in (0.1, 0.2)])
    assert list(la.get_ydata()) == pytest.approx([_cell("madry", 0.0, e, "pgd20", 0.25)[1] for e in (0.1, 0.2)])
    # one line per method on the same axes
    ax_v, _ = figs["fig_methods_digits_cnn"].axes
    assert [l.get_label() for l in ax_v.get_lines()] == ["Madry", "FAT-Madry (λ=0.5)"]
    # Pareto: scatter per lambda and the front over all points
    (ax,) = figs["fig_pareto_digits_cnn_fat-madry"].axes
    pts = {}
    for coll in ax.collections:
        if isinstance(coll, PathCollection):   # the scatters (error bars are LineCollections)
            pts[coll.get_label()] = sorted(map(tuple, coll.get_offsets().tolist()))
    want = {"Madry": sorted(_cell("madry", 0.0, e, "pgd20", 0.25) for e in (0.1, 0.2)),
            "FAT-Madry (λ=0.5)": sorted(_cell("fat-madry", 0.5, e, "pgd20", 0.25) for e in (0.1, 0.2))}
    assert set(pts) == set(want)
    for k in want:
        assert np.allclose(pts[k], want[k])
    front = next(l for l in ax.get_lines() if l.get_label() == "Pareto front")
    allp = want["Madry"] + want["FAT-Madry (λ=0.5)"]
    dominated = [p for p in allp if any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in allp)]
    expect = sorted(p for p in allp if p not in dominated)
    assert np.allclose(list(zip(front.get_xdata(), front.get_ydata())), expect)
    # class-wise bars: one bar series per eps_train, heights = class accuracies in %
    (ax,) = figs["fig_classwise_digits_cnn_madry"].axes
    bars = {c.get_label(): [b.get_height() for b in c] for c in ax.containers if isinstance(c, BarContainer)}
    assert list(bars) == ["0.1", "0.2"]
    assert bars["0.2"] == pytest.approx([90, 60, 20, 10])
    for f in figs.values():
        plots.pyplot().close(f)


def test_pareto_front_function():
    pts = [(1.0, 50.0), (2.0, 60.0), (1.5, 40.0), (3.0, 60.0), (0.5, 10.0)]
    assert plots.pareto_front(pts) == [(0.5, 10.0), (1.0, 50.0), (2.0, 60.0)]


def test_labels():
    from fastfat.report import labels
    from fastfat.config import METHODS, base_method, has_lambda
    assert [m for m in labels.METHOD_ORDER if has_lambda(m)] == ["fat-madry", "fat-trades"]
    assert sorted(labels.METHOD_ORDER) == sorted(METHODS)   # every method has its place and name
    assert all(m in labels.METHOD_NAMES for m in METHODS)
    assert base_method("fat-trades") == "trades" and base_method("madry") is None
    assert base_method("cfa-madry") == "madry" and base_method("frl-rwrm") == "trades"
    assert labels.method_label("fat-trades", 1.0) == "FAT-TRADES (lambda=1)"
    assert labels.method_label("madry", 0.0) == "Madry"
    assert (labels.lam_suffix("fat-madry", 0.5), labels.lam_suffix("madry", 0.5)) == ("_lam0.5", "")
    assert labels.lam_suffix("fat-madry", 2.0, " lam ") == " lam 2"
    assert (labels.lam_text("fat-madry", 0.25), labels.lam_text("natural", 0.0)) == ("0.25", "")


def test_report_choice_and_errors(db, tmp_path, capsys):
    data = report.load(db)
    assert data.pick() == ("pgd20", 0.25)   # default: the strongest (PGD-20 > FGSM) at the smallest eps_test
    assert data.pick("fgsm", 0.3) == ("fgsm", 0.3)
    (t,) = [t for t in paper.table2(data, "fgsm", 0.3) if t.slug == "table2_digits_cnn_madry"]
    assert t.title == "Table 2 (digits, CNN, Madry, FGSM at eps_test 0.3)"
    assert render_csv(t).splitlines()[2].startswith("0.2,80.0000,70.0000,30.0000,20.0000,")
    d = str(tmp_path / "r")
    assert cli.main(["report", db, "--out", d, "--attack", "cw"]) == 2
    assert "cw: not in the results" in capsys.readouterr().err
    assert cli.main(["report", db, "--out", d, "--eps", "0.5"]) == 2
    assert cli.main(["report", str(tmp_path / "nope.db"), "--out", d]) == 2
    assert "not found" in capsys.readouterr().err
    empty = str(tmp_path / "empty.db")
    Store(empty).close()
    assert cli.main(["report", empty, "--out", d]) == 2
    assert "no finished points" in capsys.readouterr().err
    junk = tmp_path / "junk.db"
    junk.write_text("not a database at all")
    assert cli.main(["report", str(junk), "--out", d]) == 2
