"""The results store: one SQLite database per sweep (stdlib sqlite3, WAL journal; its tables are
described in schema.py), and the claims by which concurrent sweep processes share its points.

Every write is one short transaction, so a crash or kill -9 leaves the database as of the last
commit: a point's results and its status "done" are committed together, never one without the
other. Accuracies are stored as fractions and variances raw; the report does the x100 scaling.
A file is looked at read-only before anything is written to it (dbfile.py), and the schema is
created or upgraded inside one write transaction, so sweeps starting together do not collide.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field

from ..errors import UserError
from . import dbfile
from . import schema as schema_mod
from .claims import DEFAULT_LEASE_S, Claim, ClaimLost, Heartbeat, owner_id, silent_s, stale

STATUSES = ("pending", "running", "done", "failed")
SQL_INT = (-2 ** 63, 2 ** 63 - 1)   # SQLite's INTEGER range


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
    heartbeat: float | None = None
    lease: float | None = None
    fail_mark: int | None = None
    results: list[dict] = field(default_factory=list)   # evaluate()'s records, clean first

    def check_storable(self) -> None:
        """UserError unless every integer fits SQLite's signed 64-bit INTEGER (checked before a
        database is opened, so a bad grid leaves nothing behind)."""
        for name in ("seed", "epochs_total"):
            v = getattr(self, name)
            if not SQL_INT[0] <= v <= SQL_INT[1]:
                raise UserError(f"{name} {v} does not fit the results database (a signed 64-bit integer)")


class Store:
    """The results database. Use as a context manager or call close().

    create: make the database (and its directory) if missing; readonly: open it read-only (the
    report), writing nothing, also in a read-only directory. lease: seconds this process's claims
    stay valid without a heartbeat (a heartbeat thread renews them every lease / 5).
    """

    def __init__(self, path: str, *, create: bool = True, readonly: bool = False,
                 lease: float = DEFAULT_LEASE_S):
        self.path, self.readonly, self.lease = path, readonly, float(lease)
        self.run_mark: int | None = None
        tables, schema = dbfile.look(path)   # read-only: a foreign file is refused untouched
        if tables:
            self.version = schema_mod.check_version(path, tables, schema)
        elif readonly or not create:
            raise UserError(f"results database not found: {path}" if not os.path.exists(path)
                            else f"{path} is not a fastfat results database (it is empty)")
        created = not tables and not os.path.exists(path)
        self.db = dbfile.connect_ro(path, inspect=True) if readonly else dbfile.connect_rw(path)
        try:
            if not readonly:
                self.db.execute("PRAGMA synchronous=FULL")   # a committed point survives power loss
                self.db.execute("PRAGMA foreign_keys=ON")
                self.version = schema_mod.init_schema(self.db, path)
                dbfile.use_wal(self.db, path)              # only now: a refused file stays as it was
            self._columns = {r["name"] for r in self.db.execute("PRAGMA table_info(class_acc)")}
            self._per_checkpoint = "checkpoint" in self._columns   # schema 3 (read-only: older ones too)
        except BaseException as e:
            self.db.close()
            if created:   # a database that could not get its schema (a full disk) is not left behind
                dbfile.remove_empty(path)
            if isinstance(e, sqlite3.DatabaseError):
                raise UserError(f"cannot open results database {path}: {e}") from None
            raise

    # -- plumbing ------------------------------------------------------------------------------

    def transaction(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _tick(self) -> int:
        """Advance the meta clock (inside a transaction); returns its new value."""
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE name='clock'")
        return int(self.db.execute("SELECT value FROM meta WHERE name='clock'").fetchone()[0])

    def begin_run(self, mark: int | None = None) -> int:
        """Mark this process's run as begun: failures marked later (by a concurrent run) are not
        retried by it. mark: join a run another process of the same command began (its mark)
        instead. Returns the mark."""
        if mark is not None:
            self.run_mark = int(mark)
            return self.run_mark
        with self.transaction():
            self.run_mark = self._tick()
        return self.run_mark

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

    def claim(self, key: str) -> Claim:
        """Mark a point running for this process, with a fresh heartbeat and this store's lease.

        Not if it is done, held by a live process whose heartbeat is within its lease ('busy'), or
        failed in a concurrent run (after begin_run; 'failed'). A point left 'running' by a dead
        process (a crash, kill -9) or by a silent one (another host, a reused pid) is taken over.
        """
        return self.claim_group([key])[0]

    def claim_group(self, keys) -> list[Claim]:
        """Claim a fused group's points in one transaction, all or none: each is judged as claim()
        judges it, and if any is 'busy' (a live process holds it) none is claimed and every point
        not done or failed elsewhere comes back 'busy'. Returns one Claim per key, in order."""
        me, now = owner_id(), time.time()
        with self.transaction():
            verdicts = []
            for key in keys:
                row = self.db.execute("SELECT * FROM points WHERE key=?", (key,)).fetchone()
                if row is None:
                    raise KeyError(key)
                verdicts.append(self._verdict(row, me, now))
            if any(v.status == "busy" for v in verdicts):
                return [v if v.status in ("done", "failed") else Claim("busy") for v in verdicts]
            for key, v in zip(keys, verdicts):
                if v.status == "claimed":
                    self.db.execute("UPDATE points SET status='running', owner=?, heartbeat=?, lease=?, "
                                    "error=NULL, started=COALESCE(started, ?) WHERE key=?",
                                    (me, now, self.lease, now, key))
            return verdicts

    def _verdict(self, row, me: str, now: float) -> Claim:
        """What claiming a point's row would give (claim's rules); writes nothing."""
        if row["status"] == "done":
            return Claim("done")
        took = None
        if row["status"] == "running" and row["owner"] != me:
            if not stale(row, now):
                return Claim("busy")
            took = Claim("claimed", row["owner"], silent_s(row, now))
        if (row["status"] == "failed" and self.run_mark is not None
                and (row["fail_mark"] or 0) > self.run_mark):
            return Claim("failed")
        return took or Claim("claimed")

    def reclaim(self, keys) -> list[tuple[str, str, float]]:
        """Take running points back by hand (--reclaim): every one not held by a live process on
        this host with a fresh heartbeat becomes pending. Returns (key, owner, silent seconds)."""
        me, now, host = owner_id(), time.time(), socket.gethostname()
        taken = []
        with self.transaction():
            for key in keys:
                row = self.db.execute("SELECT * FROM points WHERE key=? AND status='running'",
                                      (key,)).fetchone()
                if row is None or row["owner"] == me:
                    continue
                if (row["owner"] or "").rpartition(":")[0] == host and not stale(row, now):
                    continue   # verifiably running here
                self.db.execute("UPDATE points SET status='pending', owner=NULL WHERE key=?", (key,))
                taken.append((key, row["owner"], silent_s(row, now)))
        return taken

    def keep_alive(self, key) -> "Heartbeat":
        """A context manager renewing this process's claim on key (or on each of a fused group's
        keys, a list, while it runs) every lease / 5 seconds."""
        return Heartbeat(self.path, key, owner_id(), self.lease / 5)

    def renew(self, keys) -> list[str]:
        """Renew this process's claims on keys in one transaction (the Ray driver holds the claims
        of every point its tasks run, from its own loop); returns the keys it no longer holds."""
        lost, now = [], time.time()
        with self.transaction():
            for key in keys:
                cur = self.db.execute("UPDATE points SET heartbeat=? WHERE key=? AND owner=? AND "
                                      "status='running'", (now, key, owner_id()))
                if cur.rowcount == 0:
                    lost.append(key)
        return lost

    def record_epoch(self, key: str, row: dict) -> None:
        """A training epoch finished (its checkpoint is on disk): log it, count it, renew the
        claim. ClaimLost if another process has taken the point over."""
        with self.transaction():
            cur = self.db.execute("UPDATE points SET epochs_done=MAX(epochs_done, ?), heartbeat=? "
                                  "WHERE key=? AND owner=?", (int(row["epoch"]), time.time(), key, owner_id()))
            if cur.rowcount == 0:
                raise ClaimLost(key)
            self.db.execute(
                "INSERT OR REPLACE INTO epochs (point, epoch, loss, vcar, lr, seconds, images_per_s, "
                "co_fgsm_acc, co_pgd_acc, co_flag) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, int(row["epoch"]), row.get("loss"), row.get("vcar"), row.get("lr"),
                 row.get("seconds"), row.get("images_per_s"), row.get("co_fgsm_acc"),
                 row.get("co_pgd_acc"), row.get("co_flag")))

    def finish(self, key: str, records: list[dict], *, train_seconds: float, eval_seconds: float) -> None:
        """Store a point's evaluation records (evaluate()'s output) and mark it done, atomically.

        A record's "checkpoint" ('last', the default, or 'best') says which weights it scored.
        A class without test samples has accuracy None (or NaN) and is stored as NULL; a record's
        class_count, when given, is stored beside. ClaimLost if another process holds the point.
        """
        with self.transaction():
            cur = self.db.execute(
                "UPDATE points SET status='done', error=NULL, owner=NULL, finished=?, "
                "train_seconds=?, eval_seconds=?, epochs_done=epochs_total WHERE key=? AND owner=?",
                (time.time(), train_seconds, eval_seconds, key, owner_id()))
            if cur.rowcount == 0:
                raise ClaimLost(key)
            self.db.execute("DELETE FROM results WHERE point=?", (key,))
            self.db.execute("DELETE FROM class_acc WHERE point=?", (key,))
            for r in records:
                ckpt = r.get("checkpoint", "last")
                opt = [None if r.get(f) is None else t(r[f]) for f, t in
                       (("worst_k_acc", float), ("worst_k", int), ("nstd", float))]
                self.db.execute(
                    "INSERT INTO results (point, checkpoint, attack, eps, avg_acc, vcra, worst_acc, "
                    "worst_k_acc, worst_k, nstd) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, ckpt, r["attack"], float(r["eps"]), float(r["avg_acc"]), float(r["vcra"]),
                     float(r["worst_acc"]), *opt))
                counts = r.get("class_count") or [None] * len(r["class_acc"])
                self.db.executemany(
                    "INSERT INTO class_acc (point, checkpoint, attack, eps, cls, acc, count) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(key, ckpt, r["attack"], float(r["eps"]), c, None if a is None or a != a else float(a),
                      None if n is None else int(n))
                     for c, (a, n) in enumerate(zip(r["class_acc"], counts))])

    def fail(self, key: str, error: str) -> None:
        """Mark this process's point failed with a one-line error and the clock; its checkpoint
        stays for a later run to retry."""
        line = (str(error).strip().splitlines() or ["failed"])[0][:500]
        with self.transaction():
            self.db.execute("UPDATE points SET status='failed', error=?, owner=NULL, finished=?, "
                            "fail_mark=? WHERE key=? AND owner=?",
                            (line, time.time(), self._tick(), key, owner_id()))

    def release(self, key) -> None:
        """Give this process's running point back (interrupted): pending again, resumable from
        its checkpoint. key: one key, or a fused group's list (released in one transaction)."""
        keys = [key] if isinstance(key, str) else list(key)
        with self.transaction():
            self.db.executemany("UPDATE points SET status='pending', owner=NULL WHERE key=? "
                                "AND status='running' AND owner=?", [(k, owner_id()) for k in keys])

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
        """evaluate()-shaped records of a point, the last checkpoint's before the best one's, each
        clean first, then in insertion order: "checkpoint" ('last' | 'best'), class_acc with None
        for a class without test samples, class_count when it was recorded, and worst_k_acc,
        worst_k, nstd (None in rows from before schema 3)."""
        recs = []
        count = ", count" if "count" in self._columns else ""
        ckpt = " AND checkpoint=?" if self._per_checkpoint else ""
        for r in self.db.execute("SELECT * FROM results WHERE point=? ORDER BY rowid", (key,)):
            which = r["checkpoint"] if self._per_checkpoint else "last"
            accs = self.db.execute(f"SELECT cls, acc{count} FROM class_acc WHERE point=? AND attack=? "
                                   f"AND eps=?{ckpt} ORDER BY cls",
                                   (key, r["attack"], r["eps"]) + ((which,) if ckpt else ())).fetchall()
            rec = {"checkpoint": which, "attack": r["attack"], "eps": r["eps"],
                   "class_acc": [a["acc"] for a in accs], "avg_acc": r["avg_acc"], "vcra": r["vcra"],
                   "worst_acc": r["worst_acc"]}
            for f in ("worst_k_acc", "worst_k", "nstd"):
                rec[f] = r[f] if self._per_checkpoint else None
            if count and any(a["count"] is not None for a in accs):
                rec["class_count"] = [a["count"] for a in accs]
            recs.append(rec)
        recs.sort(key=lambda r: (r["checkpoint"] != "last", r["attack"] != "clean"))
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
        if self.db.in_transaction:
            # A signal (Ctrl-C, SIGTERM) raised inside __exit__ before its COMMIT ran leaves the
            # transaction open; it never committed, so drop it, and release() can still run.
            self.db.execute("ROLLBACK")
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
        return False
