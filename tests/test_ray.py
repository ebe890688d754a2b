"""Sweeps on Ray (fastfat.sweep.ray_runner) on a real local two-node Ray cluster, no mocks: the
database equals a local sweep's; a point failing for its own reasons is recorded failed; Ctrl-C
and a killed driver leave the database consistent and the same command resumes; tasks ask for a
GPU on a cluster with (logical) GPUs; a worker node dying mid-run ends with every point done.

One cluster (ray.cluster_utils.Cluster: a head and a worker node, one CPU each) serves the whole
module; its node-removing test runs last. Without Ray the cluster tests skip, except in CI
(CI=true), where Ray is installed and a missing one is an error.
"""
from __future__ import annotations

import glob
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib

import pytest

from fastfat import cli
from fastfat.errors import UserError
from fastfat.sweep import grid, runner

IN_CI = os.environ.get("CI", "").lower() == "true"

# 4 points of 4 short epochs (~0.2 s each on one thread): long enough to kill a node mid-run.
GRID = """
db = "results.db"
threads = 1
[grid]
method = ["madry", "fat-madry"]
seed = [0, 1]
model = ["cnn"]
dataset = ["digits"]
eps_train = ["8/255"]
lam = [0.5]
[train]
preset = "demo"
width = 4
epochs = 4
batch_size = 32
steps = 2
step_size = "eps/2"
train_limit = 384
test_limit = 40
schedule = "constant"
device = "cpu"
[eval]
attacks = ["pgd20"]
eps_test = ["8/255"]
"""


def _sweep(tmp, db="ray.db", text=GRID, **flags):
    doc = tomllib.loads(text)
    return grid.build_sweep(doc, str(tmp), db=str(tmp / db), **flags)


def _dump(db):
    """A results database's content less its timings and run folders."""
    con = sqlite3.connect(db)
    try:
        return {
            "points": con.execute("SELECT key, method, model, dataset, eps_train, lam, seed, train_config, "
                                  "eval_config, status, error, epochs_done, epochs_total, owner "
                                  "FROM points ORDER BY key").fetchall(),
            "results": con.execute("SELECT point, attack, eps, avg_acc, vcra, worst_acc FROM results "
                                   "ORDER BY point, attack, eps").fetchall(),
            "class_acc": con.execute("SELECT * FROM class_acc ORDER BY point, attack, eps, cls").fetchall(),
            "epochs": con.execute("SELECT point, epoch, loss, vcar, lr FROM epochs ORDER BY point, epoch").fetchall(),
        }
    finally:
        con.close()


def _epochs_on_disk(runs_dir) -> dict[str, int]:
    """Epochs each run folder's checkpoint holds (its log.jsonl is written after the checkpoint)."""
    out = {}
    for log in glob.glob(os.path.join(runs_dir, "*", "log.jsonl")):
        with open(log) as f:
            out[os.path.basename(os.path.dirname(log))] = sum(1 for line in f if line.strip())
    return out


def _need_ray():
    """The ray module; skips without it, except in CI (which installs the extra)."""
    try:
        import ray
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("Ray is not installed (pip install 'fastfat[ray]'); CI installs it and runs these")
    return ray


def _warm_up():
    import importlib
    for name in ("fastfat.train", "fastfat.evaluate", "fastfat.sweep.ray_runner"):
        importlib.import_module(name)


@pytest.fixture(scope="module")
def cluster():
    """A real Ray cluster on this machine: head + worker node, one CPU each; this process is
    connected to it as a driver. Dead nodes are noticed within ~2 s (health checks every 0.5 s)."""
    ray = _need_ray()
    import logging

    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 0}})
    c.worker = c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level=logging.ERROR)
    # Start a worker on each node and import fastfat's training stack there while the local
    # reference sweep runs (a cold worker takes ~10 s on 2 cores); the tests' tasks reuse them.
    warm = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_warm_up)
    c.warming = [warm.remote() for _ in range(2)]
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def local_db(tmp_path_factory):
    """The grid swept in this process (no Ray): the reference database."""
    tmp = tmp_path_factory.mktemp("local")
    counts = runner.run_sweep(_sweep(tmp, "local.db"), progress=False, report=False)
    assert counts["done"] == 4
    return _dump(tmp / "local.db")


# ---------------------------------------------------------------------------------------------
# Without a cluster

def test_ray_missing_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "grid.toml").write_text(GRID)
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` raises ImportError
    assert cli.main(["sweep", str(tmp_path / "grid.toml"), "--ray"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("fastfat: error:") and "pip install 'fastfat[ray]'" in err
    assert not (tmp_path / "results.db").exists()


def test_ray_keys_and_flags(tmp_path):
    assert _sweep(tmp_path).ray is None
    s = _sweep(tmp_path, text=GRID.replace("threads = 1", 'threads = 1\nray = "auto"\nray_cpus = 2\n'
                                                       'ray_retries = 5\nshared_dir = "shared"'))
    assert (s.ray.address, s.ray.cpus, s.ray.gpus, s.ray.retries) == ("auto", 2, None, 5)
    assert s.runs_dir == str(tmp_path / "shared")
    assert _sweep(tmp_path, ray_flags={"ray": "local", "ray_gpus": 0.5}).ray.gpus == 0.5
    assert _sweep(tmp_path, text=GRID.replace("threads = 1", "ray = true"), ray_flags={"ray": "off"}).ray is None
    for bad, says in (("ray_cpus = 0", "ray_cpus"), ("ray_gpus = 1.5", "ray_gpus"), ("ray_retries = -1", "ray_retries"),
                      ("shared_dir = 1", "shared_dir")):
        with pytest.raises(UserError, match=says):
            _sweep(tmp_path, text=GRID.replace("threads = 1", "ray = true\n" + bad))
    with pytest.raises(UserError, match="ray must be"):
        _sweep(tmp_path, text=GRID.replace("threads = 1", "ray = 3"))


def test_unreachable_cluster_is_one_line(tmp_path, capsys):
    _need_ray()
    import socket
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "grid.toml").write_text(GRID)
    assert cli.main(["sweep", str(tmp_path / "grid.toml"), "--ray", f"127.0.0.1:{port}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach a Ray cluster" in err
    assert not (tmp_path / "results.db").exists()


# ---------------------------------------------------------------------------------------------
# On the cluster

def test_ray_sweep_equals_local_sweep(cluster, local_db, tmp_path):
    sweep = _sweep(tmp_path, shared_dir=str(tmp_path / "shared"), ray_flags={"ray": "auto"})
    counts = ray_run(sweep)
    assert (counts["ran"], counts["done"], counts["failed"], counts["resumed"]) == (4, 4, 0, 0)
    assert _dump(tmp_path / "ray.db") == local_db
    for p in sweep.points:   # the runs went to the shared folder, not beside the database
        assert os.path.exists(tmp_path / "shared" / p.key / "checkpoint.pt")
    assert not os.path.exists(tmp_path / "ray_runs")
    # Run again: everything is done, nothing is submitted.
    again = ray_run(sweep)
    assert (again["skipped"], again["ran"]) == (4, 0)


def ray_run(sweep, **kw):
    from fastfat.sweep.ray_runner import run_sweep_ray
    return run_sweep_ray(sweep, progress=False, report=False, **kw)


def test_point_failing_for_its_own_reason_is_recorded_not_retried(cluster, tmp_path, capsys):
    # lr 1e12 diverges in the first epoch: a UserError inside the task, returned as its outcome.
    text = GRID.replace('method = ["madry", "fat-madry"]', 'method = ["madry"]').replace(
        "seed = [0, 1]", "seed = [0]").replace("epochs = 4", "epochs = 1\nlr = 1e12")
    counts = ray_run(_sweep(tmp_path, text=text, ray_flags={"ray": "auto"}))
    assert (counts["failed"], counts["done"]) == (1, 0)
    con = sqlite3.connect(tmp_path / "ray.db")
    (status, error, owner), = con.execute("SELECT status, error, owner FROM points").fetchall()
    assert status == "failed" and owner is None
    assert error.startswith("training diverged: the loss is nan in epoch 1")   # the point's own line
    out = capsys.readouterr()
    assert "retries remaining" not in out.out + out.err   # Ray never saw the task fail


def test_fused_groups_run_as_one_task_each(cluster, tmp_path, capsys):
    """fuse = 2: the grid's four points as two fused groups, one Ray task each (a group's members
    share each epoch's wall time), give the local fused sweep's database bit for bit (the same
    shapes and code path, one thread); a member that diverges is recorded failed alone."""
    local = _sweep(tmp_path, "local.db", fuse=2)
    assert runner.run_sweep(local, progress=False, report=False)["done"] == 4
    counts = ray_run(_sweep(tmp_path, ray_flags={"ray": "auto"}, fuse=2))
    assert (counts["ran"], counts["done"], counts["failed"]) == (4, 4, 0)
    assert _dump(tmp_path / "ray.db") == _dump(tmp_path / "local.db")
    con = sqlite3.connect(tmp_path / "ray.db")
    secs = con.execute("SELECT p.method, e.epoch, COUNT(DISTINCT e.seconds) FROM epochs e JOIN points p "
                       "ON p.key = e.point GROUP BY p.method, e.epoch").fetchall()
    con.close()
    assert len(secs) == 8 and all(n == 1 for *_, n in secs)
    text = GRID.replace('method = ["madry", "fat-madry"]', 'method = ["fat-madry"]').replace(
        "seed = [0, 1]", "seed = [0]").replace("lam = [0.5]", "lam = [0.5, 1e38]").replace("epochs = 4", "epochs = 1")
    counts = ray_run(_sweep(tmp_path, db="div.db", text=text, ray_flags={"ray": "auto"}, fuse=2))
    assert (counts["done"], counts["failed"]) == (1, 1)
    con = sqlite3.connect(tmp_path / "div.db")
    rows = dict(con.execute("SELECT lam, status || ' ' || COALESCE(error, '') FROM points").fetchall())
    con.close()
    assert rows[0.5] == "done " and rows[1e38].startswith("failed training diverged")


def _driver(path, address):
    return subprocess.Popen([sys.executable, "-m", "fastfat", "sweep", str(path), "--ray", address,
                             "--no-progress", "--no-report"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_epochs(runs_dir, proc, n_runs: int, lo: int, hi: int, timeout: float = 600.0,
                     before: dict | None = None) -> dict:
    """Wait until n_runs run folders each hold between lo and hi epochs at once (and more than
    they held in `before`). The timeout is generous: a driver's tasks start cold workers of
    their own (the cluster's warm ones belong to this process's job), which on a loaded 2-core
    machine took over 90 s; a driver that ends fails the wait at once."""
    t0, before = time.monotonic(), before or {}
    while time.monotonic() - t0 < timeout:
        seen = _epochs_on_disk(runs_dir)
        if sum(lo <= e <= hi and e > before.get(k, 0) for k, e in seen.items()) >= n_runs:
            return seen
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the driver ended first: {proc.communicate()}")
        time.sleep(0.02)
    pytest.fail(f"never saw {n_runs} runs with {lo}..{hi} epochs; saw {_epochs_on_disk(runs_dir)}")


def _wait_for_claim(db, proc, timeout: float = 600.0) -> None:
    """Wait until the driver process proc holds a running point in the database."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        con = sqlite3.connect(db)
        try:
            owners = [o for o, in con.execute("SELECT owner FROM points WHERE status='running'")]
        finally:
            con.close()
        if any(o and o.endswith(f":{proc.pid}") for o in owners):
            return
        if proc.poll() is not None:
            pytest.fail(f"the driver ended first: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail("the driver never claimed a point")


def test_interrupted_or_killed_driver_resumes(cluster, local_db, tmp_path, capsys):
    sweep = _sweep(tmp_path, ray_flags={"ray": "auto"})
    runs = tmp_path / "ray_runs"
    (tmp_path / "grid.toml").write_text(GRID.replace('"results.db"', '"ray.db"'))
    # SIGTERM (handled as Ctrl-C is) mid-run: the driver stops its tasks and gives its points back.
    # A real driver process, so that a Ray failure in it shows here as its output, not as the end
    # of the test process (Ray 2.60 aborted the driver when force-cancelling; ray_runner.py).
    proc = _driver(tmp_path / "grid.toml", cluster.address)
    _wait_for_epochs(runs, proc, 1, 1, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert err.strip().splitlines()[-1].startswith("fastfat: terminated; the running points were given back"), err
    assert "Traceback" not in err, err
    con = sqlite3.connect(tmp_path / "ray.db")
    assert con.execute("SELECT COUNT(*) FROM points WHERE status='running' OR owner IS NOT NULL").fetchone()[0] == 0
    con.close()

    # kill -9 of a driver process: its claims stay, owned by a dead process; no half-written results.
    # The epochs on disk are counted once this driver holds a point (the first driver's tasks
    # ended before it gave its points back), so new epochs are this driver's task's.
    proc = _driver(tmp_path / "grid.toml", cluster.address)
    _wait_for_claim(tmp_path / "ray.db", proc)
    _wait_for_epochs(runs, proc, 1, 1, 3, before=_epochs_on_disk(runs))   # this driver's task trains
    proc.kill()
    proc.wait()
    con = sqlite3.connect(tmp_path / "ray.db")
    rows = con.execute("SELECT key, status, owner FROM points").fetchall()
    with_results = {k for k, in con.execute("SELECT DISTINCT point FROM results")}
    con.close()
    assert {k for k, s, _ in rows if s == "done"} == with_results
    assert any(s == "running" and o.endswith(f":{proc.pid}") for _, s, o in rows)

    # The same sweep again takes the dead driver's points over and resumes them.
    counts = ray_run(sweep)
    assert counts["done"] == 4 and counts["resumed"] >= 1
    assert "took over" in capsys.readouterr().out
    assert _dump(tmp_path / "ray.db") == local_db


def test_tasks_ask_for_a_gpu_on_a_cluster_with_gpus(cluster, tmp_path, capsys):
    # Two logical GPUs on a third node (this machine has none; the points train on the CPU).
    node = cluster.add_node(num_cpus=2, num_gpus=2)
    try:
        text = GRID.replace('method = ["madry", "fat-madry"]', 'method = ["madry"]').replace(
            "epochs = 4", "epochs = 1")
        counts = ray_run(_sweep(tmp_path, text=text, ray_flags={"ray": "auto"}))
        assert counts["done"] == 2
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
        assert len(lines) == 2 and all(" gpu " in line for line in lines)
        # ray_gpus = 0 on the same cluster: CPU tasks
        counts = ray_run(_sweep(tmp_path, db="cpu.db", text=text, ray_flags={"ray": "auto", "ray_gpus": 0}))
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
        assert counts["done"] == 2 and len(lines) == 2 and not any(" gpu " in line for line in lines)
    finally:
        cluster.remove_node(node)


def test_worker_node_dies_mid_run(cluster, local_db, tmp_path):
    # Last in the module: it takes the worker node away.
    import threading
    sweep = _sweep(tmp_path, ray_flags={"ray": "auto"})
    seen = {}

    def kill_node_mid_run():
        # both nodes' tasks have checkpoints and are far from done: the worker's task is mid-run
        seen.update(_wait_for_epochs(tmp_path / "ray_runs", None, 2, 1, 2))
        cluster.remove_node(cluster.worker)

    t = threading.Thread(target=kill_node_mid_run, daemon=True)
    t.start()
    counts = ray_run(sweep)
    t.join(timeout=5)
    assert seen, "the node was not removed mid-run"
    assert (counts["done"], counts["failed"]) == (4, 0)
    assert counts["resumed"] >= 1      # the dead node's point went on from its checkpoint
    assert _dump(tmp_path / "ray.db") == local_db
