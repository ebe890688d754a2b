"""`fastfat sweep`: train and evaluate a grid into one results database, then write the report."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from ..config import EvalConfig, TrainConfig
from ..files import check_writable_dir
from ..sweep.grid import AXES, EVAL_PREFIXED, TRAIN_FIELDS, build_sweep, default_report_dir, read_sweep_file
from ..sweep.runner import Terminated, run_sweep
from .flags import add_dataclass_flags


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
                   help="sweep file ([grid], [train], [eval], [report] or report = DIR, db; docs/sweeps.md)")
    p.add_argument("--grid", metavar="NAME", help="a grid shipped with fastfat instead of a file (demo)")
    p.add_argument("--db", help="results database (default: the file's db, relative to the file)")
    p.add_argument("--report", metavar="DIR", help="report directory (default: <db stem>_report/)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the file's threads, else torch's)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="run N local processes sharing the grid, as N terminals would (default: the "
                        "file's workers, else 1); with threads = 1, one per core")
    p.add_argument("--fuse", metavar="K|auto",
                   help="train up to K compatible grid points as one fused model (docs/sweeps.md#when-points-"
                        "fuse); auto: as many as fit the GPU (no fusion on a CPU); default: the "
                        "file's fuse, else 1 (no fusion)")
    p.add_argument("--lease", type=float, metavar="MINUTES",
                   help="a running point whose process has been silent this long is taken over by "
                        "another sweep (default: the file's lease, else 10); the owner renews it "
                        "every epoch and every lease/5")
    p.add_argument("--reclaim", action="store_true",
                   help="first take back this grid's running points that no live process on this "
                        "host holds (e.g. claimed from another host that is gone), and say which")
    p.add_argument("--shared-dir", metavar="DIR",
                   help="where the points' run directories (checkpoints) go; on a Ray cluster a path "
                        "every node reaches (default: the file's shared_dir, else <db stem>_runs/)")
    r = p.add_argument_group("Ray (pip install 'fastfat[ray]'; docs/cluster.md)")
    r.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the points as Ray tasks: alone, on a Ray instance started here; 'auto' or "
                        "host:port, on a running cluster ('off': in this process)")
    r.add_argument("--ray-cpus", type=int, metavar="N", help="CPUs per grid point (default: threads, else 1)")
    r.add_argument("--ray-gpus", type=float, metavar="N",
                   help="GPUs per grid point (default: 1 on a cluster with GPUs, else 0)")
    r.add_argument("--ray-retries", type=int, metavar="N",
                   help="re-runs of a point whose worker or node died (default 3)")
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
    if args.ray and args.ray.endswith(".toml") and args.config is None:   # `--ray GRID.toml`
        args.config, args.ray = args.ray, "local"
    doc, base = read_sweep_file(args.config, args.grid)
    v = vars(args)
    grid_flags = {k[5:]: x for k, x in v.items() if k.startswith("grid.")}
    train_flags = {k: x for k, x in v.items() if k in TRAIN_FIELDS and k not in AXES}
    eval_flags = {k[5:]: x for k, x in v.items() if k.startswith("eval.")}
    sweep = build_sweep(doc, base, grid_flags=grid_flags, train_flags=train_flags,
                        eval_flags=eval_flags, db=args.db, report=args.report, threads=args.threads,
                        lease=args.lease, shared_dir=args.shared_dir,
                        ray_flags={k: v[k] for k in ("ray", "ray_cpus", "ray_gpus", "ray_retries")},
                        fuse=args.fuse, workers=args.workers)
    progress = not args.no_progress
    if args.dry_run:
        for p in sweep.points:
            print(f"{p.key}  {p.label()}")
        print(f"{len(sweep.points)} points; database {sweep.db}; runs in {sweep.runs_dir}")
        if sweep.fuse != 1:
            from ..sweep.groups import plan
            units = plan(sweep.points, sweep.fuse)
            print(f"fuse = {sweep.fuse}: {sum(len(u) > 1 for u in units)} fused group(s), "
                  f"{sum(len(u) == 1 for u in units)} point(s) alone; sizes {[len(u) for u in units]}")
        return 0
    report_dir = sweep.report or default_report_dir(sweep.db)
    if not args.no_report and os.path.isdir(report_dir):
        # before the work, whose report would fail after it (a name taken by a directory); a new
        # directory is made with the database's, whose own check speaks first
        from .report import REPORT_FILES
        check_writable_dir(report_dir, "report", REPORT_FILES)
    if sweep.ray is not None:
        from ..sweep.ray_connect import import_ray
        from ..sweep.ray_runner import run_sweep_ray
        import_ray()   # before any output: without Ray, one line saying how to install it
    print(f"sweep: {len(sweep.points)} points into {sweep.db}", flush=True)
    t0 = time.perf_counter()
    try:
        if sweep.ray is not None:
            counts = run_sweep_ray(sweep, progress=progress, report=not args.no_report, reclaim=args.reclaim)
        elif sweep.workers > 1:
            from ..sweep.workers import run_with_workers
            counts = run_with_workers(sweep, sweep.workers, progress=progress, report=not args.no_report,
                                      reclaim=args.reclaim)
        else:
            counts = run_sweep(sweep, progress=progress, report=not args.no_report, reclaim=args.reclaim)
    except Terminated:
        print("fastfat: terminated; the running point" + ("s were" if sweep.ray else " was") +
              " given back (run the same command to resume)", file=sys.stderr)
        return 128 + signal.SIGTERM
    mins = (time.perf_counter() - t0) / 60
    msg = (f"sweep: {counts['done']}/{counts['points']} points done ({counts['ran']} run now, "
           f"{counts['skipped']} already done), {counts['failed']} failed; {mins:.1f} min; "
           f"results in {sweep.db}")
    if counts["busy"]:
        msg += f"; {counts['busy']} running in another process"
    if counts["failed_elsewhere"]:
        msg += (f"; {counts['failed_elsewhere']} failed in another process during this run "
                f"(not retried by it)")
    print(msg)
    if counts["failed"] or counts["failed_elsewhere"]:
        print("sweep: run the same command again to retry the failed points "
              "(they resume from their last checkpoint)", file=sys.stderr)
        return 1
    return 0
