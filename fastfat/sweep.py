"""`fastfat sweep`: train and evaluate every point of a grid, into one results database.

A sweep file (TOML) names the grid (the cartesian product of method, eps_train, lam, model,
dataset and seed lists), the training fields shared by every point ([train]) and the evaluation
([eval]); every key is also a flag. The whole grid is validated before anything is written.

Each point trains in its own run directory next to the database (<db stem>_runs/<key>/) with a
checkpoint per epoch, and its results go into the store in one transaction with status "done".
Running the same command again resumes the interrupted point from its last checkpoint and skips
finished ones; training and evaluation are deterministic on the CPU, so the results equal an
uninterrupted sweep's. At the end the report (fastfat.report) is written.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass, fields
from importlib import resources

from .config import (EvalConfig, TrainConfig, add_dataclass_flags, make_eval_config,
                     make_train_config, to_dict)
from .errors import UserError

# The grid's axes, in the order points are run (the last varies fastest).
AXES = ("dataset", "model", "method", "seed", "eps_train", "lam")
TOP_KEYS = ("db", "report", "threads", "grid", "train", "eval")
TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))
EVAL_FIELDS = tuple(f.name for f in fields(EvalConfig))
# Eval fields whose names a training field already uses get an --eval- prefix on the command line.
EVAL_PREFIXED = tuple(n for n in EVAL_FIELDS if n in TRAIN_FIELDS)


# ---------------------------------------------------------------------------------------------
# Reading and validating a sweep

@dataclass
class GridPoint:
    """One point: its validated configs, the key that names it and its run directory."""
    key: str
    train: TrainConfig
    eval: EvalConfig

    def label(self) -> str:
        t = self.train
        lam = f" lam {t.lam:g}" if t.has_lambda else ""
        return f"{t.method} {t.model} {t.dataset} eps_train {t.eps_train:.4g}{lam} seed {t.seed}"


@dataclass
class Sweep:
    """A validated sweep: where its database and report go, and its points in run order."""
    db: str
    report: str | None
    points: list[GridPoint]
    threads: int | None = None   # torch intra-op threads (None: torch's default)

    @property
    def runs_dir(self) -> str:
        return runs_dir(self.db)


def runs_dir(db: str) -> str:
    stem = os.path.splitext(os.path.basename(db))[0]
    return os.path.join(os.path.dirname(os.path.abspath(db)), f"{stem}_runs")


def default_report_dir(db: str) -> str:
    stem = os.path.splitext(os.path.basename(db))[0]
    return os.path.join(os.path.dirname(os.path.abspath(db)), f"{stem}_report")


def packaged_grids() -> list[str]:
    """Names of the grids shipped in fastfat/grids/ (usable as --grid NAME)."""
    return sorted(p.name[:-5] for p in resources.files("fastfat.grids").iterdir()
                  if p.name.endswith(".toml"))


def read_sweep_file(path: str | None, grid: str | None) -> tuple[dict, str]:
    """The parsed TOML and the directory its relative paths are relative to.

    A packaged grid's paths are relative to the working directory (the package is read-only).
    """
    if path and grid:
        raise UserError("give a sweep file or --grid NAME, not both")
    if grid:
        names = packaged_grids()
        if grid not in names:
            raise UserError(f"unknown packaged grid {grid!r}; choose one of {', '.join(names)}")
        text = resources.files("fastfat.grids").joinpath(f"{grid}.toml").read_text("utf-8")
        where, base = f"grid {grid}", os.getcwd()
    elif path:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except OSError as e:
            raise UserError(f"cannot read sweep file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a UTF-8 text file") from None
        where, base = path, os.path.dirname(os.path.abspath(path))
    else:
        return {}, os.getcwd()
    try:
        return tomllib.loads(text), base
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: not valid TOML ({e})") from None


def _check_table(doc: dict, name: str) -> dict:
    t = doc.get(name, {})
    if not isinstance(t, dict):
        raise UserError(f"{name} must be a table ([{name}]), got {type(t).__name__}")
    return dict(t)


def _scalar_list(axis: str, value) -> list:
    """A grid axis as a list of scalars (a single scalar is a one-element list)."""
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise UserError(f"grid.{axis} is empty; give at least one value")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise UserError(f"grid.{axis}: expected a list of numbers or strings, got {v!r}")
    return value


def build_sweep(doc: dict, base: str, *, grid_flags: dict | None = None, train_flags: dict | None = None,
                eval_flags: dict | None = None, db: str | None = None, report: str | None = None,
                threads=None) -> Sweep:
    """Validate a sweep file's content merged with flags (flags win) into a Sweep.

    Raises UserError naming the key or grid point at fault; nothing is written.
    """
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"unknown key(s) in the sweep file: {', '.join(unknown)}; "
                        f"valid: {', '.join(TOP_KEYS)}")
    grid = _check_table(doc, "grid")
    train = _check_table(doc, "train")
    evals = _check_table(doc, "eval")
    bad = sorted(set(grid) - set(AXES))
    if bad:
        raise UserError(f"unknown grid axis {', '.join(bad)}; the grid's axes are {', '.join(AXES)} "
                        f"(other training fields go in [train])")
    bad = sorted(set(train) - set(TRAIN_FIELDS))
    if bad:
        raise UserError(f"unknown [train] key(s): {', '.join(bad)}; valid: {', '.join(TRAIN_FIELDS)}")
    bad = sorted(set(evals) - set(EVAL_FIELDS))
    if bad:
        raise UserError(f"unknown [eval] key(s): {', '.join(bad)}; valid: {', '.join(EVAL_FIELDS)}")
    grid.update(grid_flags or {})
    train.update(train_flags or {})
    evals.update(eval_flags or {})
    both = sorted(set(grid) & set(train))
    if both:
        raise UserError(f"{', '.join(both)} given both as a grid axis and in [train]; keep one")
    if not grid:
        raise UserError("the grid is empty: give [grid] lists (axes: " + ", ".join(AXES) + ")")

    for key in ("db", "report"):
        if key in doc and not isinstance(doc[key], str):
            raise UserError(f"{key} must be a string (a path), got {doc[key]!r}")
    if db is None:
        if "db" not in doc:
            raise UserError("no results database: set db = \"results.db\" in the sweep file or pass --db")
        db = os.path.join(base, doc["db"])
    if report is None and "report" in doc:
        report = os.path.join(base, doc["report"])
    threads = doc.get("threads") if threads is None else threads
    if threads is not None:
        try:
            ok = not isinstance(threads, (bool, float)) and int(threads) >= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"threads must be an integer >= 1, got {threads!r}")
        threads = int(threads)
    if os.path.isdir(db):
        raise UserError(f"db {db} is a directory; give a file name such as results.db")

    preset = train.pop("preset", None) or None
    try:
        ecfg = make_eval_config(preset, **evals)
    except UserError as e:
        raise UserError(f"[eval]: {e}") from None

    # in the file's order: the first axis varies slowest, and errors name points the same way
    axes = {a: _scalar_list(a, grid[a]) for a in grid}
    points, seen = [], {}
    names = list(axes)
    for combo in itertools.product(*(range(len(axes[a])) for a in names)):
        coords = {a: axes[a][i] for a, i in zip(names, combo)}
        where = "grid point " + ", ".join(f"{a}={coords[a]}" for a in names)
        try:
            cfg = make_train_config(preset, **train, **coords)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if not cfg.has_lambda:
            if "lam" in axes and combo[names.index("lam")] > 0:
                continue  # lam does not apply: one point for the whole lam list
            cfg.lam = 0.0
        if cfg.method == "natural":
            if "eps_train" in axes and combo[names.index("eps_train")] > 0:
                continue  # natural training has no radius: one point, plotted at eps_train 0
            cfg.eps_train = 0.0
        ident = (cfg.dataset, cfg.model, cfg.method, cfg.seed, cfg.eps_train, cfg.lam)
        if ident in seen:
            raise UserError(f"duplicate grid point: {where} is the same point as {seen[ident]} "
                            f"(a value is repeated in a grid list, e.g. 8/255 and 0.031372549)")
        seen[ident] = where
        points.append(GridPoint(point_key(cfg), cfg, ecfg))
    return Sweep(db=db, report=report, points=points, threads=threads)


def point_key(cfg: TrainConfig) -> str:
    """A readable, file-name-safe key; the hash covers every training field, so a changed
    [train] value makes new points instead of resuming the old checkpoints."""
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    lam = f"_lam{cfg.lam:g}" if cfg.has_lambda else ""
    return (f"{cfg.dataset}_{cfg.model}_{cfg.method}_eps{cfg.eps_train:.4g}{lam}"
            f"_s{cfg.seed}_{digest}")


# ---------------------------------------------------------------------------------------------
# Running

def _bar(total, desc, enabled, position, unit="epoch", initial=0, leave=False):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, position=position,
                leave=leave, dynamic_ncols=True)


def _say(line: str, progress: bool) -> None:
    """Print a line above the bars (or plainly without them)."""
    if progress:
        from tqdm import tqdm
        tqdm.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def summary_line(p: GridPoint, records: list[dict], seconds: float) -> str:
    """One line per finished point: PGD-20 (or the first attack) at the first eps_test."""
    from .evaluate import attack_title, eps_label
    rob = [r for r in records if r["attack"] != "clean"]
    first = min(r["eps"] for r in rob)
    pick = next((r for r in rob if r["attack"] == "pgd20" and r["eps"] == first),
                next(r for r in rob if r["eps"] == first))
    clean = next((r for r in records if r["attack"] == "clean"), None)
    t = p.train
    lam = f" lam {t.lam:g}" if t.has_lambda else ""
    s = (f"{t.method} {t.model} eps_train {eps_label(t.eps_train)}{lam} seed {t.seed}: "
         f"{attack_title(pick['attack'])} @ {eps_label(pick['eps'])} rob.acc {100 * pick['avg_acc']:.2f}% "
         f"var {100 * pick['vcra']:.2f}e-2")
    if clean is not None:
        s += f", clean {100 * clean['avg_acc']:.2f}%"
    return s + f" ({seconds:.0f} s)"


def run_point(store, p: GridPoint, run_dir: str, *, progress: bool, overall=None) -> list[dict]:
    """Train (resuming from run_dir's checkpoint) and evaluate one point; store its results."""
    from .data import dataset_info
    from .evaluate import evaluate, make_test_loader
    from .train import resolve_device, train

    done0 = store.point(p.key).epochs_done
    bar = _bar(p.train.epochs, p.label(), progress, position=1, initial=min(done0, p.train.epochs))

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
        from .train import load_model
        device = resolve_device(p.train.device if p.eval.device == "auto" else p.eval.device)
        model, _ = load_model(os.path.join(run_dir, "checkpoint.pt"), device)
        if bar is not None:
            bar.set_postfix_str("evaluating")
        t0 = time.perf_counter()
        records = evaluate(model, make_test_loader(p.train, p.eval, device), p.eval,
                           dataset_info(p.train.dataset).num_classes, device=device, amp=p.train.amp)
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
    from .store import Point, Store

    with Store(sweep.db) as store:
        for p in sweep.points:
            store.add_point(Point(
                key=p.key, method=p.train.method, model=p.train.model, dataset=p.train.dataset,
                eps_train=p.train.eps_train, lam=p.train.lam, seed=p.train.seed,
                train_config=to_dict(p.train), eval_config=to_dict(p.eval),
                run_dir=os.path.relpath(os.path.join(sweep.runs_dir, p.key),
                                        os.path.dirname(os.path.abspath(sweep.db))),
                epochs_total=p.train.epochs))
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
        overall = _bar(total, "sweep", progress, position=0, unit="step", leave=True)
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


# ---------------------------------------------------------------------------------------------
# CLI

class _Prefixed:
    """Lets add_dataclass_flags add EvalConfig's flags under their own dest ('eval.NAME')."""

    def __init__(self, parser):
        self.parser = parser

    def add_argument(self, *flags, dest, **kw):
        return self.parser.add_argument(*flags, dest="eval." + dest, **kw)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="train and evaluate a grid (method x eps_train x lam x model x dataset x seed)",
        description="Train and evaluate every point of a grid into one SQLite results database, "
                    "then write the report. Re-running the same command resumes an interrupted "
                    "sweep and skips finished points. Every sweep-file key is also a flag; flags win.")
    p.add_argument("config", nargs="?", metavar="CONFIG.toml",
                   help="sweep file ([grid], [train], [eval], db, report)")
    p.add_argument("--grid", metavar="NAME", help="a grid shipped with fastfat instead of a file (demo)")
    p.add_argument("--db", help="results database (default: the file's db, relative to the file)")
    p.add_argument("--report", metavar="DIR", help="report directory (default: <db stem>_report/)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the file's threads, else torch's)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the points; train nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--preset", default=argparse.SUPPRESS, help="[train] preset: paper | authors | demo")
    g = p.add_argument_group("grid axes (each replaces the file's list)")
    for axis in AXES:
        g.add_argument("--" + axis.replace("_", "-"), dest="grid." + axis, nargs="+",
                       default=argparse.SUPPRESS, metavar=axis.upper())
    t = p.add_argument_group("[train] fields")
    add_dataclass_flags(t, TrainConfig, skip=AXES + ("preset",))
    e = p.add_argument_group("[eval] fields")
    add_dataclass_flags(_Prefixed(e), EvalConfig,
                        rename={n: "eval_" + n for n in EVAL_PREFIXED})
    p.set_defaults(func=run)


def run(args) -> int:
    doc, base = read_sweep_file(args.config, args.grid)
    v = vars(args)
    grid_flags = {k[5:]: x for k, x in v.items() if k.startswith("grid.")}
    train_flags = {k: x for k, x in v.items() if k in TRAIN_FIELDS and k not in AXES}
    eval_flags = {k[5:]: x for k, x in v.items() if k.startswith("eval.")}
    sweep = build_sweep(doc, base, grid_flags=grid_flags, train_flags=train_flags,
                        eval_flags=eval_flags, db=args.db, report=args.report, threads=args.threads)
    progress = not args.no_progress
    if args.dry_run:
        for p in sweep.points:
            print(f"{p.key}  {p.label()}")
        print(f"{len(sweep.points)} points; database {sweep.db}; runs in {sweep.runs_dir}")
        return 0
    print(f"sweep: {len(sweep.points)} points into {sweep.db}", flush=True)
    t0 = time.perf_counter()
    counts = run_sweep(sweep, progress=progress, report=not args.no_report)
    mins = (time.perf_counter() - t0) / 60
    msg = (f"sweep: {counts['done']}/{counts['points']} points done ({counts['ran']} run now, "
           f"{counts['skipped']} already done), {counts['failed']} failed; {mins:.1f} min; "
           f"results in {sweep.db}")
    if counts["busy"]:
        msg += f"; {counts['busy']} running in another process"
    print(msg)
    if counts["failed"]:
        print("sweep: run the same command again to retry the failed points "
              "(they resume from their last checkpoint)", file=sys.stderr)
        return 1
    return 0
