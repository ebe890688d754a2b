"""Local worker processes (`workers = N`): the points are shared between the processes through the
database's claims, each point runs once, and the results equal a single-process sweep's."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from fastfat import cli
from fastfat.sweep import grid, runner
from fastfat.sweep.workers import run_with_workers

from test_sweep import TINY, _doc, _dump


def _sweep(d: str, **changes) -> grid.Sweep:
    doc = _doc(grid__eps_train=["4/255", "8/255", "12/255"], train__epochs=3, train__train_limit=1200, **changes)
    return grid.build_sweep(doc, d)


def test_two_workers_share_the_grid_and_equal_one_process(tmp_path):
    one = _sweep(str(tmp_path / "one"))
    counts = runner.run_sweep(one, progress=False, report=False)
    assert counts["ran"] == len(one.points) == 6

    two = _sweep(str(tmp_path / "two"))
    counts = run_with_workers(two, 2, progress=False, report=True)
    assert counts["done"] == 6 and counts["failed"] == 0 and counts["busy"] == 0
    assert counts["skipped"] == 0 and counts["ran"] == 6
    # every point ran exactly once, and both processes took some (each point is a few seconds
    # of work, the worker starts in about as much)
    assert sum(counts["ran_by_process"]) == 6 and len(counts["ran_by_process"]) == 2
    assert min(counts["ran_by_process"]) >= 1, counts
    # one thread per process: the same numbers as one process running the grid alone
    assert _dump(two.db) == _dump(one.db)
    assert os.path.exists(os.path.join(str(tmp_path / "two"), "results_report", "report.md"))
    again = run_with_workers(two, 2, progress=False, report=False)   # nothing left to do
    assert (again["skipped"], again["ran"], again["done"]) == (6, 0, 6)


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "workers must be an integer >= 1, got 0"),
    (["--workers", "2", "--ray"], "workers runs local processes"),
])
def test_bad_workers_fail_before_anything_is_written(tmp_path, capsys, flags, message):
    path = tmp_path / "s.toml"
    path.write_text(TINY)
    assert cli.main(["sweep", str(path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastfat: error: ") and message in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["s.toml"]


def test_workers_flag_and_file_key_reach_the_runner(tmp_path, monkeypatch):
    import fastfat.sweep.workers as workers_mod
    seen = []
    monkeypatch.setattr(workers_mod, "run_with_workers",
                        lambda sweep, n, **kw: seen.append(n) or dict(points=0, done=0, ran=0, skipped=0,
                                                                      failed=0, busy=0, failed_elsewhere=0))
    path = tmp_path / "s.toml"
    path.write_text("workers = 3\n" + TINY)
    assert cli.main(["sweep", str(path), "--no-progress"]) == 0
    assert cli.main(["sweep", str(path), "--no-progress", "--workers", "2"]) == 0
    assert seen == [3, 2]


class _Store:
    """A store whose points' statuses follow a script: status(key) pops the next value."""
    def __init__(self, script):
        self.script = script

    def point(self, key):
        seq = self.script[key]
        return SimpleNamespace(status=seq.pop(0) if len(seq) > 1 else seq[0])


def test_a_point_waits_while_its_source_runs_in_another_process(monkeypatch):
    """An FRL point starts from its source point's checkpoint (depends_on): while another process
    still trains the source, the point goes to the end of the queue and waits; a point alone
    never waits."""
    monkeypatch.setattr(runner, "SOURCE_POLL_S", 0.0)
    a, b, c = (SimpleNamespace(key=k, depends_on=d, label=lambda k=k: k)
               for k, d in (("a", None), ("frl", "src"), ("c", None)))
    store = _Store({"src": ["running", "running", "running", "done"]})
    order = [u[0].key for u in runner._when_sources_settle(store, [[a], [b], [c]], progress=False)]
    assert order == ["a", "c", "frl"]
    assert store.script["src"] == ["done"]   # it polled until the source was done
    store = _Store({"src": ["done"]})
    assert [u[0].key for u in runner._when_sources_settle(store, [[a], [b], [c]], False)] == ["a", "frl", "c"]


def test_ray_driver_holds_a_unit_until_its_source_is_settled():
    """The Ray driver runs units side by side: an FRL unit whose source (depends_on) is pending or
    running stays in the queue while later units go; it goes once the source is done or failed."""
    from collections import deque

    from fastfat.sweep.ray_runner import _next_ready
    a, frl, c = ([SimpleNamespace(key=k, depends_on=d)] for k, d in (("a", None), ("frl", "src"), ("c", None)))
    store = _Store({"src": ["running"]})
    queue = deque([frl, a, c])
    assert _next_ready(store, queue) is a and _next_ready(store, queue) is c
    assert _next_ready(store, queue) is None and list(queue) == [frl]
    for settled in ("done", "failed"):
        assert _next_ready(_Store({"src": [settled]}), deque([frl])) is frl
    assert _next_ready(_Store({"src": ["pending"]}), deque([frl])) is None


def test_overall_bar_counts_every_workers_points_and_ends_at_100(tmp_path, capfd):
    """The overall bar of a 2-worker sweep counts the grid's points done in the database by both
    processes (each trains only some of them), never goes back, and closes at 6/6 = 100%."""
    import re
    two = _sweep(str(tmp_path / "two"))
    counts = run_with_workers(two, 2, progress=True, report=False)
    assert counts["done"] == 6 and min(counts["ran_by_process"]) >= 1, counts
    err = capfd.readouterr().err
    renders = [r for r in re.split(r"[\r\n]", err) if r.startswith("sweep:")]
    seen = [int(m.group(1)) for r in renders if (m := re.search(r"\| (\d+)/6 points", r))]
    assert seen and seen == sorted(seen), renders           # monotone: one count, the database's
    assert renders[-1].startswith("sweep: 100%") and "6/6 points" in renders[-1], renders[-1]
    assert "eta 00:00" in renders[-1], renders[-1]
    # the other process's points are in the count: this process alone ran fewer than 6
    assert counts["ran_by_process"][0] < 6


def test_eta_from_points_measured_so_far():
    from fastfat.sweep.progress import eta_seconds
    assert eta_seconds(3, 3, 10, 50.0) is None          # nothing measured since the start
    assert eta_seconds(5, 3, 10, 60.0) == 150.0         # 2 points in 60 s, 5 left
    assert eta_seconds(10, 0, 10, 1.0) == 0.0
