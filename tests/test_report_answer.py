"""The report's answer under one attack (the strongest evaluated unless chosen, everywhere: the
answer, Table 2, every figure, the verdicts), intervals inside their quantity's range, verdict
sentences from the paired table, and figures a reader can use (captions, 800 x 450 px, legends of
at most 10 entries, point labels that do not collide); the sweep file's [report] section."""
from __future__ import annotations

import glob
import math
import os
import re

import numpy as np
import pytest

from fastfat.errors import UserError
from fastfat.report import figures, plots, report, seeds, verdicts
from fastfat.report.settings import report_section
from fastfat.sweep.store import Point, Store

ATTACKS = ("fgsm", "pgd20", "apgd")
EPS_TEST = (0.2, 0.25)
EPS_TRAIN = (0.1, 0.15, 0.2)


def _accs(rng, level: float, classes: int = 10) -> list[float]:
    """Class accuracies around `level`, some classes at exactly 0 (as APGD leaves on digits)."""
    a = np.clip(rng.normal(level, 0.15, classes), 0, 1)
    a[:2] = 0.0
    return [float(x) for x in np.round(a * 50) / 50]


def _record(attack, eps, accs):
    a = np.array(accs)
    return {"attack": attack, "eps": eps, "class_acc": accs, "avg_acc": float(a.mean()),
            "vcra": float(a.var()), "worst_acc": float(a.min()), "checkpoint": "last"}


def make_db(path: str, methods: list[tuple[str, float]], seeds_: int = 3) -> str:
    """A results database: each (method, lam) at EPS_TRAIN x seeds, evaluated clean and under
    ATTACKS at EPS_TEST; accuracies fall from FGSM to APGD, deterministic (seeded)."""
    rng = np.random.default_rng(0)
    with Store(path) as st:
        for mi, (method, lam) in enumerate(methods):
            for eps_train in EPS_TRAIN:
                for seed in range(seeds_):
                    key = f"{method}_{lam}_{eps_train}_{seed}"
                    st.add_point(Point(key=key, method=method, model="cnn", dataset="digits",
                                       eps_train=eps_train, lam=lam, seed=seed,
                                       train_config={"method": method}, eval_config={"worst_k": 3},
                                       run_dir=key, epochs_total=1))
                    st.claim(key)
                    recs = [_record("clean", 0.0, _accs(rng, 0.95 - eps_train))]
                    for ai, attack in enumerate(ATTACKS):
                        for e in EPS_TEST:
                            recs.append(_record(attack, e, _accs(rng, 0.2 + eps_train - 0.08 * ai - e / 4
                                                                 - 0.01 * mi)))
                    st.finish(key, recs, train_seconds=1.0, eval_seconds=1.0)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("answer")
    db = make_db(str(d / "a.db"), [("madry", 0.0), ("fat-madry", 0.5), ("fat-madry", 1.0)])
    out = str(d / "rep")
    written = report.write_report(db, out)
    return db, out, written


def test_the_strongest_attack_evaluated_everywhere(small):
    db, out, written = small
    assert report.strength("aa") > report.strength("apgd") > report.strength("cw") > report.strength("pgd20")
    assert report.strength("pgd50") > report.strength("pgd20") > report.strength("fgsm")
    # only an attack run at every eps_test counts, else the strongest of all
    assert report.strongest({"pgd20": [0.2, 0.25], "apgd": [0.2]}) == "pgd20"
    assert report.strongest({"pgd20": [0.2], "apgd": [0.25]}) == "apgd"
    data = report.load(db)
    assert data.pick() == ("apgd", 0.2)
    md = open(os.path.join(out, "report.md")).read()
    assert "**Table 2 (digits, CNN, Madry, APGD at eps_test 0.2)" in md
    assert "use APGD at eps_test 0.2 (the strongest attack evaluated" in md
    figs = figures.make_figures(data, "apgd", 0.2)
    for stem, cap in figs.captions.items():
        title = " ".join(t.get_text() for t in figs[stem].texts) + " ".join(a.get_title() for a in figs[stem].axes)
        assert "APGD" in title and "APGD" in cap, stem
        if "PGD-20" in title or "PGD-20" in cap:   # PGD-20 only in the labelled attack-gap view
            assert stem.startswith("fig_attack_gap_") and cap.startswith("The attack-gap view"), stem
    assert any(s.startswith("fig_attack_gap_") for s in figs)
    html = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert "The answer under APGD" in html and "against APGD, class by class" in html
    assert "AutoAttack)" not in md.split("## Attack gap")[1].split("\n")[0]   # only APGD was run
    for f in figs.values():
        plots.pyplot().close(f)


def _intervals(text: str):
    """Every 'mean [lo, hi]' in a text, as floats."""
    return [tuple(map(float, m)) for m in re.findall(r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]", text)]


def test_no_interval_leaves_its_range_and_no_minus_zero(small):
    _, out, _ = small
    seeds_csv = open(os.path.join(out, "seeds_digits.csv")).read().splitlines()
    head = seeds_csv[0].split(",")
    lo_hi = [i for i, h in enumerate(head) if h.endswith(("95% lo", "95% hi"))]
    vals = [float(r.split(",")[i]) for r in seeds_csv[1:] for i in lo_hi if r.split(",")[i]]
    assert vals and min(vals) >= 0.0 and max(vals) <= 100.0
    assert any(v == 0.0 for v in vals)    # the classes at 0 pull intervals to the bound, not past it
    paired = open(os.path.join(out, "paired_digits.csv")).read().splitlines()
    ph = paired[0].split(",")
    for r in paired[1:]:
        c = r.split(",")
        for i, h in enumerate(ph):
            if c[i] and ("95%" in h):
                bound = 25.0 if h.startswith("diff var") else 100.0
                assert -bound <= float(c[i]) <= bound, (h, c[i])
    for name in glob.glob(os.path.join(out, "*.csv")) + [os.path.join(out, "report.md"),
                                                         os.path.join(out, "report.html")]:
        text = open(name, encoding="utf-8").read()
        assert not re.search(r"(?<![\d.])-0\.0+(?![\d]*[1-9])\b", text), name
    html = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    answer = html[html.index('id="answer"'):html.index('id="about"')]
    for mean, lo, hi in _intervals(re.sub(r"<[^>]+>", " ", answer)):
        assert lo <= mean <= hi


def test_spread_is_cut_to_the_range():
    s = seeds.spread([0.0, 0.0, 0.03], seeds.RANGE["worst_acc"])
    assert s.lo == 0.0 and s.hi > 0.03 and s.n == 3
    raw = seeds.spread([0.0, 0.0, 0.03])
    assert raw.lo < 0 and raw.hi == s.hi   # the t interval, cut only where it leaves [0, 1]
    assert seeds.diff_range("vcra") == (-0.25, 0.25)


def test_verdicts_from_the_paired_table(small):
    db, out, _ = small
    data = report.load(db)
    said = verdicts.verdicts(data, "apgd", 0.2)
    assert len(said) == 2 * len(EPS_TRAIN)   # two lambdas against Madry per eps_train
    p = data.paired
    r = p[(p.method == "fat-madry") & (p.lam == 0.5) & (p.eps_train == 0.1) & (p.attack == "apgd")
          & (p.eps == 0.2) & (p.checkpoint == "last")].iloc[0]
    line = next(s for s in said if s.startswith("FAT-Madry (λ=0.5) against Madry at eps_train 0.1 "))
    d, lo, hi = 100 * r.d_vcra, 100 * r.d_vcra_lo, 100 * r.d_vcra_hi
    verb = "lowers" if d < 0 else "raises"
    size = f"{d:.2f} [{lo:.2f}, {hi:.2f}]" if verb == "raises" else f"{-d:.2f} [{-hi:.2f}, {-lo:.2f}]"
    assert f"{verb} var by {size}" in line, line
    ok = lo > 0 or hi < 0
    assert ("supported by the seeds" in line) and (("not supported" in line) == (not ok))
    assert "average robust accuracy" in line and "clean:" in line and "worst-class accuracy" in line
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert md.index("## Verdicts") < md.index("## Table 1")
    html = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert html.index('id="verdicts"') < html.index('id="about"')


def test_every_figure_is_captioned_sized_and_readable(small, tmp_path):
    _, out, _ = small
    html = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    pngs = sorted(glob.glob(os.path.join(out, "*.png")))
    assert pngs
    for path in pngs:
        stem = os.path.basename(path)[:-4]
        with open(path, "rb") as f:
            head = f.read(24)
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert (w, h) == (800, 450), (stem, w, h)
        fig_html = re.search(rf'<figure id="{re.escape(stem)}">.*?</figure>', html, re.S)
        assert fig_html and "<figcaption>" in fig_html.group(0) and "APGD" in fig_html.group(0), stem
        assert re.search(rf"!\[{re.escape(stem)}\]\({re.escape(stem)}\.png\)\n\n\*[^*]+\*", md), stem
    # many methods: the fairness scatter and the methods lines are split, each legend <= 10
    many = [("madry", 0.0), ("trades", 0.0), ("fat-madry", 0.5), ("fat-madry", 1.0), ("fat-trades", 0.5),
            ("cfa-madry", 0.0), ("cfa-trades", 0.0), ("dafa-madry", 0.0), ("dafa-trades", 0.0), ("wat", 0.0),
            ("frl-rw", 0.0), ("faal", 0.0), ("bat", 0.0)]
    data = report.load(make_db(str(tmp_path / "m.db"), many, seeds_=2))
    figs = figures.make_figures(data, "apgd", 0.2)
    parts = [s for s in figs if s.startswith("fig_fairness_")]
    assert len(parts) >= 2 and all(s.rsplit("_", 1)[1].startswith("part") for s in parts)
    shown = set()
    for stem, fig in figs.items():
        for ax in fig.axes:
            leg = ax.get_legend()
            if leg is not None:
                assert len(leg.get_texts()) <= figures.MAX_LEGEND, stem
                if stem.startswith("fig_fairness_"):
                    shown |= {t.get_text() for t in leg.get_texts()}
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        for ax in fig.axes:   # the eps_train labels do not overlap one another
            boxes = [t.get_window_extent(r) for t in ax.texts]
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    assert not a.overlaps(b) or a.intersection(a, b).width * a.intersection(a, b).height < 4, stem
    assert len(shown) == len(many)   # every method is in some part
    for f in figs.values():
        plots.pyplot().close(f)


def test_methods_table_says_n_where_nsd_is_undefined_for_some_seeds(tmp_path):
    path = str(tmp_path / "n.db")
    with Store(path) as st:
        for seed, accs in enumerate(([0.0, 0.0], [0.0, 0.0], [0.5, 0.25])):
            key = f"m{seed}"
            st.add_point(Point(key=key, method="madry", model="cnn", dataset="digits", eps_train=0.1, lam=0.0,
                               seed=seed, train_config={"method": "madry"}, eval_config={"worst_k": 1},
                               run_dir=key, epochs_total=1))
            st.claim(key)
            st.finish(key, [_record("clean", 0.0, [1.0, 1.0]), _record("apgd", 0.2, accs)],
                      train_seconds=1.0, eval_seconds=1.0)
    out = str(tmp_path / "rep")
    report.write_report(path, out)
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    row = next(l for l in md.splitlines() if l.startswith("| Madry | 0.1 | last | 3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # NSD: every class at 0 on seeds 0 and 1 leaves it undefined there: one seed, said so
    assert cells[-2] == f"{math.sqrt(0.015625) / 0.375:.3f} (n=1)", cells


def test_report_section_of_a_sweep_file(tmp_path):
    assert report_section(None, "/b", ["apgd"], [0.2]) == (None, {})
    assert report_section("rep", "/b", ["apgd"], [0.2]) == ("/b/rep", {})
    assert report_section({"dir": "r", "attack": "PGD-20", "eps": "0.2"}, "/b", ["pgd20", "apgd"], [0.2]) == \
        ("/b/r", {"attack": "pgd20", "eps": 0.2})
    for bad, needle in (({"attack": "aa"}, "evaluates pgd20, apgd only"), ({"eps": 0.3}, "eps_test 0.2 only"),
                        ({"attak": "aa"}, "unknown [report] key"), (3, "a [report] table")):
        with pytest.raises(UserError, match=re.escape(needle)):
            report_section(bad, "/b", ["pgd20", "apgd"], [0.2])
    from fastfat.sweep.grid import build_sweep
    doc = {"db": "x.db", "grid": {"method": ["madry"], "dataset": ["synthetic"], "model": ["cnn"]},
           "eval": {"attacks": ["pgd20", "apgd"], "eps_test": [0.2]}, "report": {"attack": "pgd20"}}
    sweep = build_sweep(doc, str(tmp_path))
    assert sweep.report_options == {"attack": "pgd20"} and sweep.report is None
