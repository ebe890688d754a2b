"""Running a sweep on a Ray cluster: each unit of work is one Ray task that trains and evaluates
in run directories on a path every node reaches and returns per-point outcomes; this process (the
driver) is the only writer of the results database and stores them in the rows a local sweep
writes (SQLite must not be shared over a network file system).

A unit is one grid point, or with `fuse` a fused group of points (plan_units): one Ray task
trains the group as one model (groups.train_group) and returns one Outcome per member, so a
member that diverges is recorded failed alone; the driver claims a unit's points at once.

Faults: a task whose worker or node dies is re-run by Ray (ray_retries times) and resumes from
its last checkpoint; a point failing for its own reasons (UserError: divergence, bad data; or a
bug) is caught inside the task and recorded failed, never retried by Ray. The driver claims every
point it submits (owner host:pid, renewed each lease/5 while it waits), and gives them back on
Ctrl-C or SIGTERM; a killed driver's claims are taken over by the next run (its pid is gone).
Ray is imported only here (and in ray_connect.py, which reaches it) and only when a sweep runs
on it.
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

from ..errors import DiskFull, UserError
from ..files import check_writable_dir
from .progress import GridProgress
from .grid import GridPoint, Sweep
from .run_keys import RaySettings
from .points import claim_points, evaluate_point, say, summary_line
from .ray_connect import connect, import_ray
from .runner import (Terminated, as_disk_full, failed_source, open_and_add, sigterm_as_interrupt,
                     stopped_by_full_disk, train_and_evaluate, unsettled_source, write_report)

NODES_EVERY_S = 5.0   # how often the driver recounts the cluster's free slots (nodes join and leave)


# ---------------------------------------------------------------------------------------------
# The task (runs on a worker)

@dataclass
class Outcome:
    """What a task returns for one point: its per-epoch log rows and evaluate()'s records, or the
    error it failed with. start_epoch: epochs its checkpoint held when the task began (> 0 for a
    resumed point); where: the node (and GPUs) it ran on."""
    key: str
    log: list[dict] = field(default_factory=list)
    records: list[dict] | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    start_epoch: int = 0
    seconds: float = 0.0
    error: str | None = None
    trace: str | None = None
    where: str = ""
    disk_full: bool = False   # the error is a full disk: the driver stops the sweep


def plan_units(points: list[GridPoint], fuse: int | str = 1, done=()) -> list[list[GridPoint]]:
    """The sweep's units of work, in run order: its fused groups (groups.plan over the whole
    grid, less the points whose keys are in done); fuse=1: one point each."""
    from .groups import plan
    return plan(points, fuse, done)


def run_unit(points: list[GridPoint], run_dirs: list[str], threads: int, cwd: str | None = None) -> list[Outcome]:
    """The Ray task: train and evaluate a unit's points in their run directories; one Outcome per
    point. threads: torch intra-op threads (the task's CPUs). cwd: the driver's working directory,
    so relative paths in the configs (data_root) mean what they mean in a local sweep."""
    import torch
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    torch.set_num_threads(threads)
    if len(points) == 1:
        return [_run_point(points[0], run_dirs[0])]
    return _run_group(points, run_dirs)


def _where() -> str:
    import ray
    gpus = ray.get_gpu_ids()
    return ray.util.get_node_ip_address() + (f" gpu {','.join(map(str, gpus))}" if gpus else "")


def _run_point(p: GridPoint, run_dir: str) -> Outcome:
    """One point in this worker; its own failures come back as an Outcome with an error (raised,
    they would look to Ray like a task to retry)."""
    t0, where = time.perf_counter(), _where()
    try:
        log, records, t = train_and_evaluate(p, run_dir)
    except Exception as e:
        full = as_disk_full(e)
        if full is not None or isinstance(e, UserError):
            return Outcome(p.key, error=str(full or e), seconds=time.perf_counter() - t0, where=where,
                           disk_full=full is not None)
        # a bug or a resource error: recorded with its trace, as a local sweep does
        return Outcome(p.key, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(),
                       seconds=time.perf_counter() - t0, where=where)
    return Outcome(p.key, log, records, t["train_seconds"], t["eval_seconds"], t["start_epoch"],
                   time.perf_counter() - t0, where=where)


def _run_group(points: list[GridPoint], run_dirs: list[str]) -> list[Outcome]:
    """A fused group in this worker: trained at once, then each member evaluated; a member's own
    failure (divergence, its evaluation) is its Outcome's error, the others' go on; an error of
    the group as a whole (a checkpoint that does not fit) is every member's."""
    from .groups import train_group
    t0, where = time.perf_counter(), _where()
    try:
        runs, starts = train_group(points, run_dirs)
    except Exception as e:
        full = as_disk_full(e)
        err = str(full or e) if full or isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        trace = None if full or isinstance(e, UserError) else traceback.format_exc()
        return [Outcome(p.key, error=err, trace=trace, seconds=time.perf_counter() - t0, where=where,
                        disk_full=full is not None) for p in points]
    out = []
    for p, run_dir, run, start in zip(points, run_dirs, runs, starts):
        o = Outcome(p.key, run.log, start_epoch=start, where=where,
                    train_seconds=sum(r["seconds"] for r in run.log))   # the group's training time
        if run.error is not None:
            o.error = run.error
        else:
            t1 = time.perf_counter()
            try:
                o.records = evaluate_point(p, run_dir)
            except UserError as e:
                o.error = str(e)
            except Exception as e:
                o.error, o.trace = f"{type(e).__name__}: {e}", traceback.format_exc()
            o.eval_seconds = time.perf_counter() - t1
        o.seconds = time.perf_counter() - t0
        out.append(o)
    return out


# ---------------------------------------------------------------------------------------------
# The driver

def run_sweep_ray(sweep: Sweep, *, progress: bool = True, report: bool = True, report_dir: str | None = None,
                  report_options: dict | None = None, reclaim: bool = False) -> dict:
    """Run every point not done yet as Ray tasks (sweep.ray says where); counts as
    runner.run_sweep returns them, plus "resumed" (points that went on from a checkpoint).
    A process already connected to Ray (ray.init) sweeps on that connection; sweep.ray None
    means a Ray instance started here."""
    ray = import_ray()
    if sweep.ray is None:
        sweep = dataclasses.replace(sweep, ray=RaySettings("local"))
    check_writable_dir(sweep.runs_dir, "shared_dir")
    with sigterm_as_interrupt() as sigterm:
        connected = connect(ray, sweep.ray.address)
        # ray.init installs its C++ failure handler for SIGTERM (a stack dump, then exit 15),
        # which would end the driver with its points left 'running': ours again, after it.
        sigterm["rearm"]()
        try:
            counts = _drive(ray, sweep, progress, reclaim)
        except KeyboardInterrupt as e:
            if sigterm["received"] and not isinstance(e, Terminated):
                raise Terminated() from None
            raise
        finally:
            if connected:
                ray.shutdown()
    if report:
        write_report(sweep, counts, progress, report_dir, report_options)
    return counts


def _task_resources(ray, sweep: Sweep) -> tuple[int, float]:
    """(CPUs, GPUs) one task asks for: ray_cpus (else threads, else 1); ray_gpus, else one GPU
    on a cluster that has GPUs."""
    s = sweep.ray
    cpus = s.cpus or sweep.threads or 1
    gpus = s.gpus if s.gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0)
    return cpus, gpus


def _slots(ray, cpus: int, gpus: float) -> tuple[int, int]:
    """(tasks the live nodes can run at once, live nodes)."""
    total, alive = 0, 0
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        alive += 1
        r = n.get("Resources", {})
        k = int(r.get("CPU", 0) // cpus)
        if gpus:
            k = min(k, int(r.get("GPU", 0) // gpus))
        total += k
    return total, alive


def _collect(ray, ref, unit: list[GridPoint], retries: int) -> list[Outcome]:
    """A finished task's outcomes; a task that did not return (its worker or node died more than
    `retries` times, or it raised outside its own handling) fails each of its points."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None) or e
        err, trace = f"{type(cause).__name__}: {cause}", str(e)
    except ray.exceptions.RayError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        err, trace = f"{type(e).__name__} after {retries} retries: {first}", None
    return [Outcome(p.key, error=err, trace=trace) for p in unit]


def _store(store, p: GridPoint, o: Outcome, counts: dict, progress: bool, n: int, total: int) -> None:
    """Write a point's outcome: its epochs and results (done), or its error (failed)."""
    from .claims import ClaimLost
    try:
        if o.error is None:
            for row in o.log:
                store.record_epoch(p.key, row)
            store.finish(p.key, o.records, train_seconds=o.train_seconds, eval_seconds=o.eval_seconds)
        else:
            store.fail(p.key, o.error)
    except ClaimLost:
        counts["busy"] += 1
        say(f"sweep: {p.label()} was taken over by another process (this driver was silent past "
            f"its lease); leaving it there", progress)
        return
    if o.error is not None:
        counts["failed"] += 1
        say(f"FAILED {p.label()}: {o.error}" + (f"\n{o.trace}" if o.trace else ""), progress)
        return
    counts["ran"] += 1
    counts["resumed"] += o.start_epoch > 0
    resumed = f", resumed after epoch {o.start_epoch}" if o.start_epoch else ""
    say(f"[{n}/{total}] " + summary_line(p, o.records, o.seconds)[:-1] + f" on {o.where}{resumed})",
        progress)


SOURCE_WAIT_S = 1.0   # how long the driver sleeps when every unit waits for a source point


def _next_ready(store, queue: deque) -> list[GridPoint] | None:
    """Take the first unit of queue whose points' sources (GridPoint.depends_on: the trades run an
    FRL point starts from) are settled, done or failed, so no task starts from a missing or
    partial checkpoint; None while every unit waits. Run order puts sources first."""
    for i, unit in enumerate(queue):
        if unsettled_source(store, unit, ("pending", "running")) is None:
            del queue[i]
            return unit
    return None


def _drive(ray, sweep: Sweep, progress: bool, reclaim: bool) -> dict:
    from .store import Store

    cpus, gpus = _task_resources(ray, sweep)
    threads, retries = sweep.threads or cpus, sweep.ray.retries
    task = ray.remote(run_unit).options(num_cpus=cpus, num_gpus=gpus, max_retries=retries,
                                        retry_exceptions=False)
    slots, nodes = _slots(ray, cpus, gpus)
    if nodes > 1 and sweep.shared_dir is None:
        say(f"sweep: the runs go to {sweep.runs_dir} (beside the database): every node of the "
            f"cluster must reach this path; set shared_dir otherwise", progress)
    if slots == 0:
        say(f"sweep: no node of the Ray cluster has {cpus} CPU(s)" + (f" and {gpus:g} GPU(s)" if gpus else "")
            + " free for a grid point; the points wait until one joins", progress)
    with Store(sweep.db, lease=sweep.lease) as store:
        have, reclaimed = open_and_add(store, sweep, progress, reclaim)
        todo = [p for p in sweep.points if have[p.key].status != "done"]
        counts = {"points": len(sweep.points), "skipped": len(sweep.points) - len(todo), "ran": 0,
                  "failed": 0, "busy": 0, "failed_elsewhere": 0, "reclaimed": reclaimed, "resumed": 0}
        if counts["skipped"]:
            say(f"sweep: {counts['skipped']} of {len(sweep.points)} points already done, skipping them",
                progress)
        bar = GridProgress(sweep.db, [p.key for p in sweep.points], enabled=progress)
        labels = {p.key: p.label() for p in sweep.points}
        done = [p.key for p in sweep.points if have[p.key].status == "done"]
        queue, in_flight = deque(plan_units(sweep.points, sweep.fuse, done)), {}   # ObjectRef -> claimed points
        finished, counted_at, renewed_at = 0, time.monotonic(), time.monotonic()
        try:
            while queue or in_flight:
                now = time.monotonic()
                if now - counted_at > NODES_EVERY_S:
                    slots, counted_at = _slots(ray, cpus, gpus)[0], now
                # As many units in flight as the cluster has slots (at least one, which an
                # autoscaler sees as demand): 'running' on the bar means running.
                while queue and len(in_flight) < max(1, slots):
                    planned = _next_ready(store, queue)
                    if planned is None:
                        break
                    unit = claim_points(store, planned, counts, progress)   # a group: all or none
                    for p in [q for q in unit if failed_source(store, q, labels)]:
                        finished += 1   # not started from a checkpoint that is not there
                        _store(store, p, Outcome(p.key, error=failed_source(store, p, labels)), counts,
                               progress, finished, len(todo))
                        unit.remove(p)
                    if unit:
                        runs = [os.path.join(sweep.runs_dir, p.key) for p in unit]
                        in_flight[task.remote(unit, runs, threads, os.getcwd())] = unit
                if not in_flight:
                    time.sleep(SOURCE_WAIT_S)   # every unit left waits for a source running elsewhere
                    continue
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    unit = in_flight.pop(ref)
                    outcomes = _collect(ray, ref, unit, retries)
                    full = next((o.error for o in outcomes if o.disk_full), None)
                    if full is not None:   # no point's fault: stop, every point pending
                        raise stopped_by_full_disk(store, sweep, DiskFull(full))
                    for p, o in zip(unit, outcomes):
                        finished += 1
                        _store(store, p, o, counts, progress, finished, len(todo))
                    bar.update()   # the bar counts the database's done points: re-read it now
                if time.monotonic() - renewed_at > sweep.lease / 5:
                    renewed_at = time.monotonic()
                    _renew(ray, store, in_flight, counts, progress)
        except BaseException:
            _give_back(ray, store, sweep, in_flight)
            raise
        finally:
            bar.close()
        counts["done"] = store.counts(keys=[p.key for p in sweep.points])["done"]
    return counts


CANCEL_WAIT_S = 30.0   # how long an interrupted driver waits for its cancelled tasks to end


def _give_back(ray, store, sweep: Sweep, in_flight: dict) -> None:
    """Ctrl-C, SIGTERM or an error in the driver: stop the tasks in flight, wait (CANCEL_WAIT_S at
    most) until they have ended, then give back every point of the grid this process holds.

    Not force=True: Ray 2.60's driver aborts the whole process ("Tried to complete task that was
    not pending", task_manager.cc) when a force-killed task's reply is already on its way; a plain
    cancel raises KeyboardInterrupt in the task at its next bytecode, which takes a moment: a
    point given back at once could be claimed by the next driver while the cancelled task still
    writes its run folder. Every point held, not only those in flight: the signal may come
    between a claim and its task's submission, or between a task's return and its stored result
    (Store.release leaves done and failed points as they are)."""
    for ref in in_flight:
        try:
            ray.cancel(ref)
        except Exception:
            pass
    try:
        if in_flight:
            ray.wait(list(in_flight), num_returns=len(in_flight), timeout=CANCEL_WAIT_S)
    except Exception:   # a lost connection: the points go back all the same
        pass
    finally:             # also after a second Ctrl-C
        store.release([p.key for p in sweep.points])


def _renew(ray, store, in_flight: dict, counts: dict, progress: bool) -> None:
    """Renew the claims of every point in flight; a unit with a point another process took over
    (this driver was silent past its lease) is cancelled and its other points given back."""
    lost = set(store.renew([p.key for unit in in_flight.values() for p in unit]))
    for ref, unit in list(in_flight.items()):
        if lost.isdisjoint(p.key for p in unit):
            continue
        ray.cancel(ref, force=True)
        del in_flight[ref]
        for p in unit:
            if p.key in lost:
                counts["busy"] += 1
                say(f"sweep: {p.label()} was taken over by another process (this driver was "
                    f"silent past its lease); leaving it there", progress)
            else:
                store.release(p.key)
