"""Running a sweep: every point not done yet is claimed in the store, trained (resuming from its
checkpoint), evaluated and stored; then the report is written.

Each point trains in its own run directory (<shared_dir>/<key>/, by default <db stem>_runs/<key>/
next to the database) with a checkpoint per epoch (train_and_evaluate, which a Ray task runs as
well: ray_runner.py), and its results go into the store in one transaction with status "done".
Running the same command again resumes the interrupted point from its last checkpoint and skips
finished ones; training and evaluation are deterministic on the CPU for a given thread count, so
the results equal an uninterrupted sweep's. Ctrl-C and SIGTERM give the running point back;
while a point runs, a heartbeat keeps its claim alive, so processes sharing the database (also
on other hosts) can tell a running point from an orphaned one. With `fuse`, compatible points
train as fused groups (groups.py), each member still its own row; a point alone runs as here.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import threading
import time
import traceback
from contextlib import contextmanager

from ..config_dict import to_dict
from ..errors import DiskFull, UserError
from ..files import DISK_FULL
from ..runtime import progress_bar
from .progress import GridProgress
from .grid import GridPoint, Sweep, default_report_dir
from . import points
from .points import claim_point, minutes as _minutes, say as _say, summary_line


# ---------------------------------------------------------------------------------------------
# Running

def train_and_evaluate(p: GridPoint, run_dir: str, *, progress: bool = False, position: int = 2,
                       on_epoch=None, on_trained=None) -> tuple[list[dict], list[dict], dict]:
    """Train one point in run_dir (resuming from its checkpoint there) and evaluate its final
    weights. Writes only run_dir (atomic checkpoints, as train() does), never a database, so a
    local sweep and a Ray task on another machine run the same code.

    Returns (log, records, timings): every epoch's log row (train()'s rows, including epochs an
    earlier, interrupted run trained), evaluate()'s records, and {"train_seconds" (sum of the
    epochs' seconds), "eval_seconds", "start_epoch" (epochs the checkpoint already held)}.
    on_epoch(row) runs after each new epoch's checkpoint is on disk; on_trained(log) once training
    is over, before the evaluation. Raises UserError for a point that fails for its own reasons
    (divergence, a checkpoint that does not fit its config, bad data).
    """
    from ..train import train

    new = []

    def epoch_done(row):
        new.append(row)
        if on_epoch is not None:
            on_epoch(row)

    _, log = train(p.train, run_dir, resume=True, progress=progress, on_epoch=epoch_done,
                   position=position)
    if on_trained is not None:
        on_trained(log)
    t0 = time.perf_counter()
    records = points.evaluate_point(p, run_dir)
    timings = {"train_seconds": sum(r["seconds"] for r in log), "eval_seconds": time.perf_counter() - t0,
               "start_epoch": len(log) - len(new)}
    return log, records, timings


def run_point(store, p: GridPoint, run_dir: str, *, progress: bool, overall=None) -> list[dict]:
    """Train (resuming from run_dir's checkpoint) and evaluate one point; store its results."""
    done0 = store.point(p.key).epochs_done
    bar = progress_bar(p.train.epochs, p.label(), progress, position=1, unit="epoch",
                       initial=min(done0, p.train.epochs))

    def on_epoch(row):
        store.record_epoch(p.key, row)  # after the checkpoint is on disk: progress survives a kill
        if bar is not None:
            bar.update(1)
        if overall is not None:
            overall.update(1)

    def on_trained(log):
        # A kill between a checkpoint and its on_epoch leaves that epoch unrecorded; the resumed
        # run does not repeat it, so take every epoch from the checkpoint's own log.
        for row in log:
            store.record_epoch(p.key, row)
        if bar is not None:
            bar.set_postfix_str("evaluating")

    try:
        _, records, timings = train_and_evaluate(p, run_dir, progress=progress, position=2,
                                                 on_epoch=on_epoch, on_trained=on_trained)
    finally:
        if bar is not None:
            bar.close()
    store.finish(p.key, records, train_seconds=timings["train_seconds"], eval_seconds=timings["eval_seconds"])
    if overall is not None:
        overall.update(1)   # the point is done: the bar re-reads the database
    return records


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a sweep gives its running point back before it exits."""


@contextmanager
def sigterm_as_interrupt():
    """While a sweep runs, SIGTERM raises Terminated (the default would end the process at once
    and leave its point 'running'); the previous handler comes back after. Yields a dict whose
    "received" turns True on SIGTERM (Ray's C++ wait re-raises any exception of a signal handler
    as a plain KeyboardInterrupt), and whose "rearm" installs the handler again (ray.init puts its
    own C++ handler in its place)."""
    state = {"received": False, "rearm": lambda: None}
    if threading.current_thread() is not threading.main_thread():
        yield state   # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        state["received"] = True
        raise Terminated()

    state["rearm"] = lambda: signal.signal(signal.SIGTERM, handler)
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, old)


def run_sweep(sweep: Sweep, *, progress: bool = True, report: bool = True, report_dir: str | None = None,
              report_options: dict | None = None, reclaim: bool = False, overall=None,
              run_mark: int | None = None) -> dict:
    """Run every point not done yet; returns counts {"points", "done", "ran", "skipped", "failed",
    "busy", "failed_elsewhere", "reclaimed"}. reclaim: first take back running points that no live
    process on this host holds (stale, or claimed from another host), and say which. overall: a
    GridProgress the caller owns and closes (workers.py: it outlives this process's own loop);
    by default this run draws and closes its own. run_mark: the run this process joins
    (Store.begin_run of the command's first process; workers.py), else a run of its own."""
    with sigterm_as_interrupt():
        if sweep.threads is None:
            return _run_sweep(sweep, progress, report, report_dir, report_options, reclaim, overall, run_mark)
        # On a shared small CPU, torch's default (one thread per core) in several processes at
        # once oversubscribes the cores; measured here: 2.1 s per epoch with 1 thread, 39 s with 2.
        import torch
        before = torch.get_num_threads()
        torch.set_num_threads(sweep.threads)
        try:
            return _run_sweep(sweep, progress, report, report_dir, report_options, reclaim, overall, run_mark)
        finally:
            torch.set_num_threads(before)


def open_and_add(store, sweep: Sweep, progress: bool, reclaim: bool, run_mark=None) -> tuple[dict, int]:
    """Add the grid's points to the store, say what else the database holds, reclaim if asked;
    returns the store's Points of this grid by key and how many were reclaimed."""
    from .grid import setting_of

    db_dir = os.path.dirname(os.path.abspath(sweep.db))
    store.begin_run(run_mark)
    for p in sweep.points:
        store.add_point(p.to_point(os.path.relpath(os.path.join(sweep.runs_dir, p.key), db_dir)))
        store.sync_eval_config(p.key, to_dict(p.eval))
    keys = {p.key for p in sweep.points}
    mine = {setting_of(to_dict(p.train)) for p in sweep.points}
    others = [q for q in store.points(with_results=False) if q.key not in keys]
    apart = sum(setting_of(q.train_config) not in mine for q in others)
    if apart:
        _say(f"sweep: {sweep.db} also holds {apart} point(s) of another grid with other [train] "
             f"settings; the report keeps them in tables of their own", progress)
    elif others:
        _say(f"sweep: {sweep.db} also holds {len(others)} point(s) of another grid with the same "
             f"[train] settings; the report shows them together", progress)
    taken = []
    if reclaim:
        labels = {p.key: p.label() for p in sweep.points}
        taken = store.reclaim([p.key for p in sweep.points])
        for key, owner, silent in taken:
            _say(f"sweep: reclaimed {labels[key]} from {owner} (silent for {_minutes(silent)})", progress)
        if not taken:
            _say("sweep: --reclaim: no running point to take back", progress)
    return {q.key: q for q in store.points(keys=keys, with_results=False)}, len(taken)


def done_tag(store, sweep: Sweep) -> str:
    """'[17/36] ': the grid's points done in the database, by any process (several may share the
    grid, so a count of this process's own would repeat across their lines)."""
    return f"[{store.counts(keys=[p.key for p in sweep.points])['done']}/{len(sweep.points)}] "


SOURCE_POLL_S = 2.0   # how often a unit waiting for its source point looks at the database


def unsettled_source(store, unit: list[GridPoint], unsettled=("running",)) -> str | None:
    """The key of a point that one of unit's points starts from (GridPoint.depends_on: an FRL
    point's trained source) whose status is one of `unsettled` (by default: another process is
    still training it); None when there is none. The local loop and the Ray driver both ask."""
    for p in unit:
        if p.depends_on is not None and store.point(p.depends_on).status in unsettled:
            return p.depends_on
    return None


def as_disk_full(e: BaseException) -> DiskFull | None:
    """e as a DiskFull when a write found no room: fastfat's own (files.disk_full_error), an
    OSError ENOSPC or EDQUOT, SQLite's 'database or disk is full'; None otherwise."""
    if isinstance(e, DiskFull):
        return e
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return DiskFull(f"disk full: cannot write {e.filename or 'a file'} ({e.strerror})")
    if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
        return DiskFull(f"disk full: {e}")
    return None


def stopped_by_full_disk(store, sweep: Sweep, e: DiskFull) -> DiskFull:
    """A full disk is no point's fault: every grid point this process holds is given back
    (pending, resumable) and the sweep stops at once, instead of failing each point after it.
    Returns the one error line to raise (the CLI's exit 2)."""
    keys = [p.key for p in sweep.points]
    with contextlib.suppress(Exception):   # the database may sit on the full disk too
        store.release(keys)
    try:
        left = len(keys) - store.counts(keys=keys)["done"]
    except Exception:
        left = len(keys)
    return DiskFull(f"{e}; the sweep stopped, {left} points left pending: free space and run the "
                    f"same command again")


def failed_source(store, p: GridPoint, labels: dict[str, str]) -> str | None:
    """The error for a point whose source point (depends_on) failed, so that it is not started
    from a checkpoint that is not there; None when there is none or it did not fail. labels: the
    grid's point labels by key."""
    if p.depends_on is None or store.point(p.depends_on).status != "failed":
        return None
    return (f"it starts from {labels.get(p.depends_on, p.depends_on)}, which failed (see its error); "
            f"run the same command again to retry both")


def _when_sources_settle(store, units: list[list[GridPoint]], progress: bool):
    """The units in run order, except that a unit whose source point another process is still
    training (several processes share the grid: `workers`, or a second terminal) goes to the end
    and is yielded once that point is done or failed. Run order puts every source before its
    dependants, so a process alone never waits."""
    waiting = []
    for unit in units:
        if unsettled_source(store, unit) is None:
            yield unit
        else:
            waiting.append(unit)
    said = set()
    while waiting:
        still = []
        for unit in waiting:
            source = unsettled_source(store, unit)
            if source is None:
                yield unit
                continue
            still.append(unit)
            if source not in said:
                said.add(source)
                _say(f"sweep: waiting for {source} (another process is training it) before "
                     f"{unit[0].label()}, which starts from its checkpoint", progress)
        waiting = still
        if waiting:
            time.sleep(SOURCE_POLL_S)


def _run_sweep(sweep: Sweep, progress, report, report_dir, report_options, reclaim, overall=None,
               run_mark=None) -> dict:
    from .claims import ClaimLost
    from .groups import plan, run_group
    from .store import Store

    with Store(sweep.db, lease=sweep.lease) as store:
        have, reclaimed = open_and_add(store, sweep, progress, reclaim, run_mark)
        todo = [p for p in sweep.points if have[p.key].status != "done"]
        counts = {"points": len(sweep.points), "skipped": len(sweep.points) - len(todo),
                  "ran": 0, "failed": 0, "busy": 0, "failed_elsewhere": 0, "reclaimed": reclaimed}
        if counts["skipped"]:
            _say(f"sweep: {counts['skipped']} of {len(sweep.points)} points already done, skipping them",
                 progress)
        own_bar = overall is None
        if own_bar:
            overall = GridProgress(sweep.db, [p.key for p in sweep.points], enabled=progress)

        def tally(p, records, seconds):   # a fused group's member stored
            _say(done_tag(store, sweep) + summary_line(p, records, seconds), progress)

        labels = {p.key: p.label() for p in sweep.points}
        try:
            done = [p.key for p in sweep.points if have[p.key].status == "done"]
            units = plan(sweep.points, sweep.fuse, done)   # fuse = 1: one point per unit, as todo
            for unit in _when_sources_settle(store, units, progress):
                if len(unit) > 1:
                    run_group(store, unit, sweep, counts, progress=progress, overall=overall, tally=tally)
                    continue
                p = unit[0]
                if not claim_point(store, p, counts, progress):
                    continue
                why = failed_source(store, p, labels)
                if why is not None:
                    store.fail(p.key, why)
                    counts["failed"] += 1
                    _say(f"FAILED {p.label()}: {why}", progress)
                    continue
                t0 = time.perf_counter()
                run_dir = os.path.join(sweep.runs_dir, p.key)
                try:
                    with store.keep_alive(p.key):
                        records = run_point(store, p, run_dir, progress=progress, overall=overall)
                except KeyboardInterrupt:
                    store.release(p.key)
                    raise
                except ClaimLost:
                    counts["busy"] += 1
                    _say(f"sweep: {p.label()} was taken over by another process (this process was "
                         f"silent past its lease); leaving it there", progress)
                    continue
                except DiskFull:
                    raise
                except UserError as e:
                    store.fail(p.key, str(e))
                    counts["failed"] += 1
                    _say(f"FAILED {p.label()}: {e}", progress)
                    continue
                except Exception as e:  # a bug or a resource error: keep going, keep the trace
                    if as_disk_full(e) is not None:
                        raise as_disk_full(e) from None
                    store.fail(p.key, f"{type(e).__name__}: {e}")
                    counts["failed"] += 1
                    _say(f"FAILED {p.label()}: {type(e).__name__}: {e}\n{traceback.format_exc()}", progress)
                    continue
                counts["ran"] += 1
                _say(done_tag(store, sweep) + summary_line(p, records, time.perf_counter() - t0), progress)
        except KeyboardInterrupt:
            # also a point claimed a moment before the signal, outside run_point's own handler
            store.release([p.key for p in sweep.points])
            raise
        except DiskFull as e:
            raise stopped_by_full_disk(store, sweep, e) from None
        finally:
            if own_bar:
                overall.close()
        counts["done"] = store.counts(keys=[p.key for p in sweep.points])["done"]
    if report:
        write_report(sweep, counts, progress, report_dir, report_options)
    return counts


def write_report(sweep: Sweep, counts: dict, progress: bool, report_dir: str | None,
                 report_options: dict | None) -> None:
    """The report of a sweep that has run (counts as run_sweep returns them; 'report' is set to
    its directory when written)."""
    from ..report import report as report_mod
    out = report_dir or sweep.report or default_report_dir(sweep.db)
    if counts["done"]:
        written = report_mod.write_report(sweep.db, out, **(report_options or sweep.report_options))
        counts["report"] = out
        _say(f"report: {len(written)} files in {out}", progress)
    else:
        _say("report: no finished points yet, nothing to report", progress)
