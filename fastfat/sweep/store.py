"""The results store: one SQLite database per sweep (stdlib sqlite3, WAL journal).

Tables
  points     one row per grid point: key, the grid coordinates (method, model, dataset,
             eps_train, lam, seed), the full train and eval configs as JSON, status
             (pending | running | done | failed), the error line of a failure, epochs done,
             timings, and which process holds a running point.
  epochs     one row per finished training epoch of a point (loss, vcar, lr, seconds).
  results    one row per (point, attack, eps_test): avg_acc, vcra (raw), worst_acc; attack
             "clean" at eps 0 is the clean accuracy.
  class_acc  one row per (point, attack, eps_test, class): that class's accuracy (fraction).

Every write is one short transaction, so a crash or kill -9 leaves the database as of the last
commit: a point's results and its status "done" are committed together, never one without the
other. Accuracies are stored as fractions and variances raw; the report does the x100 scaling.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field

from ..errors import UserError

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS points (
    key TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    model TEXT NOT NULL,
    dataset TEXT NOT NULL,
    eps_train REAL NOT NULL,
    lam REAL NOT NULL,
    seed INTEGER NOT NULL,
    train_config TEXT NOT NULL,          -- JSON of the TrainConfig
    eval_config TEXT NOT NULL,           -- JSON of the EvalConfig
    run_dir TEXT NOT NULL,               -- checkpoint directory (relative to the database)
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'done', 'failed')),
    error TEXT,                          -- one line, for status failed
    epochs_done INTEGER NOT NULL DEFAULT 0,
    epochs_total INTEGER NOT NULL,
    created REAL NOT NULL,               -- unix times
    started REAL,                        -- first time any process started the point
    finished REAL,
    train_seconds REAL,                  -- summed over epochs, across resumes
    eval_seconds REAL,
    owner TEXT                           -- host:pid of the process running it
);
CREATE TABLE IF NOT EXISTS epochs (
    point TEXT NOT NULL REFERENCES points(key) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,              -- 1-based
    loss REAL, vcar REAL, lr REAL, seconds REAL, images_per_s REAL,
    PRIMARY KEY (point, epoch)
);
CREATE TABLE IF NOT EXISTS results (
    point TEXT NOT NULL REFERENCES points(key) ON DELETE CASCADE,
    attack TEXT NOT NULL,                -- clean | fgsm | pgdK | cw
    eps REAL NOT NULL,                   -- eps_test (0 for clean)
    avg_acc REAL NOT NULL,               -- fractions, and vcra the raw population variance
    vcra REAL NOT NULL,
    worst_acc REAL NOT NULL,
    PRIMARY KEY (point, attack, eps)
);
CREATE TABLE IF NOT EXISTS class_acc (
    point TEXT NOT NULL REFERENCES points(key) ON DELETE CASCADE,
    attack TEXT NOT NULL,
    eps REAL NOT NULL,
    cls INTEGER NOT NULL,
    acc REAL,                            -- NULL for a class without test samples
    PRIMARY KEY (point, attack, eps, cls)
);
"""


@dataclass
class Point:
    """One grid point, the sweep's one record of it: its row in the points table (made by
    grid.GridPoint.to_point), with its results attached when read back (the report reads these)."""
    key: str
    method: str
    model: str
    dataset: str
    eps_train: float
    lam: float
    seed: int
    train_config: dict
    eval_config: dict
    run_dir: str
    status: str = "pending"
    error: str | None = None
    epochs_done: int = 0
    epochs_total: int = 0
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    owner: str | None = None
    results: list[dict] = field(default_factory=list)   # evaluate()'s records, clean first


def owner_id() -> str:
    """host:pid of this process, to tell a live running point from one left by a crash."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process that claimed a point still runs (only decidable on this host)."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's process: assume it is alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


class Store:
    """The results database. Use as a context manager or call close()."""

    def __init__(self, path: str, *, create: bool = True):
        self.path = path
        if not create and not os.path.isfile(path):
            raise UserError(f"results database not found: {path}")
        if create:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE).
            self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")   # a committed point survives power loss
            self.db.execute("PRAGMA foreign_keys=ON")
            self._init_schema(create)
        except sqlite3.DatabaseError as e:
            raise UserError(f"cannot open results database {path}: {e}") from None

    def _init_schema(self, create: bool) -> None:
        has_meta = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if has_meta:
            row = self.db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None or int(row["value"]) != SCHEMA_VERSION:
                raise UserError(f"{self.path} is not a fastfat results database of schema "
                                f"version {SCHEMA_VERSION}")
            return
        if not create:
            raise UserError(f"{self.path} is not a fastfat results database")
        others = self.db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        if others:
            raise UserError(f"{self.path} is an SQLite database of something else; choose another --db")
        with self.transaction():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    # -- plumbing ------------------------------------------------------------------------------

    def transaction(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- points --------------------------------------------------------------------------------

    def add_point(self, p: Point) -> bool:
        """Insert a grid point as pending unless its key is already there. True if inserted."""
        with self.transaction():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO points (key, method, model, dataset, eps_train, lam, seed, "
                "train_config, eval_config, run_dir, status, epochs_total, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                (p.key, p.method, p.model, p.dataset, p.eps_train, p.lam, p.seed,
                 json.dumps(p.train_config, sort_keys=True), json.dumps(p.eval_config, sort_keys=True),
                 p.run_dir, int(p.epochs_total), time.time()))
            return cur.rowcount == 1

    def sync_eval_config(self, key: str, eval_config: dict) -> bool:
        """Adopt a changed evaluation config; a done point becomes pending again, so the next run
        re-evaluates its final checkpoint without retraining. True if it changed."""
        new = json.dumps(eval_config, sort_keys=True)
        with self.transaction():
            cur = self.db.execute(
                "UPDATE points SET eval_config=?, "
                "status=CASE WHEN status='done' THEN 'pending' ELSE status END "
                "WHERE key=? AND eval_config!=?", (new, key, new))
            return cur.rowcount == 1

    def claim(self, key: str) -> str:
        """Mark a point running for this process unless it is done or another live process runs it.

        Returns 'claimed' (now ours), 'done' or 'busy' (a live process runs it). A point left
        'running' by a dead process (a crash, kill -9) is taken over.
        """
        me = owner_id()
        with self.transaction():
            row = self.db.execute("SELECT status, owner FROM points WHERE key=?", (key,)).fetchone()
            if row is None:
                raise KeyError(key)
            if row["status"] == "done":
                return "done"
            if row["status"] == "running" and row["owner"] != me and owner_alive(row["owner"]):
                return "busy"
            self.db.execute("UPDATE points SET status='running', owner=?, error=NULL, "
                            "started=COALESCE(started, ?) WHERE key=?", (me, time.time(), key))
            return "claimed"

    def record_epoch(self, key: str, row: dict) -> None:
        """A training epoch finished (its checkpoint is on disk): log it and count it."""
        with self.transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO epochs (point, epoch, loss, vcar, lr, seconds, images_per_s) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, int(row["epoch"]), row.get("loss"), row.get("vcar"), row.get("lr"),
                 row.get("seconds"), row.get("images_per_s")))
            self.db.execute("UPDATE points SET epochs_done=MAX(epochs_done, ?) WHERE key=?",
                            (int(row["epoch"]), key))

    def finish(self, key: str, records: list[dict], *, train_seconds: float, eval_seconds: float) -> None:
        """Store a point's evaluation records (evaluate()'s output) and mark it done, atomically."""
        with self.transaction():
            self.db.execute("DELETE FROM results WHERE point=?", (key,))
            self.db.execute("DELETE FROM class_acc WHERE point=?", (key,))
            for r in records:
                self.db.execute(
                    "INSERT INTO results (point, attack, eps, avg_acc, vcra, worst_acc) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (key, r["attack"], float(r["eps"]), float(r["avg_acc"]), float(r["vcra"]),
                     float(r["worst_acc"])))
                self.db.executemany(
                    "INSERT INTO class_acc (point, attack, eps, cls, acc) VALUES (?, ?, ?, ?, ?)",
                    [(key, r["attack"], float(r["eps"]), c, None if a != a else float(a))
                     for c, a in enumerate(r["class_acc"])])
            self.db.execute(
                "UPDATE points SET status='done', error=NULL, owner=NULL, finished=?, "
                "train_seconds=?, eval_seconds=?, epochs_done=epochs_total WHERE key=?",
                (time.time(), train_seconds, eval_seconds, key))

    def fail(self, key: str, error: str) -> None:
        """Mark a point failed with a one-line error; its checkpoint stays for a later retry."""
        line = (str(error).strip().splitlines() or ["failed"])[0][:500]
        with self.transaction():
            self.db.execute("UPDATE points SET status='failed', error=?, owner=NULL, finished=? "
                            "WHERE key=?", (line, time.time(), key))

    def release(self, key: str) -> None:
        """Give a running point back (interrupted): pending again, resumable from its checkpoint."""
        with self.transaction():
            self.db.execute("UPDATE points SET status='pending', owner=NULL WHERE key=? "
                            "AND status='running'", (key,))

    # -- reading -------------------------------------------------------------------------------

    def points(self, status: str | None = None, keys=None, with_results: bool = True) -> list[Point]:
        """Points in insertion order, optionally filtered, with their results attached."""
        sql, args = "SELECT * FROM points", []
        if status is not None:
            sql, args = sql + " WHERE status=?", [status]
        rows = self.db.execute(sql + " ORDER BY rowid", args).fetchall()
        out = []
        wanted = None if keys is None else set(keys)
        for row in rows:
            if wanted is not None and row["key"] not in wanted:
                continue
            d = dict(row)
            d["train_config"] = json.loads(d["train_config"])
            d["eval_config"] = json.loads(d["eval_config"])
            p = Point(**d)
            if with_results:
                p.results = self.results(p.key)
            out.append(p)
        return out

    def point(self, key: str) -> Point | None:
        found = self.points(keys=[key])
        return found[0] if found else None

    def results(self, key: str) -> list[dict]:
        """evaluate()-shaped records of a point: clean first, then in insertion order."""
        recs = []
        for r in self.db.execute("SELECT * FROM results WHERE point=? ORDER BY rowid", (key,)):
            accs = self.db.execute("SELECT cls, acc FROM class_acc WHERE point=? AND attack=? "
                                   "AND eps=? ORDER BY cls", (key, r["attack"], r["eps"])).fetchall()
            recs.append({"attack": r["attack"], "eps": r["eps"],
                         "class_acc": [float("nan") if a["acc"] is None else a["acc"] for a in accs],
                         "avg_acc": r["avg_acc"], "vcra": r["vcra"], "worst_acc": r["worst_acc"]})
        recs.sort(key=lambda r: r["attack"] != "clean")
        return recs

    def epochs(self, key: str) -> list[dict]:
        return [dict(r) for r in self.db.execute(
            "SELECT epoch, loss, vcar, lr, seconds, images_per_s FROM epochs WHERE point=? "
            "ORDER BY epoch", (key,))]

    def counts(self, keys=None) -> dict[str, int]:
        """How many points have each status (optionally among keys)."""
        c = dict.fromkeys(STATUSES, 0)
        for p in self.points(keys=keys, with_results=False):
            c[p.status] += 1
        return c


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception (also on KeyboardInterrupt)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
        return False
