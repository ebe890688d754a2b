"""Schema 3 of the results database: results per checkpoint ('last' | 'best') with worst_k_acc,
worst_k and nstd; version-2 databases read as they are and upgraded by a sweep, race-free, with
every stored number unchanged."""
from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from fastfat.report import report
from fastfat.sweep.schema import SCHEMA_VERSION
from fastfat.sweep.store import Store
from test_sweep_reliability import _point, _rows, _sha

# Schema 2's two result tables, as fastfat wrote them before the checkpoint column.
_V2_TABLES = """
CREATE TABLE results (
    point TEXT NOT NULL REFERENCES points(key) ON DELETE CASCADE,
    attack TEXT NOT NULL, eps REAL NOT NULL,
    avg_acc REAL NOT NULL, vcra REAL NOT NULL, worst_acc REAL NOT NULL,
    PRIMARY KEY (point, attack, eps));
CREATE TABLE class_acc (
    point TEXT NOT NULL REFERENCES points(key) ON DELETE CASCADE,
    attack TEXT NOT NULL, eps REAL NOT NULL, cls INTEGER NOT NULL, acc REAL, count INTEGER,
    PRIMARY KEY (point, attack, eps, cls));
"""


def _rec(attack, eps, accs, checkpoint=None, counts=None):
    present = [a for a in accs if a is not None]
    r = {"attack": attack, "eps": eps, "class_acc": accs, "avg_acc": sum(present) / len(present),
         "vcra": 0.01, "worst_acc": min(present)}
    if checkpoint is not None:
        r["checkpoint"] = checkpoint
    if counts is not None:
        r["class_count"] = counts
    return r


def _make_v2(path, points):
    """A schema-2 database holding points {key: records}: written by this fastfat, then its two
    result tables rebuilt in version 2's shape with the same rows."""
    with Store(path) as st:
        for key, recs in points.items():
            st.add_point(_point(key, seed=len(st.points(with_results=False))))
            st.claim(key)
            st.finish(key, recs, train_seconds=1.0, eval_seconds=1.0)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=DELETE")   # a plain file, as a copied database would be
    con.execute("BEGIN")
    for t in ("results", "class_acc"):
        con.execute(f"ALTER TABLE {t} RENAME TO {t}_new")
    for stmt in _V2_TABLES.split(";"):
        if stmt.strip():
            con.execute(stmt)
    con.execute("INSERT INTO results SELECT point, attack, eps, avg_acc, vcra, worst_acc FROM results_new")
    con.execute("INSERT INTO class_acc SELECT point, attack, eps, cls, acc, count FROM class_acc_new")
    con.execute("DROP TABLE results_new")
    con.execute("DROP TABLE class_acc_new")
    con.execute("UPDATE meta SET value='2' WHERE name='schema'")
    con.execute("COMMIT")
    con.close()


V2_POINTS = {"a": [_rec("clean", 0.0, [1.0, 0.75], counts=[3, 4]), _rec("pgd20", 0.25, [0.5, 0.25], counts=[3, 4]),
                   _rec("apgd", 0.25, [0.25, None], counts=[3, 0])],
             "b": [_rec("clean", 0.0, [0.5, 0.5]), _rec("pgd20", 0.25, [0.125, 0.375])]}


def _numbers(path, table):
    cols = {"results": "point, attack, eps, avg_acc, vcra, worst_acc",
            "class_acc": "point, attack, eps, cls, acc, count"}[table]
    return sorted(_rows(path, f"SELECT {cols} FROM {table}"), key=repr)


def test_a_version_2_database_is_read_as_is_and_upgraded_by_a_sweep(tmp_path):
    db = str(tmp_path / "v2.db")
    _make_v2(db, V2_POINTS)
    results, classes, digest = _numbers(db, "results"), _numbers(db, "class_acc"), _sha(db)
    assert _rows(db, "SELECT value FROM meta WHERE name='schema'") == [("2",)]
    # read-only (the report): the rows are the last checkpoint's, the new metrics unknown
    with Store(db, readonly=True) as st:
        recs = st.results("a")
    assert [(r["checkpoint"], r["attack"]) for r in recs] == [("last", "clean"), ("last", "pgd20"), ("last", "apgd")]
    assert recs[2]["class_acc"] == [0.25, None] and recs[2]["class_count"] == [3, 0]
    assert all(r["worst_k_acc"] is None and r["nstd"] is None for r in recs)
    assert report.load(db).means.avg_acc.tolist() == [(0.375 + 0.25) / 2, 0.25]   # seeds 0 and 1
    assert _sha(db) == digest
    # a writer upgrades it, every number as it was
    with Store(db) as st:
        assert st.version == SCHEMA_VERSION == 3
        assert [r["class_acc"] for r in st.results("b")] == [[0.5, 0.5], [0.125, 0.375]]
    assert _rows(db, "SELECT value FROM meta WHERE name='schema'") == [("3",)]
    assert _numbers(db, "results") == results and _numbers(db, "class_acc") == classes
    assert _rows(db, "SELECT DISTINCT checkpoint FROM results UNION SELECT DISTINCT checkpoint FROM class_acc") \
        == [("last",)]
    assert {r[0] for r in _rows(db, "SELECT name FROM sqlite_master WHERE type='table'")} == \
        {"meta", "points", "epochs", "results", "class_acc"}
    # the checkpoint is part of the key now: a best row beside the last one
    with Store(db) as st:
        st.sync_eval_config("b", {"changed": 1})   # pending again, to be evaluated anew
        st.claim("b")
        st.finish("b", [_rec("clean", 0.0, [0.5, 0.5], "last"), _rec("clean", 0.0, [0.75, 0.5], "best")],
                  train_seconds=1.0, eval_seconds=1.0)
        assert [(r["checkpoint"], r["class_acc"]) for r in st.results("b")] == \
            [("last", [0.5, 0.5]), ("best", [0.75, 0.5])]


def _open(barrier, path, q):
    try:
        barrier.wait()
        with Store(path) as st:
            q.put((st.version, len(st.results("a"))))
    except BaseException as e:  # noqa: BLE001
        q.put(f"{type(e).__name__}: {e}")


def test_two_sweeps_upgrade_a_version_2_database_at_once(tmp_path):
    """The upgrade runs inside the schema's one write transaction: the second process waits and
    finds version 3, never a half-rebuilt table or a second copy of the rows."""
    ctx = multiprocessing.get_context("fork")
    for i in range(6):
        db = str(tmp_path / f"race{i}.db")
        _make_v2(db, V2_POINTS)
        before = _numbers(db, "results")
        barrier, q = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(barrier, db, q)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [q.get(timeout=5) for _ in procs] == [(3, 3), (3, 3)], f"round {i}"
        assert _numbers(db, "results") == before


def test_records_per_checkpoint_with_the_new_metrics(tmp_path):
    db = str(tmp_path / "c.db")
    full = dict(worst_k_acc=0.375, worst_k=2, nstd=0.5)
    with Store(db) as st:
        st.add_point(_point("p"))
        st.claim("p")
        st.finish("p", [_rec("pgd20", 0.25, [0.5, 0.25], "best") | full,
                        _rec("clean", 0.0, [1.0, 0.5], "best"),
                        _rec("pgd20", 0.25, [0.25, 0.25]) | dict(full, nstd=None),   # no tag: last
                        _rec("clean", 0.0, [1.0, 1.0], "last")], train_seconds=1.0, eval_seconds=1.0)
        recs = st.results("p")
    assert [(r["checkpoint"], r["attack"], r["class_acc"]) for r in recs] == [
        ("last", "clean", [1.0, 1.0]), ("last", "pgd20", [0.25, 0.25]),
        ("best", "clean", [1.0, 0.5]), ("best", "pgd20", [0.5, 0.25])]
    assert (recs[3]["worst_k_acc"], recs[3]["worst_k"], recs[3]["nstd"]) == (0.375, 2, 0.5)
    assert recs[1]["nstd"] is None and recs[0]["worst_k"] is None
    with Store(db) as st, pytest.raises(sqlite3.IntegrityError):
        st.sync_eval_config("p", {"changed": 1})
        st.claim("p")
        st.finish("p", [_rec("clean", 0.0, [1.0], "final")], train_seconds=1.0, eval_seconds=1.0)
