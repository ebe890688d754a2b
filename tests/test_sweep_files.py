"""The results database as a file, and what the report makes of its contents (issue 12): an
unwritable directory, foreign and empty files left untouched, a report from a read-only
directory, points of several training settings never paired, classes without test samples, and
a version-1 database. Helpers shared with the process tests come from test_sweep_reliability."""
from __future__ import annotations

import io
import os
import pwd
import sqlite3
from contextlib import redirect_stderr, redirect_stdout

import pytest

from fastfat import cli
from fastfat.report import report
from fastfat.sweep.store import Store
from test_sweep_reliability import TINY, _file, _point, _rows, _sha



def _as_nobody(fn, *args):
    """Run fn(*args) in a forked child as the unprivileged user 'nobody' (this process when it
    is not root); returns (its return value as text, its stderr). The child reuses the
    modules already imported here (nobody may not be able to read the interpreter's files)."""
    if os.geteuid() == 0:
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no unprivileged user 'nobody' to test with")
    cli.build_parser()   # the subcommands' modules load lazily in cli.main: load them here
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        code = 0
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            err = io.StringIO()
            with redirect_stdout(io.StringIO()), redirect_stderr(err):
                rc = fn(*args)
            os.write(w, f"{rc}\n{err.getvalue()}".encode())
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            os.write(w, f"raised\n{type(e).__name__}: {e}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    rc, _, out = text.partition("\n")
    return rc, out


@pytest.fixture
def shared_dir(tmp_path_factory):
    """A directory that 'nobody' can enter (pytest's own tmp root is private to its user)."""
    d = tmp_path_factory.mktemp("shared")
    for p in (d, *d.parents):
        if str(p) in ("/", "/tmp"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o711)
    os.chmod(d, 0o777)
    return d


def test_db_under_an_unwritable_directory_is_one_error_line(shared_dir):
    ro = shared_dir / "ro"
    ro.mkdir()
    path = _file(str(shared_dir), TINY.replace('db = "s.db"', 'db = "ro/sub/s.db"'))
    os.chmod(path, 0o644)
    ro.chmod(0o555)
    rc, out = _as_nobody(cli.main, ["sweep", path, "--no-progress"])
    assert rc == "2", out
    assert out.startswith("fastfat: error: cannot create the directory ") and "Permission denied" in out, out
    assert len(out.strip().splitlines()) == 1
    # the directory exists but cannot be written
    path = _file(str(shared_dir), TINY.replace('db = "s.db"', 'db = "ro/s.db"'), name="t.toml")
    os.chmod(path, 0o644)
    rc, out = _as_nobody(cli.main, ["sweep", path, "--no-progress"])
    assert rc == "2" and out.startswith("fastfat: error: cannot create results database ") \
        and "is not writable" in out and len(out.strip().splitlines()) == 1, out
    assert os.listdir(ro) == []


def _foreign_files(d):
    """A foreign SQLite file in each journal mode, a 0-byte file and a text file."""
    files = {}
    for mode in ("delete", "wal"):
        path = str(d / f"other_{mode}.db")
        con = sqlite3.connect(path)
        con.execute(f"PRAGMA journal_mode={mode}")
        con.execute("CREATE TABLE notes (a)")
        con.execute("INSERT INTO notes VALUES (1)")
        con.commit()
        con.close()
        files[mode] = path
    (d / "empty.db").write_bytes(b"")
    files["empty"] = str(d / "empty.db")
    (d / "text.db").write_text("hello\n" * 100)
    files["text"] = str(d / "text.db")
    return files


def test_foreign_files_are_refused_untouched(tmp_path, capsys):
    d = tmp_path / "files"
    d.mkdir()
    files = _foreign_files(d)
    before = {p: _sha(p) for p in files.values()}
    listing = sorted(os.listdir(d))
    sweep_file = _file(str(tmp_path), TINY)
    said = {}
    for kind, path in files.items():
        said[kind] = [cli.main(["report", path, "--out", str(tmp_path / "rep")]), capsys.readouterr().err]
        if kind != "empty":   # a sweep adopts an empty file (its own, made by a sweep next door)
            said[kind] += [cli.main(["sweep", sweep_file, "--db", path, "--no-progress"]),
                           capsys.readouterr().err]
    assert {p: _sha(p) for p in files.values()} == before
    assert sorted(os.listdir(d)) == listing            # no -wal / -shm / -journal left beside them
    assert not (tmp_path / "rep").exists()
    for kind, (rc, err, *sweep) in said.items():
        assert rc == 2 and err.startswith("fastfat: error: ") and len(err.splitlines()) == 1, err
        assert ("SQLite database of something else" if kind in ("delete", "wal") else
                "is empty" if kind == "empty" else "not an SQLite file") in err, err
        assert sweep == [] or (sweep[0] == 2 and sweep[1].startswith("fastfat: error: ")
                               and len(sweep[1].splitlines()) == 1), sweep


def test_report_reads_a_database_in_a_read_only_directory(shared_dir):
    d = shared_dir / "ro"
    d.mkdir()
    db = str(d / "r.db")
    with Store(db) as st:
        _add_done(st, "a", [_record("pgd20", 0.25, [0.5, 0.25], None)])
    assert not os.path.exists(db + "-wal")   # the last writer closed: the WAL is folded in
    os.chmod(db, 0o444)
    d.chmod(0o555)
    digest = _sha(db)
    # a report here first imports what the child needs (it may not read the interpreter's files)
    copy = shared_dir / "copy.db"
    copy.write_bytes(open(db, "rb").read())
    assert cli.main(["report", str(copy), "--out", str(shared_dir / "warm")]) == 0
    out = shared_dir / "out"
    out.mkdir()
    out.chmod(0o777)
    rc, text = _as_nobody(cli.main, ["report", db, "--out", str(out)])
    assert rc == "0", text
    assert "| 50.0 | 25.0 |" in (out / "report.md").read_text()
    assert _sha(db) == digest and os.listdir(d) == ["r.db"]


# ---------------------------------------------------------------------------------------------
# D13: grids of other settings in one database; D5: classes without test samples

def _record(attack, eps, accs, counts):
    present = [a for a in accs if a is not None and a == a]
    mean = sum(present) / len(present)
    rec = {"attack": attack, "eps": eps, "class_acc": accs, "avg_acc": mean,
           "vcra": sum((a - mean) ** 2 for a in present) / len(present), "worst_acc": min(present)}
    if counts is not None:
        rec["class_count"] = counts
    return rec


def _add_done(st, key, records, **point):
    st.add_point(_point(key, **point))
    st.claim(key)
    st.finish(key, [_record("clean", 0.0, [1.0, 1.0], None)] + records, train_seconds=1.0, eval_seconds=1.0)


def test_report_never_pairs_points_of_different_settings(tmp_path):
    db = str(tmp_path / "m.db")
    recs = [_record("pgd20", 0.25, [0.5, 0.3], None)]
    with Store(db) as st:
        _add_done(st, "madry8", recs)                                        # grid 1: width 8
        _add_done(st, "fat16", recs, method="fat-madry", lam=0.5, width=16)  # grid 2: width 16
    out = str(tmp_path / "rep")
    report.write_report(db, out)
    files = sorted(os.listdir(out))
    assert not [f for f in files if f.startswith(("table3", "table4", "fig_methods"))], files
    assert "table1_digits_madry_set1.csv" in files and "table1_digits_fat-madry_lam0.5_set2.csv" in files
    md = open(os.path.join(out, "report.md")).read()
    assert "**Table 1 (digits, Madry, width=8).**" in md
    assert "**Table 1 (digits, FAT-Madry (lambda=0.5), width=16).**" in md
    assert "no table or figure mixes them: set1: width=8; set2: width=16." in md
    # The same settings pair up as before.
    with Store(db) as st:
        _add_done(st, "fat8", [_record("pgd20", 0.25, [0.4, 0.4], None)], method="fat-madry", lam=0.5)
    report.write_report(db, out)
    md = open(os.path.join(out, "report.md")).read()
    assert "**Table 3 (digits, CNN, Madry vs FAT-Madry (lambda=0.5), width=8)" in md
    assert "| 0.1 | 1.00 | 0.00 |" in md    # var: Madry 1.00 against FAT width 8 (not 16: 1.00)
    assert "width=16)" not in md.split("## Tables 3 and 4")[1].split("## Table 2")[0]


def test_classes_without_test_samples(tmp_path, capsys):
    """None (the eval.json form) or NaN for a class without samples; stored as NULL with the class
    counts; averaged over the seeds that have the class; '-' where none has."""
    db = str(tmp_path / "n.db")
    with Store(db) as st:
        _add_done(st, "s0", [_record("pgd20", 0.25, [0.5, None, 0.25, None], [2, 0, 4, 0])])
        _add_done(st, "s1", [_record("pgd20", 0.25, [0.7, 0.5, float("nan"), None], None)], seed=1)
        assert st.results("s0")[1]["class_acc"] == [0.5, None, 0.25, None]
        assert st.results("s0")[1]["class_count"] == [2, 0, 4, 0]
        assert st.results("s1")[1]["class_acc"] == [0.7, 0.5, None, None] and "class_count" not in st.results("s1")[1]
    assert cli.main(["report", db, "--out", str(tmp_path / "rep")]) == 0
    md = open(tmp_path / "rep" / "report.md").read()
    assert "| 0.1 | 60.0 | 50.0 | 25.0 | - |" in md    # Table 2: class means over the seeds that have them


def test_a_version_1_database_is_read_as_is_and_upgraded_by_a_sweep(tmp_path):
    db = str(tmp_path / "v1.db")
    with Store(db) as st:
        _add_done(st, "a", [_record("pgd20", 0.25, [0.5, 0.25], [3, 4])])
    con = sqlite3.connect(db)
    for table, col in (("points", "heartbeat"), ("points", "lease"), ("points", "fail_mark"), ("class_acc", "count")):
        con.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
    con.execute("UPDATE meta SET value='1' WHERE name='schema'")
    con.execute("DELETE FROM meta WHERE name='clock'")
    con.commit()
    con.close()
    digest = _sha(db)
    assert report.load(db).means.avg_acc.tolist() == [0.375]
    assert _sha(db) == digest
    with Store(db) as st:
        assert st.points()[0].results[1]["class_acc"] == [0.5, 0.25]
        assert st.begin_run() == 1
    assert _rows(db, "SELECT value FROM meta WHERE name='schema'") == [("3",)]

