"""A sweep's grid: the sweep file (TOML) or a packaged grid, read, expanded and validated into
GridPoints, each with the key that names it and the store row (Point) it starts as.

A sweep file (TOML) names the grid (the cartesian product of method, eps_train, lam, model,
dataset and seed lists), the training fields shared by every point ([train]) and the evaluation
([eval]); every key is also a flag. The whole grid is validated before anything is written.
Running the points is runner.py's job.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources

from .. import methods
from ..config import METHODS, PRESETS, EvalConfig, TrainConfig, attacks_in_training, make_eval_config, make_train_config
from ..config_dict import to_dict
from ..errors import UserError
from ..data.split import check_test_per_class
from ..report.labels import lam_suffix
from ..report.settings import report_section
from .only import dropped, narrowed, parse_only
from .run_keys import RaySettings, count_setting, fuse_setting, ray_settings
from .sources import resolve_init_from
from .claims import DEFAULT_LEASE_S
from .store import Point

# The grid's axes, in the order points are run (the last varies fastest).
AXES = ("dataset", "model", "method", "seed", "eps_train", "lam")
# Training fields a [grid] may list too (train_attack = ["pgd", "n-fgsm"]): they multiply the points
# like the axes (after them) yet stay in a point's setting (setting_of), so the report tables
# each value apart instead of pooling its seeds with another's.
EXTRA_AXES = ("train_attack",)
TOP_KEYS = ("db", "report", "threads", "workers", "fuse", "lease", "shared_dir", "ray", "ray_cpus", "ray_gpus", "ray_retries",
            "grid", "only", "train", "eval")
RAY_KEYS = ("ray", "ray_cpus", "ray_gpus", "ray_retries")
TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))
EVAL_FIELDS = tuple(f.name for f in fields(EvalConfig))
# Eval fields whose names a training field already uses get an --eval- prefix on the command line.
EVAL_PREFIXED = tuple(n for n in EVAL_FIELDS if n in TRAIN_FIELDS)
_TRAIN_DEFAULTS = to_dict(TrainConfig())


# ---------------------------------------------------------------------------------------------
# Reading and validating a sweep

@dataclass
class GridPoint:
    """One point: its validated configs and the key that names it; depends_on: the key of the
    point whose finished checkpoint it starts from (init_from = "trades" in a sweep) or distils
    from (teacher = "trades"), or None. A runner starts a point only after that one is done
    (resolve_init_from orders them so)."""
    key: str
    train: TrainConfig
    eval: EvalConfig
    depends_on: str | None = None

    def label(self) -> str:
        t = self.train
        lam = lam_suffix(t.method, t.lam, " lam ")
        attack = "" if t.train_attack == "pgd" else f" {t.train_attack}"
        return f"{t.method}{attack} {t.model} {t.dataset} eps_train {t.eps_train:.4g}{lam} seed {t.seed}"

    def to_point(self, run_dir: str) -> Point:
        """The store's row for this point, pending; run_dir is relative to the database."""
        t = self.train
        return Point(key=self.key, method=t.method, model=t.model, dataset=t.dataset,
                     eps_train=t.eps_train, lam=t.lam, seed=t.seed, train_config=to_dict(t),
                     eval_config=to_dict(self.eval), run_dir=run_dir, epochs_total=t.epochs)


@dataclass
class Sweep:
    """A validated sweep: where its database and report go, and its points in run order."""
    db: str
    report: str | None
    points: list[GridPoint]
    threads: int | None = None   # torch intra-op threads (None: torch's default)
    lease: float = DEFAULT_LEASE_S   # seconds a silent claim stays valid (the file's minutes x60)
    shared_dir: str | None = None    # where the points' run directories go (None: next to the db)
    ray: RaySettings | None = None   # None: run the points in this process
    fuse: int | str = 1              # grid points per fused group: K >= 1 or "auto" (fused/plan.py)
    workers: int = 1                 # local processes sharing the grid (workers.py)
    report_options: dict = field(default_factory=dict)   # [report] attack / eps (report.write_report)

    @property
    def runs_dir(self) -> str:
        return self.shared_dir or runs_dir(self.db)


def setting_of(train_config: dict) -> str:
    """A point's training settings less its grid coordinates, as canonical JSON: points with the
    same setting differ only along the grid's axes, so they may share a table. init_from is left
    out too, and teacher: a sweep derives them per point (an FRL point's source run, a distilling
    point's teacher run), like a coordinate."""
    return json.dumps({k: v for k, v in train_config.items()
                       if k not in AXES + ("init_from", "teacher")}, sort_keys=True)


def setting_names(settings: list[str]) -> list[str]:
    """Each setting (setting_of's JSON) named by the fields in which the settings differ,
    e.g. 'width=16'; '' when there is one."""
    if len(settings) < 2:
        return [""] * len(settings)
    dicts = [json.loads(x) for x in settings]
    differ = [k for k in sorted(set().union(*dicts))
              if len({json.dumps(d.get(k), sort_keys=True) for d in dicts}) > 1]
    return [", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                      for k in differ for v in [d.get(k)]) for d in dicts]


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
                threads=None, lease=None, shared_dir: str | None = None,
                ray_flags: dict | None = None, fuse=None, workers=None) -> Sweep:
    """Validate a sweep file's content merged with flags (flags win) into a Sweep: its keys
    (_tables), its top-level settings (_settings), its grid expanded into points (_expand), the
    checks across points (_check_points), and each point's source (resolve_init_from).

    Raises UserError naming the key or grid point at fault; nothing is written.
    """
    grid, train, evals = _tables(doc, grid_flags, train_flags, eval_flags)
    sweep = _settings(doc, base, db=db, report=report, threads=threads, lease=lease,
                      shared_dir=shared_dir, ray_flags=ray_flags, fuse=fuse, workers=workers)
    preset = train.pop("preset", None) or None
    try:
        ecfg = make_eval_config(preset, **evals)
    except UserError as e:
        raise UserError(f"[eval]: {e}") from None
    report_dir, sweep.report_options = report_section(doc.get("report"), base, ecfg.attacks, ecfg.eps_test)
    sweep.report = report_dir if report is None else report
    # in the file's order: the first axis varies slowest, and errors name points the same way
    axes = {a: _scalar_list(a, grid[a]) for a in grid}
    from ..models.user import anchored   # model = "my_models.py:Net": beside the sweep file
    if "model" in axes:
        axes["model"] = [anchored(m, base) for m in axes["model"]]
    if "model" in train:
        train["model"] = anchored(train["model"], base)
    only = parse_only(narrowed(doc.get("only"), grid_flags or {}), axes)
    points = _expand(axes, only, train, preset, ecfg)
    _check_points(points, train, sweep)
    sweep.points = resolve_init_from(points, sweep.runs_dir)
    return sweep


def _tables(doc: dict, grid_flags, train_flags, eval_flags) -> tuple[dict, dict, dict]:
    """The file's [grid], [train] and [eval] with the flags merged in (flags win), each key
    checked against the grid's axes and the config fields; UserError naming an unknown one."""
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"unknown key(s) in the sweep file: {', '.join(unknown)}; "
                        f"valid: {', '.join(TOP_KEYS)}")
    grid = _check_table(doc, "grid")
    train = _check_table(doc, "train")
    evals = _check_table(doc, "eval")
    bad = sorted(set(grid) - set(AXES + EXTRA_AXES))
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
    return grid, train, evals


def _settings(doc: dict, base: str, *, db, report, threads, lease, shared_dir, ray_flags, fuse,
              workers) -> Sweep:
    """The sweep's top-level settings (file keys, the flags' values win; paths relative to base)
    as a Sweep with no points yet; UserError naming the key at fault."""
    if "db" in doc and not isinstance(doc["db"], str):
        raise UserError(f"db must be a string (a path), got {doc['db']!r}")
    if db is None:
        if "db" not in doc:
            raise UserError("no results database: set db = \"results.db\" in the sweep file or pass --db")
        db = os.path.join(base, doc["db"])
    threads = count_setting("threads", doc.get("threads") if threads is None else threads)
    workers = count_setting("workers", doc.get("workers", 1) if workers is None else workers)
    lease = doc.get("lease") if lease is None else lease
    if lease is not None:
        try:
            ok = not isinstance(lease, bool) and 0 < float(lease) < math.inf
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"lease must be a number of minutes > 0, got {lease!r}")
    fuse = fuse_setting(doc.get("fuse", 1) if fuse is None else fuse)
    if os.path.isdir(db):
        raise UserError(f"db {db} is a directory; give a file name such as results.db")
    if shared_dir is None and "shared_dir" in doc:
        if not isinstance(doc["shared_dir"], str):
            raise UserError(f"shared_dir must be a string (a path), got {doc['shared_dir']!r}")
        shared_dir = os.path.join(base, doc["shared_dir"])
    ray = ray_settings({**{k: doc[k] for k in RAY_KEYS if k in doc},
                        **{k: v for k, v in (ray_flags or {}).items() if v is not None}})
    return Sweep(db=db, report=report, points=[], threads=threads,
                 lease=DEFAULT_LEASE_S if lease is None else 60.0 * float(lease),
                 shared_dir=os.path.abspath(shared_dir) if shared_dir else None, ray=ray, fuse=fuse,
                 workers=workers)


def _expand(axes: dict[str, list], only: dict, train: dict, preset: str | None,
            ecfg: EvalConfig) -> list[GridPoint]:
    """The grid's points in run order (the product of the axes, less what [only] drops): each a
    validated TrainConfig of the preset, [train] and its coordinates, with one point per method
    along an axis it ignores (lam without a lambda; eps_train for natural, at 0); UserError
    naming the grid point at fault, or two spellings of one point."""
    points, seen = [], {}
    names = list(axes)
    for combo in itertools.product(*(range(len(axes[a])) for a in names)):
        coords = {a: axes[a][i] for a, i in zip(names, combo)}
        if dropped(only, coords):
            continue   # [only]: this method runs on part of the axis
        where = "grid point " + ", ".join(f"{a}={coords[a]}" for a in names)
        try:
            cfg = make_train_config(preset, **_for_method(train, preset, coords), **coords)
            check_test_per_class(ecfg.test_per_class, cfg.dataset)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if not cfg.has_lambda:
            if "lam" in axes and combo[names.index("lam")] > 0:
                continue  # lam does not apply: one point for the whole lam list
            cfg.lam = 0.0
        if not attacks_in_training(cfg.method):
            if "eps_train" in axes and combo[names.index("eps_train")] > 0:
                continue  # natural training has no radius: one point, plotted at eps_train 0
            cfg.eps_train = 0.0
            # val_per_class selects on robust accuracy at eps_train: at 0 there is nothing to
            # select on, so natural trains on the whole pool (the FRL points it starts keep theirs)
            cfg.val_per_class = None
        if cfg.init_from in METHODS and cfg.method not in methods.FINE_TUNE:
            cfg.init_from = None   # a method's name starts only the fine-tuning methods (FRL)
        ident = (cfg.dataset, cfg.model, cfg.method, cfg.seed, cfg.eps_train, cfg.lam, cfg.train_attack)
        if ident in seen:
            raise UserError(f"duplicate grid point: {where} is the same point as {seen[ident]} "
                            f"(a value is repeated in a grid list, e.g. 8/255 and 0.031372549)")
        seen[ident] = where
        gp = GridPoint(point_key(cfg), cfg, ecfg)
        try:
            gp.to_point("").check_storable()
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        points.append(gp)
    return points


def _check_points(points: list[GridPoint], train: dict, sweep: Sweep) -> None:
    """The checks across the grid's points: a [train] teacher some point uses, workers or Ray,
    no fp16 in fused groups; UserError otherwise."""
    if train.get("teacher") is not None and not any(p.train.method in methods.TEACHER for p in points):
        raise UserError(f"[train] teacher = \"{train['teacher']}\": no method of the grid distils from a "
                        f"teacher (those that do: {', '.join(methods.TEACHER)}); drop teacher")
    if sweep.ray is not None and sweep.workers > 1:
        raise UserError("workers runs local processes; with ray the cluster runs points side by side "
                        "(ray_cpus / ray_gpus per point): drop workers or ray")
    if sweep.fuse != 1 and any(p.train.amp == "fp16" for p in points):
        raise UserError(f"fuse = {sweep.fuse!r}: fp16 AMP cannot fuse (its loss scaler skips steps for "
                        f"the whole group); use amp = \"bf16\" or \"off\", or fuse = 1")


def _for_method(train: dict, preset: str | None, coords: dict) -> dict:
    """[train] for one grid point: without teacher where the point's method does not distil (a
    shared teacher, a checkpoint or a method's name, is the distilling points' alone; `fastfat
    train` refuses a teacher its method does not use)."""
    if train.get("teacher") is None:
        return train
    default = PRESETS.get(preset or "", {}).get("train", {}).get("method", _TRAIN_DEFAULTS["method"])
    if str(coords.get("method", train.get("method", default))) in methods.TEACHER:
        return train
    return {k: v for k, v in train.items() if k != "teacher"}


def point_key(cfg: TrainConfig) -> str:
    """A readable, file-name-safe key; the hash covers every training field that differs from its
    default, so a changed [train] value makes new points instead of resuming the old checkpoints,
    while a field added to TrainConfig later (at a default that keeps old behaviour) leaves the
    keys, and so the checkpoints and database rows of existing sweeps, as they were."""
    changed = {k: v for k, v in to_dict(cfg).items() if v != _TRAIN_DEFAULTS[k]}
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
    lam = lam_suffix(cfg.method, cfg.lam)
    from ..models.user import model_label   # a user model's FILE.py:Name holds / and :
    return f"{cfg.dataset}_{model_label(cfg.model)}_{cfg.method}_eps{cfg.eps_train:.4g}{lam}_s{cfg.seed}_{digest}"
