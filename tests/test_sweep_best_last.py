"""A sweep point trained with a validation split (val_per_class) is evaluated twice, its last
epoch's checkpoint.pt and its selected best.pt: both sets of rows go into the database, tagged,
and both show, marked, in the report. On digits, end to end."""
from __future__ import annotations

import os
import shutil

import pytest

from fastfat.data import dataset_info
from fastfat.errors import UserError
from fastfat.evaluate import evaluate, make_test_loader
from fastfat.sweep import grid, points, runner
from fastfat.sweep.store import Store
from fastfat.runfiles import load_model
from test_report import _md_table
from test_sweep_reliability import TINY, _file, _rows

VAL = (TINY.replace("epochs = 2", "epochs = 3").replace("train_limit = 128", "train_limit = 200\nval_per_class = 2")
       .replace('attacks = ["fgsm"]', 'attacks = ["fgsm", "pgd5"]'))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bestlast"))
    s = grid.build_sweep(*grid.read_sweep_file(_file(d, VAL), None))
    assert s.points[0].train.val_per_class == 2
    counts = runner.run_sweep(s, progress=False, report=True, report_dir=os.path.join(d, "rep"))
    assert counts["ran"] == 1 and counts["failed"] == 0
    return d, s


def test_both_checkpoints_are_stored_and_equal_their_own_evaluation(swept):
    d, s = swept
    p = s.points[0]
    assert _rows(s.db, "SELECT checkpoint, attack FROM results ORDER BY rowid") == [
        (c, a) for c in ("last", "best") for a in ("clean", "fgsm", "pgd5")]
    assert _rows(s.db, "SELECT checkpoint, COUNT(*) FROM class_acc GROUP BY checkpoint ORDER BY checkpoint") == \
        [("best", 30), ("last", 30)]
    with Store(s.db, readonly=True) as st:
        recs = st.results(p.key)
    run_dir = os.path.join(s.runs_dir, p.key)
    for ckpt, name in (("last", "checkpoint.pt"), ("best", "best.pt")):
        model, _ = load_model(os.path.join(run_dir, name))
        direct = evaluate(model, make_test_loader(p.train, p.eval, "cpu"), p.eval,
                          dataset_info("digits").num_classes)
        mine = [r for r in recs if r["checkpoint"] == ckpt]
        assert [r["class_acc"] for r in mine] == [r["class_acc"] for r in direct]
        assert [r["worst_k_acc"] for r in mine] == [r["worst_k_acc"] for r in direct]
        assert [r["nstd"] for r in mine] == [r["nstd"] for r in direct]


def test_both_checkpoints_show_in_the_report(swept):
    d, _ = swept
    md = open(os.path.join(d, "rep", "report.md")).read()
    assert "checkpoint last (the final epoch) and best" in md
    rows = _md_table(md, "Methods (digits, CNN, FGSM at eps_test 0.25)")
    assert [r[2] for r in rows[2:]] == ["last", "best"]
    assert [r[3] for r in rows[2:]] == ["1 (single seed)"] * 2
    seeds = _md_table(md, "Seeds (digits)")
    assert {(r[3], r[4]) for r in seeds[2:]} == {(c, a) for c in ("last", "best") for a in ("clean", "FGSM", "PGD-5")}
    # the paper's Table 1 keeps the last checkpoint, one row
    assert len(_md_table(md, "Table 1 (digits, Madry)")) == 3


def test_a_point_trained_with_a_split_needs_its_best_checkpoint(swept, tmp_path):
    d, s = swept
    p = s.points[0]
    run_dir = str(tmp_path / "run")
    shutil.copytree(os.path.join(s.runs_dir, p.key), run_dir)
    os.remove(os.path.join(run_dir, "best.pt"))
    with pytest.raises(UserError, match="best.pt is missing"):
        points.evaluate_point(p, run_dir)


def test_when_the_last_epoch_is_the_best_it_is_evaluated_once(swept, tmp_path, monkeypatch):
    """Same weights, same records (evaluate is seeded): best.pt holding the last epoch's weights
    is not evaluated again, and its records equal the last ones."""
    import fastfat.evaluate as ev
    d, s = swept
    p = s.points[0]
    run_dir = str(tmp_path / "run")
    shutil.copytree(os.path.join(s.runs_dir, p.key), run_dir)
    shutil.copy(os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "best.pt"))
    calls = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    recs = points.evaluate_point(p, run_dir)
    assert len(calls) == 1
    last, best = recs[:3], recs[3:]
    assert [r["checkpoint"] for r in recs] == ["last"] * 3 + ["best"] * 3
    assert [{**r, "checkpoint": "x"} for r in last] == [{**r, "checkpoint": "x"} for r in best]
