"""Running a sweep: every point not done yet is claimed in the store, trained (resuming from its
checkpoint), evaluated and stored; then the report is written.

Each point trains in its own run directory next to the database (<db stem>_runs/<key>/) with a
checkpoint per epoch, and its results go into the store in one transaction with status "done".
Running the same command again resumes the interrupted point from its last checkpoint and skips
finished ones; training and evaluation are deterministic on the CPU for a given thread count, so
the results equal an uninterrupted sweep's.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

from ..config import to_dict
from ..errors import UserError
from ..runtime import progress_bar
from .grid import GridPoint, Sweep, default_report_dir
from .labels import lam_suffix


# ---------------------------------------------------------------------------------------------
# Running

def _say(line: str, progress: bool) -> None:
    """Print a line above the bars (or plainly without them)."""
    if progress:
        from tqdm import tqdm
        tqdm.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def summary_line(p: GridPoint, records: list[dict], seconds: float) -> str:
    """One line per finished point: PGD-20 (or the first attack) at the first eps_test."""
    from ..evaluate import attack_title, eps_label
    rob = [r for r in records if r["attack"] != "clean"]
    first = min(r["eps"] for r in rob)
    pick = next((r for r in rob if r["attack"] == "pgd20" and r["eps"] == first),
                next(r for r in rob if r["eps"] == first))
    clean = next((r for r in records if r["attack"] == "clean"), None)
    t = p.train
    lam = lam_suffix(t.method, t.lam, " lam ")
    s = (f"{t.method} {t.model} eps_train {eps_label(t.eps_train)}{lam} seed {t.seed}: "
         f"{attack_title(pick['attack'])} @ {eps_label(pick['eps'])} rob.acc {100 * pick['avg_acc']:.2f}% "
         f"var {100 * pick['vcra']:.2f}e-2")
    if clean is not None:
        s += f", clean {100 * clean['avg_acc']:.2f}%"
    return s + f" ({seconds:.0f} s)"


def run_point(store, p: GridPoint, run_dir: str, *, progress: bool, overall=None) -> list[dict]:
    """Train (resuming from run_dir's checkpoint) and evaluate one point; store its results."""
    from ..data import dataset_info
    from ..evaluate import evaluate, make_test_loader
    from ..runtime import resolve_device
    from ..train import load_model, train

    done0 = store.point(p.key).epochs_done
    bar = progress_bar(p.train.epochs, p.label(), progress, position=1, unit="epoch",
                       initial=min(done0, p.train.epochs))

    def on_epoch(row):
        store.record_epoch(p.key, row)  # after the checkpoint is on disk: progress survives a kill
        if bar is not None:
            bar.update(1)
        if overall is not None:
            overall.update(1)

    try:
        _, log = train(p.train, run_dir, resume=True, progress=progress, on_epoch=on_epoch, position=2)
        # A kill between a checkpoint and its on_epoch leaves that epoch unrecorded; the resumed
        # run does not repeat it, so take every epoch from the checkpoint's own log.
        for row in log:
            store.record_epoch(p.key, row)
        # train() reloads a finished run's final checkpoint, so a point killed after training
        # and before its results were stored is evaluated on the same weights.
        device = resolve_device(p.train.device if p.eval.device == "auto" else p.eval.device)
        model, _ = load_model(os.path.join(run_dir, "checkpoint.pt"), device)
        if bar is not None:
            bar.set_postfix_str("evaluating")
        t0 = time.perf_counter()
        records = evaluate(model, make_test_loader(p.train, p.eval, device), p.eval,
                           dataset_info(p.train.dataset).num_classes, device=device)  # amp: p.eval.amp
        eval_s = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
    store.finish(p.key, records, train_seconds=sum(r["seconds"] for r in log), eval_seconds=eval_s)
    if overall is not None:
        overall.update(1)  # the evaluation's share of the ETA
    return records


def run_sweep(sweep: Sweep, *, progress: bool = True, report: bool = True, report_dir: str | None = None,
              report_options: dict | None = None) -> dict:
    """Run every point not done yet; returns counts {"done", "ran", "skipped", "failed", "busy"}."""
    if sweep.threads is None:
        return _run_sweep(sweep, progress, report, report_dir, report_options)
    # On a shared small CPU, torch's default (one thread per core) in several processes at once
    # oversubscribes the cores; measured here: 2.1 s per epoch with 1 thread, 39 s with 2.
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(sweep.threads)
    try:
        return _run_sweep(sweep, progress, report, report_dir, report_options)
    finally:
        torch.set_num_threads(before)


def _run_sweep(sweep: Sweep, progress, report, report_dir, report_options) -> dict:
    from .store import Store

    db_dir = os.path.dirname(os.path.abspath(sweep.db))
    with Store(sweep.db) as store:
        for p in sweep.points:
            store.add_point(p.to_point(os.path.relpath(os.path.join(sweep.runs_dir, p.key), db_dir)))
            store.sync_eval_config(p.key, to_dict(p.eval))
        have = {q.key: q for q in store.points(keys=[p.key for p in sweep.points], with_results=False)}
        todo = [p for p in sweep.points if have[p.key].status != "done"]
        counts = {"points": len(sweep.points), "skipped": len(sweep.points) - len(todo),
                  "ran": 0, "failed": 0, "busy": 0}
        if counts["skipped"]:
            _say(f"sweep: {counts['skipped']} of {len(sweep.points)} points already done, skipping them",
                 progress)
        # Overall ETA in epochs (+1 per point for its evaluation).
        total = sum(p.train.epochs - min(have[p.key].epochs_done, p.train.epochs) + 1 for p in todo)
        overall = progress_bar(total, "sweep", progress, position=0, unit="step", leave=True)
        try:
            for i, p in enumerate(todo):
                if overall is not None:
                    overall.set_postfix_str(f"point {i + 1}/{len(todo)}")
                claim = store.claim(p.key)
                if claim != "claimed":  # finished or taken by another process meanwhile
                    counts["busy" if claim == "busy" else "skipped"] += 1
                    if overall is not None:
                        overall.update(p.train.epochs - min(have[p.key].epochs_done, p.train.epochs) + 1)
                    continue
                t0 = time.perf_counter()
                run_dir = os.path.join(sweep.runs_dir, p.key)
                try:
                    records = run_point(store, p, run_dir, progress=progress, overall=overall)
                except KeyboardInterrupt:
                    store.release(p.key)
                    raise
                except UserError as e:
                    store.fail(p.key, str(e))
                    counts["failed"] += 1
                    _say(f"FAILED {p.label()}: {e}", progress)
                    continue
                except Exception as e:  # a bug or a resource error: keep going, keep the trace
                    store.fail(p.key, f"{type(e).__name__}: {e}")
                    counts["failed"] += 1
                    _say(f"FAILED {p.label()}: {type(e).__name__}: {e}\n{traceback.format_exc()}", progress)
                    continue
                counts["ran"] += 1
                _say(f"[{i + 1}/{len(todo)}] " + summary_line(p, records, time.perf_counter() - t0), progress)
        finally:
            if overall is not None:
                overall.close()
        counts["done"] = store.counts(keys=[p.key for p in sweep.points])["done"]

    if report:
        from . import report as report_mod
        out = report_dir or sweep.report or default_report_dir(sweep.db)
        if counts["done"]:
            written = report_mod.write_report(sweep.db, out, **(report_options or {}))
            counts["report"] = out
            _say(f"report: {len(written)} files in {out}", progress)
        else:
            _say("report: no finished points yet, nothing to report", progress)
    return counts
