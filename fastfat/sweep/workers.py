"""Several local sweep processes on one machine (`workers = N`, `fastfat sweep --workers N`): the
command's own process and N - 1 spawned ones run the same sweep loop, sharing the grid through the
database's claims, as N terminals running the same command would; the report is written once, at
the end, by the first process.

Why: a small model trains fastest with one torch thread (the demo CNN: 2.1 s per epoch with one
thread, far slower with two when the cores are shared), so one process leaves the other cores of
a CPU idle. Two processes of one thread each train two points at once on a 2-core machine.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading

from .grid import Sweep
from .progress import GridProgress

COUNT_KEYS = ("ran", "failed", "reclaimed")
GRACE_S = 5.0   # after Ctrl-C, how long a worker may take to give its point back by itself


def _child(sweep: Sweep, out, run_mark: int) -> None:
    """One spawned worker: the sweep loop without bars, report or reclaim, in the command's run
    (run_mark: a point a sibling failed in this command is not retried here); its counts go to
    `out` (None if it ends otherwise, so the parent never waits for counts that will not come;
    ("disk full", line) if a full disk stopped it: the parent says it once)."""
    from ..errors import DiskFull
    from .runner import run_sweep
    signal.signal(signal.SIGINT, signal.default_int_handler)   # ignored while it started: see _start
    _follow_parent()
    try:
        out.put(run_sweep(sweep, progress=False, report=False, run_mark=run_mark))
    except DiskFull as e:
        out.put(("disk full", str(e)))
    except BaseException as e:
        out.put(None)
        if not isinstance(e, KeyboardInterrupt):   # Ctrl-C, SIGTERM: its point was given back
            raise


def _follow_parent() -> None:
    """End this worker as SIGTERM would (its point given back) once the command's process is gone,
    kill -9 included: a watcher thread waits on the parent's sentinel."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch():
        parent.join()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def _start(children) -> None:
    """Start the workers with SIGINT ignored (a spawned process inherits that across exec): a
    Ctrl-C while one is still importing would print its traceback; each takes Ctrl-C again once
    it runs the sweep (_child), and the parent tells a late one by SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        for c in children:
            c.start()
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for c in children:
            c.start()
    finally:
        signal.signal(signal.SIGINT, old)


def _gather(children, out) -> list[dict | None]:
    """Each worker's counts (None for one that was interrupted or died, kill -9 included)."""
    got = []
    while len(got) < len(children):
        try:
            got.append(out.get(timeout=1.0))
        except queue.Empty:
            if not any(c.is_alive() for c in children) and out.empty():
                got += [None] * (len(children) - len(got))
    return got


def _done(db: str, keys: list[str]) -> int:
    """How many of keys are done in the database (0 if it does not exist yet)."""
    from .store import Store
    if not os.path.exists(db):
        return 0
    with Store(db, readonly=True) as store:
        return store.counts(keys=keys)["done"]


def run_with_workers(sweep: Sweep, workers: int, *, progress: bool = True, report: bool = True,
                     reclaim: bool = False) -> dict:
    """Run the sweep in this process and workers - 1 spawned ones; returns run_sweep's counts,
    summed over the processes, with "skipped" (done before it started), "done", "busy" (points
    running in processes outside this command) and "failed_elsewhere" read from the database, and
    "ran_by_process".
    Ctrl-C reaches every process of the terminal; on SIGTERM or any error here the workers get
    SIGTERM, so each gives its running point back."""
    from .runner import Terminated, run_sweep, write_report
    from .store import Store

    keys = [p.key for p in sweep.points]
    before = _done(sweep.db, keys)   # the processes' own "skipped" counts include each other's work
    # One run for the whole command: a point one process fails is not "failed in an earlier run"
    # to its siblings, so no other process retries it (each would otherwise, once).
    with Store(sweep.db, lease=sweep.lease) as store:
        run_mark = store.begin_run()
    ctx = mp.get_context("spawn")   # no fork of a process holding torch threads and SQLite handles
    out = ctx.Queue()
    # Only this process reclaims; the workers start at once (schema creation is race-free).
    children = [ctx.Process(target=_child, args=(sweep, out, run_mark)) for _ in range(workers - 1)]
    _start(children)
    # One overall bar for the whole command: it counts the grid's points done in the database by
    # every process, and stays open until the last worker has returned (100% when the grid is done).
    overall = GridProgress(sweep.db, keys, enabled=progress)
    try:
        counts = run_sweep(sweep, progress=progress, report=False, reclaim=reclaim, overall=overall,
                           run_mark=run_mark)
        got = _gather(children, out)
    except BaseException as e:
        # Ctrl-C in the terminal reached the workers too: give them a moment to hand their points
        # back on their own (a second signal could interrupt that); else (SIGTERM to this process
        # alone, an error here) tell them now.
        ctrl_c = isinstance(e, KeyboardInterrupt) and not isinstance(e, Terminated)
        for c in children:
            c.join(GRACE_S if ctrl_c else 0)
            if c.is_alive():
                os.kill(c.pid, signal.SIGTERM)
        raise
    finally:
        for c in children:
            c.join()
        overall.close()
    full = [t[1] for t in got if isinstance(t, tuple)]
    if full:   # a worker's point found the disk full (this process's own would have raised above)
        from ..errors import DiskFull
        raise DiskFull(full[0])
    counts["ran_by_process"] = [counts["ran"]] + [t["ran"] if t else 0 for t in got]
    for theirs in filter(None, got):
        for k in COUNT_KEYS:
            counts[k] += theirs[k]
    with Store(sweep.db, readonly=True) as store:
        now = store.counts(keys=keys)
    # A failure in a sibling is this command's own; only the rest failed in other commands.
    counts["done"], counts["busy"], counts["skipped"] = now["done"], now["running"], before
    counts["failed_elsewhere"] = max(0, now["failed"] - counts["failed"])
    if report:
        write_report(sweep, counts, progress, None, None)
    return counts
