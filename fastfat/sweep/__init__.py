"""Sweeps: a grid of training runs (grid), run and resumed point by point (runner) into one
SQLite results database (store), read back as the paper's tables (report) and figures (figures),
with one home for how methods and lambdas are named (labels)."""
from .grid import AXES, GridPoint, Sweep, build_sweep, default_report_dir, point_key, read_sweep_file, runs_dir
from .runner import run_point, run_sweep

__all__ = ["AXES", "GridPoint", "Sweep", "build_sweep", "default_report_dir", "point_key",
           "read_sweep_file", "runs_dir", "run_point", "run_sweep"]
