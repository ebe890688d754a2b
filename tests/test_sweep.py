"""Sweeps: grid expansion and validation, the results store, resume after kill -9."""
from __future__ import annotations

import glob
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from fastfat import cli, config_dict
from fastfat.sweep import grid, runner
from fastfat.errors import UserError
from fastfat.sweep.store import Store

TINY = """
db = "results.db"
threads = 1
[grid]
method = ["madry", "fat-madry"]
eps_train = ["8/255"]
lam = [0.5]
model = ["cnn"]
dataset = ["digits"]
seed = [0]
[train]
preset = "demo"
width = 8
epochs = 4
batch_size = 16
lr = 0.1
steps = 2
step_size = "eps/2"
train_limit = 256
test_limit = 40
schedule = "constant"
[eval]
attacks = ["fgsm", "pgd20"]
eps_test = ["16/255"]
"""


def _doc(**changes):
    """The TINY sweep as a dict with some sections changed (None deletes a key)."""
    import tomllib
    d = tomllib.loads(TINY)
    for path, v in changes.items():
        sec, _, key = path.rpartition("__")
        t = d[sec] if sec else d
        if v is None:
            t.pop(key, None)
        else:
            t[key] = v
    return d


def _dump(results_db):
    """The results of a database as comparable rows (no timings)."""
    con = sqlite3.connect(results_db)
    try:
        return {
            "points": con.execute("SELECT key, status, epochs_done FROM points ORDER BY key").fetchall(),
            "results": con.execute("SELECT point, attack, eps, avg_acc, vcra, worst_acc FROM results "
                                   "ORDER BY point, attack, eps").fetchall(),
            "class_acc": con.execute("SELECT * FROM class_acc ORDER BY point, attack, eps, cls").fetchall(),
            "epochs": con.execute("SELECT point, epoch, loss, vcar, lr FROM epochs "
                                  "ORDER BY point, epoch").fetchall(),
        }
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------
# Grid expansion and validation (no training)

def test_grid_expansion_lam_only_for_fat(tmp_path):
    doc = _doc(grid__method=["natural", "madry", "fat-madry"], grid__eps_train=[0.1, "8/255"],
               grid__lam=[0.0, 0.5], grid__seed=[0, 1])
    s = grid.build_sweep(doc, str(tmp_path))
    ids = [(p.train.method, round(p.train.eps_train, 6), p.train.lam, p.train.seed) for p in s.points]
    # natural: no radius, no lambda; madry: no lambda; fat-madry: every lambda
    assert sorted(ids) == sorted(
        [("natural", 0.0, 0.0, s_) for s_ in (0, 1)]
        + [("madry", e, 0.0, s_) for e in (0.1, 0.031373) for s_ in (0, 1)]
        + [("fat-madry", e, l, s_) for e in (0.1, 0.031373) for l in (0.0, 0.5) for s_ in (0, 1)])
    assert len({p.key for p in s.points}) == len(s.points)
    p = s.points[0]
    assert (p.train.width, p.train.epochs, p.train.preset, p.train.dataset) == (8, 4, "demo", "digits")
    assert p.eval.attacks == ["fgsm", "pgd20"] and p.eval.eps_test == [16 / 255]
    assert s.db == os.path.join(str(tmp_path), "results.db")
    assert s.runs_dir == os.path.join(str(tmp_path), "results_runs")
    assert s.threads == 1


def test_grid_point_builds_its_store_row(tmp_path):
    from fastfat.config_dict import to_dict
    madry, fat = grid.build_sweep(_doc(), str(tmp_path)).points
    row = fat.to_point("results_runs/x")
    assert (row.key, row.method, row.model, row.dataset, row.lam, row.seed, row.epochs_total, row.run_dir) == \
        (fat.key, "fat-madry", "cnn", "digits", 0.5, 0, 4, "results_runs/x")
    assert row.eps_train == 8 / 255 and row.status == "pending" and row.results == []
    assert row.train_config == to_dict(fat.train) and row.eval_config == to_dict(fat.eval)
    # lambda in the key and the label of a FAT point only
    assert fat.key.split("_")[4] == "lam0.5" and "_lam" not in madry.key
    assert fat.label() == "fat-madry cnn digits eps_train 0.03137 lam 0.5 seed 0"
    assert madry.label() == "madry cnn digits eps_train 0.03137 seed 0"


@pytest.mark.parametrize("changes, message", [
    (dict(colour="red"), "unknown key(s) in the sweep file: colour"),
    (dict(grid__width=[4, 8]), "unknown grid axis width"),
    (dict(train__widht=4), "unknown [train] key(s): widht"),
    (dict(eval__attack=["fgsm"]), "unknown [eval] key(s): attack"),
    (dict(grid__method=[]), "grid.method is empty"),
    (dict(grid=None), "the grid is empty"),
    (dict(grid__seed=[{"a": 1}]), "grid.seed: expected a list of numbers or strings"),
    (dict(grid__seed=[True]), "grid.seed: expected a list of numbers or strings"),
    (dict(grid__seed=["zero"]), "seed: expected an integer"),
    (dict(grid__eps_train=["8/255", 2.0]), "grid point method=madry, eps_train=2.0"),
    (dict(grid__method=["madry", "pgd"]), "method: unknown value 'pgd'"),
    (dict(grid__eps_train=["8/255", 0.03137254901960784]), "duplicate grid point"),
    (dict(grid__model=["wrn-32-10", "wrn-34-10"]), "duplicate grid point"),
    (dict(train__epochs=0), "epochs must be an integer >= 1"),
    (dict(train__lr="fast"), "not a number"),
    (dict(train__model="cnn"), "model given both as a grid axis and in [train]"),
    (dict(eval__eps_test=[0.0]), "[eval]: eps_test must be in (0.0, 1.0]"),
    (dict(eval__attacks=["pgd"]), "unknown attack 'pgd'"),
    (dict(train="epochs=3"), "train must be a table"),
    (dict(db=None), "no results database"),
    (dict(db=3), "db must be a string"),
    (dict(threads=0), "threads must be an integer >= 1"),
    (dict(train__preset="fast"), "unknown preset 'fast'"),
])
def test_bad_sweep_files_fail_before_anything_is_written(tmp_path, capsys, changes, message):
    doc = _doc(**changes)
    path = tmp_path / "bad.toml"
    path.write_text(_to_toml(doc))
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastfat: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == ["bad.toml"]     # no database, no run directory


def _to_toml(doc: dict) -> str:
    import json

    def val(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(v)
    top = [f"{k} = {val(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    secs = [f"[{k}]\n" + "\n".join(f"{kk} = {val(vv)}" for kk, vv in v.items())
            for k, v in doc.items() if isinstance(v, dict)]
    return "\n".join(top + secs) + "\n"


def test_not_toml_and_missing_file(tmp_path, capsys):
    p = tmp_path / "x.toml"
    p.write_text("[grid\nmethod = 1")
    assert cli.main(["sweep", str(p)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert cli.main(["sweep", str(tmp_path / "none.toml")]) == 2
    assert "cannot read sweep file" in capsys.readouterr().err
    assert cli.main(["sweep", "--grid", "nope"]) == 2
    assert "unknown packaged grid 'nope'; choose one of demo" in capsys.readouterr().err


def test_flags_override_the_file(tmp_path, capsys):
    p = tmp_path / "s.toml"
    p.write_text(TINY)
    rc = cli.main(["sweep", str(p), "--dry-run", "--method", "fat-madry", "--lam", "0.25", "1",
                   "--eps-train", "4/255", "--epochs", "2", "--eval-batch-size", "7",
                   "--eps-test", "0.1", "0.2", "--db", str(tmp_path / "other.db")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "2 points; database " + str(tmp_path / "other.db") in out
    assert "fat-madry cnn digits eps_train 0.01569 lam 0.25 seed 0" in out
    assert "fat-madry cnn digits eps_train 0.01569 lam 1 seed 0" in out
    args = cli.build_parser().parse_args(["sweep", str(p), "--eval-batch-size", "7", "--batch-size", "16",
                                          "--eval-seed", "3"])
    doc, base = grid.read_sweep_file(args.config, None)
    v = vars(args)
    s = grid.build_sweep(doc, base, train_flags={k: x for k, x in v.items() if k in grid.TRAIN_FIELDS
                                                  and k not in grid.AXES},
                          eval_flags={k[5:]: x for k, x in v.items() if k.startswith("eval.")})
    assert s.points[0].train.batch_size == 16 and s.points[0].eval.batch_size == 7
    assert s.points[0].eval.seed == 3 and s.points[0].train.seed == 0
    assert os.listdir(tmp_path) == ["s.toml"]


def test_packaged_demo_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "demo" in grid.packaged_grids()
    assert cli.main(["sweep", "--grid", "demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    s = grid.build_sweep(*grid.read_sweep_file(None, "demo"))
    assert f"{len(s.points)} points; database {tmp_path / 'demo.db'}" in out
    methods = {p.train.method for p in s.points}
    assert methods == {"madry", "fat-madry"}
    assert {p.train.dataset for p in s.points} == {"digits"}
    # the fairness regime: eps_test within the training radii and at the largest; several seeds
    # (the report's intervals), AutoAttack's pair beside PGD-20, both cores busy, seeds fused
    assert s.points[0].eval.eps_test == [0.2, 0.25]
    assert {"pgd20", "apgd"} <= set(s.points[0].eval.attacks)
    assert len({p.train.seed for p in s.points}) == 3 and len(s.points) == 36
    assert (s.workers, s.fuse, s.threads) == (2, 3, 1)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["methods", "methods_cifar10"])
def test_packaged_methods_grid(tmp_path, capsys, monkeypatch, name):
    """Every training method in one grid, under one schedule and split; FRL from its grid's TRADES."""
    from fastfat.config import METHODS
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", "--grid", name, "--dry-run"]) == 0
    s = grid.build_sweep(*grid.read_sweep_file(None, name))
    assert {p.train.method for p in s.points} == set(METHODS) - {"natural"}
    assert {grid.setting_of(config_dict.to_dict(p.train)) for p in s.points} == {grid.setting_of(config_dict.to_dict(s.points[0].train))}
    frl = [p for p in s.points if p.train.method.startswith("frl")]
    assert frl and all(p.depends_on and "_trades_" in p.depends_on for p in frl)
    order = [p.key for p in s.points]
    assert all(order.index(p.depends_on) < order.index(p.key) for p in frl)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Running: the store, resume, failures

def _sweep_file(d, text=TINY):
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "s.toml")
    with open(p, "w") as f:
        f.write(text)
    return p


def _run(path, **kw):
    s = grid.build_sweep(*grid.read_sweep_file(path, None))
    return s, runner.run_sweep(s, progress=False, report=kw.pop("report", False), **kw)


def kill9_at_first_checkpoint(path: str, d: str, poll: float = 0.005) -> None:
    """Run `fastfat sweep path` in a real process and SIGKILL it as soon as a checkpoint exists
    under d/results_runs (the sweep files here put their runs there)."""
    proc = subprocess.Popen([sys.executable, "-m", "fastfat", "sweep", path, "--no-progress", "--no-report"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not glob.glob(os.path.join(d, "results_runs", "*", "checkpoint.pt")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    # The uninterrupted reference, in this process.
    ref, counts = _run(_sweep_file(str(tmp_path / "ref")))
    assert counts["ran"] == 2 and counts["failed"] == 0
    want = _dump(ref.db)
    assert [r[1] for r in want["points"]] == ["done", "done"]
    assert len(want["epochs"]) == 8 and len(want["results"]) == 2 * 3   # clean + fgsm + pgd20

    # The same sweep in a subprocess, killed with SIGKILL as soon as a checkpoint exists.
    d = str(tmp_path / "killed")
    path = _sweep_file(d)
    kill9_at_first_checkpoint(path, d)
    killed = _dump(os.path.join(d, "results.db"))
    assert [r[1] for r in killed["points"]].count("done") < 2       # it did not get to the end
    assert sum(r[2] for r in killed["points"]) < 8                   # epochs recorded before the kill

    # Run the same command again: it takes the dead process's point over and resumes it.
    s, counts = _run(path)
    assert counts["failed"] == 0 and counts["ran"] + counts["skipped"] == 2
    assert _dump(s.db) == want

    # Once more: everything is done, nothing runs, nothing changes.
    s, counts = _run(path)
    assert counts["ran"] == 0 and counts["skipped"] == 2
    assert _dump(s.db) == want

    # Kills at exact moments: right after point 1's epoch-2 checkpoint, and after point 2's last
    # checkpoint but before its results (neither recorded in the database).
    import torch

    from fastfat.train import train
    s = grid.build_sweep(*grid.read_sweep_file(_sweep_file(str(tmp_path / "exact")), None))
    before = torch.get_num_threads()
    torch.set_num_threads(s.threads)   # CPU results are exact for a fixed thread count
    try:
        for p, stop in zip(s.points, (2, 4)):
            def kill_at(row, stop=stop):
                if row["epoch"] == stop:
                    raise KeyboardInterrupt
            with pytest.raises(KeyboardInterrupt):
                train(p.train, os.path.join(s.runs_dir, p.key), resume=True, progress=False, on_epoch=kill_at)
    finally:
        torch.set_num_threads(before)
    counts = runner.run_sweep(s, progress=False, report=False)
    assert counts["ran"] == 2
    assert _dump(s.db) == want


def test_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    import fastfat.train as train_mod
    from fastfat.train import NonFiniteLoss

    real = train_mod.train

    def flaky(cfg, *a, **kw):
        if cfg.method == "madry":
            raise NonFiniteLoss("training diverged: the loss is nan in epoch 1 (by step 2); lower --lr or --lam")
        return real(cfg, *a, **kw)

    monkeypatch.setattr(train_mod, "train", flaky)
    path = _sweep_file(str(tmp_path / "f"))
    s, counts = _run(path)
    assert counts["failed"] == 1 and counts["ran"] == 1 and counts["done"] == 1
    with Store(s.db) as st:
        bad, good = sorted(st.points(), key=lambda p: p.method != "madry")
    assert bad.status == "failed" and bad.error.startswith("training diverged: the loss is nan")
    assert good.status == "done" and len(good.results) == 3
    assert "FAILED madry cnn digits" in capsys.readouterr().out

    # The CLI says so with exit code 1; once the cause is gone, a re-run retries only that point.
    monkeypatch.setattr(train_mod, "train", real)
    assert cli.main(["sweep", path, "--no-progress"]) == 0
    with Store(s.db) as st:
        assert [p.status for p in st.points()] == ["done", "done"]
    out = capsys.readouterr().out
    assert "2/2 points done (1 run now, 1 already done), 0 failed" in out
    assert os.path.isfile(os.path.join(str(tmp_path / "f"), "results_report", "report.md"))


def test_changed_eval_reevaluates_without_retraining(tmp_path, monkeypatch):
    path = _sweep_file(str(tmp_path / "e"))
    s, _ = _run(path)
    before = _dump(s.db)
    import fastfat.train as train_mod

    def no_training(*a, **kw):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(train_mod.Trainer, "train_step", no_training)
    path = _sweep_file(str(tmp_path / "e"), TINY.replace('eps_test = ["16/255"]', 'eps_test = ["16/255", 0.1]'))
    s, counts = _run(path)
    assert counts["ran"] == 2
    after = _dump(s.db)
    assert after["epochs"] == before["epochs"]
    assert len(after["results"]) == 2 * 5 and set(before["results"]) < set(after["results"])


def test_store_refuses_foreign_files(tmp_path):
    junk = tmp_path / "x.db"
    junk.write_bytes(b"garbage" * 100)
    with pytest.raises(UserError, match="not an SQLite file"):
        Store(str(junk))
    other = tmp_path / "o.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (a)")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="SQLite database of something else"):
        Store(str(other))
    with pytest.raises(UserError, match="not found"):
        Store(str(tmp_path / "missing.db"), create=False)
    with Store(str(tmp_path / "ok.db")) as st:
        assert st.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_claim_shares_a_grid_between_processes(tmp_path):
    """A point running in a live process is left alone; one left by a dead process is taken."""
    import socket

    from fastfat.sweep.store import Point, owner_id
    with Store(str(tmp_path / "c.db")) as st:
        for k in ("a", "b", "c"):
            st.add_point(Point(key=k, method="madry", model="cnn", dataset="digits", eps_train=0.1, lam=0.0,
                               seed=0, train_config={}, eval_config={}, run_dir=k, epochs_total=1))
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        host = socket.gethostname()
        with st.transaction() as db:
            for key, pid in (("a", os.getppid()), ("b", dead.pid)):   # both claims fresh
                db.execute("UPDATE points SET status='running', owner=?, heartbeat=? WHERE key=?",
                           (f"{host}:{pid}", time.time(), key))
        assert st.claim("a").status == "busy"
        assert st.claim("b").status == "claimed" and st.point("b").owner == owner_id()
        assert st.claim("c").status == "claimed"
        st.finish("c", [], train_seconds=0.0, eval_seconds=0.0)
        assert st.claim("c").status == "done"
        st.release("b")
        assert st.point("b").status == "pending" and st.point("b").owner is None


def test_threads_are_restored_after_a_sweep(tmp_path):
    import torch
    before = torch.get_num_threads()
    s = grid.build_sweep(*grid.read_sweep_file(_sweep_file(str(tmp_path / "t")), None))
    s.points = []   # nothing to train: only the thread setting is exercised
    runner.run_sweep(s, progress=False, report=False)
    assert torch.get_num_threads() == before


def test_point_key_ignores_fields_at_their_default():
    """A field added to TrainConfig later, at its default, must not rename existing points (their
    checkpoints and database rows would be orphaned and the whole grid retrained): the key is
    pinned here for a fixed config. A changed [train] value still makes a new key."""
    from fastfat.config import make_train_config
    cfg = make_train_config("demo")
    assert grid.point_key(cfg) == "digits_cnn_madry_eps0.15_s0_c64df2b6"
    assert grid.point_key(make_train_config("demo", epochs=16)) != grid.point_key(cfg)
