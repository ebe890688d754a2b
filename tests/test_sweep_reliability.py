"""Sweeps under faults, with real processes where processes matter (issue 12): sweeps creating a
database at the same instant, a failure in a concurrent sweep, SIGTERM, claims of other hosts and
reused pids, the heartbeat and lease, another grid in the database, a grid the database cannot
hold. The database file and the report's side are in test_sweep_files.py."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from fastfat import cli
from fastfat.sweep import grid, runner
from fastfat.sweep.schema import SCHEMA_VERSION
from fastfat.sweep.store import ClaimLost, Point, Store

# One point trains in about a second: the small CNN at width 4 on 128 digits, memory loaders
# (no FFCV import), one torch thread.
TINY = """
db = "s.db"
threads = 1
[grid]
method = ["madry"]
eps_train = [0.1]
model = ["cnn"]
dataset = ["digits"]
seed = [0]
[train]
preset = "demo"
width = 4
epochs = 2
batch_size = 32
steps = 1
train_limit = 128
test_limit = 40
loader = "memory"
[eval]
attacks = ["fgsm"]
eps_test = [0.25]
loader = "memory"
"""


def _file(d, text=TINY, name="s.toml"):
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def _sweep(path, *flags):
    """`python -m fastfat sweep` in a real process, started now."""
    return subprocess.Popen([sys.executable, "-m", "fastfat", "sweep", path, "--no-progress", "--no-report",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(db, sql, args=()):
    """Rows of a query on a database that another process may be writing (or not yet created)."""
    if not os.path.isfile(db) or os.path.getsize(db) == 0:
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return []   # the schema is not there yet
    finally:
        con.close()


def _wait_for(cond, proc, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("fastfat: error: ") and len(err.strip().splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------------
# D8: sweeps creating a new database at the same instant

def _open_at(barrier, path, key, q):
    try:
        barrier.wait()
        with Store(path) as st:
            st.add_point(_point(key))
        q.put("ok")
    except BaseException as e:  # noqa: BLE001
        q.put(f"{type(e).__name__}: {e}")


def test_two_processes_create_a_new_database_at_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for i in range(20):
        path = str(tmp_path / f"race{i}.db")
        barrier, q = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_open_at, args=(barrier, path, k, q)) for k in ("a", "b")]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert sorted(q.get(timeout=5) for _ in procs) == ["ok", "ok"], f"round {i}"
        with Store(path, readonly=True) as st:
            assert [p.key for p in st.points()] in (["a", "b"], ["b", "a"])
            assert st.db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()[0] == str(SCHEMA_VERSION)
        assert _rows(path, "PRAGMA journal_mode") == [("wal",)]


# ---------------------------------------------------------------------------------------------
# D9, D10: failures and claims between processes

def test_a_failure_in_a_concurrent_sweep_is_not_retried_by_it(tmp_path):
    """Sweep A runs the digits point; B starts meanwhile, finds it busy and fails the cifar10 point
    (no data). A must not run that point again: only a later run retries it."""
    d = str(tmp_path)
    path = _file(d, TINY.replace('dataset = ["digits"]', 'dataset = ["digits", "cifar10"]')
                 .replace("[train]", f'[train]\ndata_root = "{tmp_path / "no_data"}"'))
    db = os.path.join(d, "s.db")
    a = _sweep(path)
    try:
        _wait_for(lambda: _rows(db, "SELECT 1 FROM points WHERE dataset='digits' AND status='running'"),
                  a, "A claimed the digits point")
        a.send_signal(signal.SIGSTOP)   # hold A inside the point while B runs
        b = subprocess.run([sys.executable, "-m", "fastfat", "sweep", path, "--no-progress", "--no-report"],
                           capture_output=True, text=True, timeout=120)
    finally:
        a.send_signal(signal.SIGCONT)
    a_out, a_err = a.communicate(timeout=120)
    assert b.returncode == 1 and b.stdout.count("FAILED") == 1, (b.stdout, b.stderr)
    assert "FAILED madry cnn cifar10" in b.stdout and "1 running in another process" in b.stdout
    assert a.returncode == 1, (a_out, a_err)
    assert "FAILED" not in a_out and "1 failed in another process during this run" in a_out, a_out
    assert _rows(db, "SELECT dataset, status FROM points ORDER BY dataset") == [("cifar10", "failed"),
                                                                                ("digits", "done")]
    # A later run retries it.
    s = grid.build_sweep(*grid.read_sweep_file(path, None))
    counts = runner.run_sweep(s, progress=False, report=False)
    assert (counts["failed"], counts["failed_elsewhere"], counts["skipped"]) == (1, 0, 1)


def test_sigterm_gives_the_point_back(tmp_path):
    d = str(tmp_path)
    path = _file(d, TINY.replace("epochs = 2", "epochs = 50"))
    db = os.path.join(d, "s.db")
    proc = _sweep(path)
    _wait_for(lambda: _rows(db, "SELECT 1 FROM points WHERE epochs_done >= 1"), proc, "an epoch")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert err.strip().splitlines()[-1].startswith("fastfat: terminated"), err
    assert _rows(db, "SELECT status, owner FROM points") == [("pending", None)]
    done = _rows(db, "SELECT epochs_done FROM points")[0][0]
    assert 1 <= done < 50


def test_a_transaction_left_open_by_a_signal_does_not_block_the_release(tmp_path):
    with Store(str(tmp_path / "t.db")) as st:
        st.add_point(_point("a"))
        st.claim("a")
        st.db.execute("BEGIN IMMEDIATE")   # as if SIGTERM struck inside __exit__, before COMMIT
        st.db.execute("UPDATE points SET epochs_done=7")
        st.release("a")
        assert (st.point("a").status, st.point("a").epochs_done) == ("pending", 0)


def _tiny_sweep(d, **kw):
    s = grid.build_sweep(*grid.read_sweep_file(_file(d, TINY.replace("epochs = 2", "epochs = 1")), None), **kw)
    with Store(s.db) as st:
        st.add_point(s.points[0].to_point("r"))
    return s, s.points[0].key


def _hold(db, key, owner, silent_s):
    """Make the point look claimed by owner, whose last heartbeat was silent_s seconds ago."""
    with Store(db) as st, st.transaction() as con:
        con.execute("UPDATE points SET status='running', owner=?, heartbeat=?, lease=600, started=? "
                    "WHERE key=?", (owner, time.time() - silent_s, time.time() - silent_s, key))


def test_claims_of_other_hosts_and_reused_pids(tmp_path, capsys):
    s, key = _tiny_sweep(str(tmp_path))
    # Another host's claim with a fresh heartbeat: left alone.
    _hold(s.db, key, "elsewhere:123", 5)
    assert runner.run_sweep(s, progress=False, report=False)["busy"] == 1
    # By hand: --reclaim takes it back, says so, and runs it.
    assert cli.main(["sweep", _file(str(tmp_path), TINY.replace("epochs = 2", "epochs = 1")),
                     "--no-progress", "--no-report", "--reclaim"]) == 0
    out = capsys.readouterr().out
    assert "sweep: reclaimed madry cnn digits eps_train 0.1 seed 0 from elsewhere:123 (silent for 0.1 min)" in out
    assert "1/1 points done (1 run now" in out
    # Silent for longer than its lease (another host, or this host with the pid reused by an
    # unrelated live process): taken over without asking, and said.
    for owner in ("elsewhere:123", f"{socket.gethostname()}:{os.getppid()}"):
        with Store(s.db) as st, st.transaction() as con:
            con.execute("UPDATE points SET status='pending' WHERE key=?", (key,))
        _hold(s.db, key, owner, 601)
        assert runner.run_sweep(s, progress=False, report=False)["ran"] == 1
        assert f"sweep: took over madry cnn digits eps_train 0.1 seed 0 from {owner} (silent for 10.0 min" \
            in capsys.readouterr().out
    # A live process on this host with a fresh heartbeat is never reclaimed.
    with Store(s.db) as st, st.transaction() as con:
        con.execute("UPDATE points SET status='pending' WHERE key=?", (key,))
    _hold(s.db, key, f"{socket.gethostname()}:{os.getppid()}", 5)
    with Store(s.db) as st:
        assert st.reclaim([key]) == [] and st.claim(key).status == "busy"


def test_the_heartbeat_runs_while_a_point_trains_and_a_lost_claim_is_left(tmp_path, monkeypatch, capsys):
    import fastfat.train as train_mod
    s, key = _tiny_sweep(str(tmp_path), lease=0.005)    # 0.3 s: a beat every 60 ms
    assert s.lease == 0.3
    beats = []

    def slow(cfg, out_dir, *, on_epoch, **kw):
        for _ in range(5):
            time.sleep(0.15)
            beats.append(_rows(s.db, "SELECT heartbeat FROM points")[0][0])
        with Store(s.db) as st, st.transaction() as con:   # another process takes it over
            con.execute("UPDATE points SET owner='elsewhere:1', heartbeat=? WHERE key=?", (time.time(), key))
        on_epoch({"epoch": 1, "loss": 1.0, "seconds": 1.0})
        raise AssertionError("on_epoch should have raised ClaimLost")

    monkeypatch.setattr(train_mod, "train", slow)
    counts = runner.run_sweep(s, progress=False, report=False)
    assert len(set(beats)) == len(beats) and beats == sorted(beats)   # renewed between every look
    assert (counts["busy"], counts["failed"], counts["ran"]) == (1, 0, 0)
    assert "was taken over by another process" in capsys.readouterr().out
    assert _rows(s.db, "SELECT status, owner, epochs_done FROM points") == [("running", "elsewhere:1", 0)]
    with Store(s.db) as st, pytest.raises(ClaimLost):
        st.finish(key, [], train_seconds=0.0, eval_seconds=0.0)


@pytest.mark.parametrize("flag, message", [("0", "lease must be a number of minutes > 0"),
                                           ("nan", "lease must be a number of minutes > 0")])
def test_bad_lease(tmp_path, capsys, flag, message):
    assert cli.main(["sweep", _file(str(tmp_path)), "--lease", flag]) == 2
    assert message in _error_line(capsys)
    assert os.listdir(tmp_path) == ["s.toml"]


# ---------------------------------------------------------------------------------------------
# D13: another grid in the database; D2: a grid the database cannot hold

def _point(key, method="madry", lam=0.0, eps_train=0.1, seed=0, **train):
    cfg = {"method": method, "lam": lam, "eps_train": eps_train, "seed": seed, "dataset": "digits",
           "model": "cnn", "width": 8, **train}
    return Point(key=key, method=method, model="cnn", dataset="digits", eps_train=eps_train, lam=lam,
                 seed=seed, train_config=cfg, eval_config={}, run_dir=key, epochs_total=1)


def test_a_sweep_says_the_database_holds_another_grid(tmp_path, capsys):
    s, _ = _tiny_sweep(str(tmp_path))
    with Store(s.db) as st:
        st.add_point(_point("other", width=16))
    runner.run_sweep(s, progress=False, report=False)
    out = capsys.readouterr().out
    assert "also holds 1 point(s) of another grid with other [train] settings" in out
    assert len([line for line in out.splitlines() if "also holds" in line]) == 1


def test_a_grid_that_the_database_cannot_hold_leaves_nothing(tmp_path, capsys):
    path = _file(str(tmp_path), TINY.replace("seed = [0]", "seed = [99999999999999999999]"))
    assert cli.main(["sweep", path]) == 2
    assert "seed" in _error_line(capsys)
    assert os.listdir(tmp_path) == ["s.toml"]
