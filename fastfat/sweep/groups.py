"""Fused groups in a sweep (`fuse = K | "auto"`): which grid points train together (plan), and a
group's run in this process (run_group): its not-done points claimed at once, trained as one
fused model (fastfat.fused.train_fused), then each member evaluated and stored on its own row.

A member is a grid point like any other in the database: its own status, epochs (recorded as its
checkpoint lands), results and error. Groups are planned over the whole grid in grid order
(plan_groups), so a rerun after a kill forms the same groups; members train in lockstep, so the
not-done members of a group then stand at the same epoch (or at the last, killed during the
evaluations) and train again in the uninterrupted run's shapes, which is what fp32 bit-equality
needs (train_fused's docstring); a member whose checkpoint is ahead rides along as a ghost.
"""
from __future__ import annotations

import os
import time
import traceback

from ..errors import DiskFull, UserError
from ..runtime import progress_bar
from . import points as point_runs   # not `points`, the name of the lists of points here
from .grid import GridPoint, Sweep
from .points import claim_points, say as _say


def plan(points: list[GridPoint], fuse: int | str, done=()) -> list[list[GridPoint]]:
    """The sweep's units of work in run order: fused groups of compatible points (fastfat.fused.
    plan_groups over all of `points`, so the groups do not depend on what is done), less the
    points whose keys are in `done`; groups left empty are dropped. fuse=1: one point each."""
    from ..fused.plan import plan_groups
    done = set(done)
    groups = plan_groups([p.train for p in points], fuse) if fuse != 1 else [[i] for i in range(len(points))]
    units = [[points[i] for i in g if points[i].key not in done] for g in groups]
    return [u for u in units if u]


def train_group(points: list[GridPoint], run_dirs: list[str], *, progress: bool = False, position: int = 2,
                on_epoch=None, on_failure=None) -> tuple[list, list[int]]:
    """Train a group's points as one fused model in their run directories, each resuming from its
    checkpoint there (train_fused(resume=True): writes only run_dirs, never a database, so a
    local sweep and a Ray task run the same code). Returns (runs, start_epochs): one
    fastfat.fused.MemberRun per point (log: every epoch's row, also those an earlier run trained;
    error: None or why the member failed) and the epochs each checkpoint held before.
    on_epoch(k, row) / on_failure(k, error) as train_fused calls them. UserError for the group
    as a whole (a checkpoint that does not fit its config), before any training."""
    from ..fused.group import train_fused

    new = [0] * len(points)

    def epoch_done(k, row):
        new[k] += 1
        if on_epoch is not None:
            on_epoch(k, row)

    runs = train_fused([p.train for p in points], run_dirs, resume=True, progress=progress,
                       on_epoch=epoch_done, on_failure=on_failure, position=position)
    return runs, [len(r.log) - n for r, n in zip(runs, new)]


class _GroupLedger:
    """A claimed group's bookkeeping in the database: epochs recorded as checkpoints land,
    members failed (with their reason) or finished, counts and the bars kept up to date.
    `settled` holds the keys no longer ours to release or fail."""

    def __init__(self, store, points: list[GridPoint], counts: dict, progress: bool, overall, bar):
        self.store, self.points, self.counts = store, points, counts
        self.progress, self.overall, self.bar = progress, overall, bar
        self.keys = [p.key for p in points]
        self.settled: set[str] = set()

    def advance(self):   # the overall bar counts the database's done points: re-read it
        if self.overall is not None:
            self.overall.update()

    def on_epoch(self, k, row):
        self.store.record_epoch(self.keys[k], row)   # after the member's checkpoint is on disk
        if self.bar is not None:
            self.bar.update(1)
        self.advance()

    def failed(self, key, error, trace=None):
        self.store.fail(key, error)
        self.settled.add(key)
        self.counts["failed"] += 1
        self.advance()
        label = next(p.label() for p in self.points if p.key == key)
        _say(f"FAILED {label}: {error}" + (f"\n{trace}" if trace else ""), self.progress)

    def on_failure(self, k, error):
        if self.keys[k] not in self.settled:
            self.failed(self.keys[k], error)

    def fail_unsettled(self, error, trace=None):
        """Every member not yet settled fails with error (the trace printed once)."""
        for key in self.keys:
            if key not in self.settled:
                self.failed(key, error, trace)
                trace = None

    def finish(self, p: GridPoint, records, train_seconds: float, eval_seconds: float):
        self.store.finish(p.key, records, train_seconds=train_seconds, eval_seconds=eval_seconds)
        self.settled.add(p.key)
        self.counts["ran"] += 1
        self.advance()


def run_group(store, points: list[GridPoint], sweep: Sweep, counts: dict, *, progress: bool, overall=None,
              tally=None) -> None:
    """Claim the group's points at once (Store.claim_group: all or none), train them fused and
    evaluate and store each surviving member (point_runs.evaluate_point, store.finish); a member
    that diverges is stored failed with its reason while the others go on. Updates counts as
    the single-point loop does. Ctrl-C / SIGTERM give every member still running back; a member
    taken over by another process (this one was silent past its lease) ends the group's run
    here and gives the other members back. tally(p, records, seconds) after each stored member."""
    from .claims import ClaimLost

    have = {p.key: store.point(p.key).epochs_done for p in points}
    epochs = points[0].train.epochs
    points = claim_points(store, points, counts, progress)
    if not points:
        return
    keys = [p.key for p in points]
    run_dirs = [os.path.join(sweep.runs_dir, k) for k in keys]
    bar = progress_bar(epochs * len(points), f"{len(points)} fused: {points[0].label()}, ...",
                       progress, position=1, unit="epoch", initial=sum(min(have[k], epochs) for k in keys))
    ledger = _GroupLedger(store, points, counts, progress, overall, bar)
    t0 = time.perf_counter()
    try:
        with store.keep_alive(keys):
            try:
                runs, _ = train_group(points, run_dirs, progress=progress, position=2,
                                      on_epoch=ledger.on_epoch, on_failure=ledger.on_failure)
            finally:
                if bar is not None:
                    bar.close()
            _store_members(ledger, run_dirs, runs, time.perf_counter() - t0, tally)
    except KeyboardInterrupt:
        store.release(keys)
        raise
    except ClaimLost as e:
        counts["busy"] += 1
        lost = next((p.label() for p in points if p.key == e.args[0]), e.args[0])
        _say(f"sweep: {lost} was taken over by another process (this process was silent past its "
             f"lease); leaving it there and giving its fused group's other points back", progress)
        store.release(keys)
    except DiskFull:         # not the group's fault: the sweep stops (runner.stopped_by_full_disk)
        store.release(keys)
        raise
    except UserError as e:   # the group as a whole, before any training: each member fails with it
        ledger.fail_unsettled(str(e))
    except Exception as e:   # a bug or a resource error: keep going, keep the trace
        ledger.fail_unsettled(f"{type(e).__name__}: {e}", traceback.format_exc())


def _store_members(ledger: _GroupLedger, run_dirs: list[str], runs: list, seconds: float, tally) -> None:
    """Evaluate each member that trained to the end and store its results (a member whose
    evaluation fails is stored failed); tally(p, records, seconds so far) after each."""
    for p, run_dir, run in zip(ledger.points, run_dirs, runs):
        if run.error is not None:
            continue
        # A kill between a checkpoint and its on_epoch leaves that epoch unrecorded; the
        # resumed group does not repeat it, so take every epoch from the member's own log.
        for row in run.log:
            ledger.store.record_epoch(p.key, row)
        t1 = time.perf_counter()
        try:
            records = point_runs.evaluate_point(p, run_dir)
        except UserError as e:
            ledger.failed(p.key, str(e))
            continue
        except Exception as e:   # a bug or a resource error: this member only, with the trace
            ledger.failed(p.key, f"{type(e).__name__}: {e}", traceback.format_exc())
            continue
        t2 = time.perf_counter()
        # train_seconds: the group's training time (a member's rows carry the group's wall time)
        ledger.finish(p, records, sum(r["seconds"] for r in run.log), t2 - t1)
        seconds += t2 - t1
        if tally is not None:
            tally(p, records, seconds)
