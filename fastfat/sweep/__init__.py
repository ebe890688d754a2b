"""Sweeps: a grid of training runs (grid), run and resumed point by point (runner) into one
SQLite results database (store); the report that reads it back lives in fastfat.report."""
from .grid import AXES, GridPoint, Sweep, build_sweep, default_report_dir, point_key, read_sweep_file, runs_dir
from .runner import run_point, run_sweep

__all__ = ["AXES", "GridPoint", "Sweep", "build_sweep", "default_report_dir", "point_key",
           "read_sweep_file", "runs_dir", "run_point", "run_sweep"]
