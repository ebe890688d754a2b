"""Sweeps with several workers and signals at any moment, in real processes (issue 25, items 1, 2
and 4): each defect's reproduction, which failed before its fix."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

FASTFAT = os.path.join(os.path.dirname(sys.executable), "fastfat")   # the console script


def _grid(tmp_path, lams: str, seeds: str, epochs: int) -> str:
    path = tmp_path / "g.toml"
    path.write_text(f"""db = "s.db"
threads = 1
workers = 2
[grid]
method = ["fat-madry"]
lam = {lams}
seed = {seeds}
eps_train = [0.1]
model = ["cnn"]
dataset = ["digits"]
[train]
preset = "demo"
width = 4
epochs = {epochs}
train_limit = 256
test_limit = 50
[eval]
attacks = ["fgsm"]
eps_test = [0.2]
""")
    return str(path)


def _start(argv, cwd, **kw) -> subprocess.Popen:
    # SIG_DFL in the child: a shell's background job inherits SIGINT ignored
    return subprocess.Popen([FASTFAT, *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _rows(db) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT key, status, owner FROM points ORDER BY rowid").fetchall()
    finally:
        con.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_failing_point_runs_once_per_command_with_two_workers(tmp_path):
    """The diverging point comes first: the command's process fails it before its sibling has
    started, and the sibling took it for a failure of an earlier run and trained it again."""
    path = _grid(tmp_path, "[1e12, 0.5]", "[0]", 2)
    p = _start(["sweep", path, "--no-progress", "--no-report"], tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1, (out, err)
    assert out.count("FAILED") == 1, out
    assert ", 1 failed;" in out and "failed in another process" not in out, out


def test_kill_9_of_the_command_ends_its_worker(tmp_path):
    path = _grid(tmp_path, "[0.5]", "[0, 1, 2, 3, 4, 5]", 30)
    p = _start(["sweep", path, "--no-progress", "--no-report"], tmp_path)
    db = tmp_path / "s.db"
    try:
        deadline = time.time() + 120
        while True:   # both processes hold a point
            assert p.poll() is None and time.time() < deadline, p.communicate()
            running = [r for r in (_rows(db) if db.exists() else []) if r[1] == "running"]
            if len(running) == 2:
                break
            time.sleep(0.2)
        worker = next(int(owner.rpartition(":")[2]) for _, _, owner in running
                      if int(owner.rpartition(":")[2]) != p.pid)
        p.kill()
        p.wait()
        deadline = time.time() + 20
        while _alive(worker):
            assert time.time() < deadline, "the worker outlived its command by 20 s"
            time.sleep(0.2)
        rows = _rows(db)
        assert not any(s == "running" and o and o.endswith(f":{worker}") for _, s, o in rows), rows
        assert sum(s == "done" for _, s, _ in rows) == 0, rows   # it took over no point to finish it
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.mark.parametrize("delay", [0.15, 0.3, 0.6, 1.0, 1.6])
def test_ctrl_c_while_the_command_starts(tmp_path, delay):
    """SIGINT during the imports: a traceback, numpy's "cannot load module more than once" or a
    RecursionError before; now exit 130 and the one line."""
    p = _start(["train", "--preset", "demo", "--epochs", "1", "--out", str(tmp_path / "o"),
                "--no-progress"], tmp_path)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip().splitlines() == ["fastfat: interrupted"], (p.returncode, err)


def test_ctrl_c_while_the_workers_start(tmp_path):
    """Ctrl-C to the terminal's process group while the spawned worker still imports: its
    spawn_main traceback was printed beside `fastfat: interrupted`."""
    path = _grid(tmp_path, "[0.5]", "[0, 1, 2]", 30)
    p = _start(["sweep", path, "--no-progress", "--no-report"], tmp_path, start_new_session=True)
    try:
        assert p.stdout.readline().startswith("sweep: 3 points into")
        time.sleep(1.0)   # the worker is importing torch
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and err.strip().splitlines() == ["fastfat: interrupted"], (p.returncode, err)
    assert not any(s == "running" for _, s, _ in _rows(tmp_path / "s.db"))
