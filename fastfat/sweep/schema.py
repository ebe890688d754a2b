"""The results database's tables, their version, and creating or upgrading them race-free.

Tables
  meta       'schema' (its version) and 'clock' (a counter that orders run starts and failures).
  points     one row per grid point: key, the grid coordinates (method, model, dataset,
             eps_train, lam, seed), the full train and eval configs as JSON, status
             (pending | running | done | failed), the error line of a failure and its clock mark,
             epochs done, timings, and the claim of a running point: owner (host:pid), heartbeat
             (unix time the owner last showed life) and lease (seconds after which a silent claim
             is stale).
  epochs     one row per finished training epoch of a point (loss, vcar, lr, seconds), and the
             catastrophic-overfitting guard's co_fgsm_acc, co_pgd_acc and co_flag (NULL when off;
             columns added in place to an older file, without a version change: GUARD_COLUMNS).
  results    one row per (point, checkpoint, attack, eps_test): avg_acc, vcra (raw), worst_acc,
             worst_k_acc (mean of the worst_k lowest classes), worst_k and nstd (std / mean);
             attack "clean" at eps 0 is the clean accuracy. checkpoint: 'last' (the final
             epoch's checkpoint.pt) or 'best' (best.pt, selected on a validation split).
  class_acc  one row per (point, checkpoint, attack, eps_test, class): that class's accuracy
             (fraction; NULL for a class without test samples) and its number of test samples
             (NULL if unknown).

Versions: 1 lacked the claims' heartbeat and lease, the failure's clock mark and class counts;
2 lacked the checkpoint column (its rows are the last checkpoint's) and worst_k_acc, worst_k,
nstd (NULL in rows upgraded from it: the report derives them from the class accuracies).
"""
from __future__ import annotations

import sqlite3

from ..errors import UserError

SCHEMA_VERSION = 3

_BASE_TABLES = """
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
    owner TEXT,                          -- host:pid of the process running it
    heartbeat REAL,                      -- when the owner last showed life (unix time)
    lease REAL,                          -- the owner's lease in seconds
    fail_mark INTEGER                    -- meta clock at the failure
);
CREATE TABLE IF NOT EXISTS epochs (
    point TEXT NOT NULL REFERENCES points(key) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,              -- 1-based
    loss REAL, vcar REAL, lr REAL, seconds REAL, images_per_s REAL,
    co_fgsm_acc REAL, co_pgd_acc REAL,   -- the catastrophic-overfitting guard's scores (fastfat.guard)
    co_flag INTEGER,                     -- its flag: 0 fine, 1 flagged, 2 flagged and stopped, NULL off
    PRIMARY KEY (point, epoch)
);
"""

# Results per checkpoint (schema 3); an upgrade from 2 rebuilds these two tables (their keys grow).
_RESULT_TABLES = """
CREATE TABLE IF NOT EXISTS results (
    point TEXT NOT NULL REFERENCES points(key) ON DELETE CASCADE,
    checkpoint TEXT NOT NULL DEFAULT 'last' CHECK (checkpoint IN ('last', 'best')),
    attack TEXT NOT NULL,                -- clean | fgsm | pgdK | cw | aa | apgd
    eps REAL NOT NULL,                   -- eps_test (0 for clean)
    avg_acc REAL NOT NULL,               -- fractions, and vcra the raw population variance
    vcra REAL NOT NULL,
    worst_acc REAL NOT NULL,
    worst_k_acc REAL,                    -- mean of the worst_k lowest classes (NULL: from schema 2)
    worst_k INTEGER,
    nstd REAL,                           -- std / mean (NULL also when the mean is 0)
    PRIMARY KEY (point, checkpoint, attack, eps)
);
CREATE TABLE IF NOT EXISTS class_acc (
    point TEXT NOT NULL REFERENCES points(key) ON DELETE CASCADE,
    checkpoint TEXT NOT NULL DEFAULT 'last' CHECK (checkpoint IN ('last', 'best')),
    attack TEXT NOT NULL,
    eps REAL NOT NULL,
    cls INTEGER NOT NULL,
    acc REAL,                            -- NULL for a class without test samples
    count INTEGER,                       -- test samples of the class (NULL: not recorded)
    PRIMARY KEY (point, checkpoint, attack, eps, cls)
);
"""
_SCHEMA = _BASE_TABLES + _RESULT_TABLES

# Version 1 lacked the claim's heartbeat and lease, the failure's clock mark and class counts.
_UPGRADE_FROM_1 = (
    "ALTER TABLE points ADD COLUMN heartbeat REAL",
    "ALTER TABLE points ADD COLUMN lease REAL",
    "ALTER TABLE points ADD COLUMN fail_mark INTEGER",
    "ALTER TABLE class_acc ADD COLUMN count INTEGER",
)

# Version 2's rows are the last checkpoint's: the two tables are rebuilt with the checkpoint in
# their keys (SQLite cannot change a primary key in place) and the rows copied, numbers as they were.
_UPGRADE_FROM_2 = (
    "ALTER TABLE results RENAME TO results_v2",
    "ALTER TABLE class_acc RENAME TO class_acc_v2",
    *(stmt for stmt in _RESULT_TABLES.split(";") if stmt.strip()),
    "INSERT INTO results (point, checkpoint, attack, eps, avg_acc, vcra, worst_acc) "
    "SELECT point, 'last', attack, eps, avg_acc, vcra, worst_acc FROM results_v2 ORDER BY rowid",
    "INSERT INTO class_acc (point, checkpoint, attack, eps, cls, acc, count) "
    "SELECT point, 'last', attack, eps, cls, acc, count FROM class_acc_v2 ORDER BY rowid",
    "DROP TABLE results_v2",
    "DROP TABLE class_acc_v2",
)


# The guard's epoch columns (fastfat.guard), added to a file that lacks them when a sweep opens it:
# extra columns, which older fastfat reads past, so the version stays.
GUARD_COLUMNS = {"co_fgsm_acc": "REAL", "co_pgd_acc": "REAL", "co_flag": "INTEGER"}


# The columns every schema version has (1 to 3): a file whose tables lack them is another
# program's, whatever its meta says.
REQUIRED_COLUMNS = {
    "meta": {"name", "value"},
    "points": {"key", "method", "model", "dataset", "eps_train", "lam", "seed", "train_config",
               "eval_config", "run_dir", "status", "epochs_done", "epochs_total"},
    "epochs": {"point", "epoch"},
    "results": {"point", "attack", "eps", "avg_acc", "vcra", "worst_acc"},
    "class_acc": {"point", "attack", "eps", "cls", "acc"},
}


def table_columns(con: sqlite3.Connection) -> dict[str, set[str]]:
    """Each table of the database and its column names (read only)."""
    names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return {n: {r[1] for r in con.execute("SELECT * FROM pragma_table_info(?)", (n,))} for n in names}


def check_version(path: str, tables: dict, schema) -> int:
    """The schema version of a database with these tables (table_columns) and meta 'schema'
    value; UserError if it is not fastfat's (or is newer than this fastfat). The one test of
    whether a file is a fastfat database: sweeps and the report both ask it (Store)."""
    try:
        version = int(schema)
    except (TypeError, ValueError):
        version = None
    if version is None or any(not cols <= tables.get(t, set()) for t, cols in REQUIRED_COLUMNS.items()):
        raise UserError(f"{path} is an SQLite database of something else; left untouched, "
                        f"choose another --db")
    if not 1 <= version <= SCHEMA_VERSION:
        raise UserError(f"{path} is a results database of schema version {version}; this "
                        f"fastfat reads versions 1 to {SCHEMA_VERSION}")
    return version


def init_schema(con: sqlite3.Connection, path: str) -> int:
    """Create or upgrade the schema of an autocommit connection's database in one write
    transaction, after looking inside it: two processes opening a new database at once queue on
    the transaction, and the second finds the first's tables. Returns SCHEMA_VERSION."""
    con.execute("BEGIN IMMEDIATE")
    try:
        tables = table_columns(con)
        if tables:
            row = con.execute("SELECT value FROM meta WHERE name='schema'").fetchone() \
                if "meta" in tables else None
            version = check_version(path, tables, None if row is None else row[0])
        else:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            version = 0
        upgrade = (_UPGRADE_FROM_1 if version == 1 else ()) + (_UPGRADE_FROM_2 if version in (1, 2) else ())
        for stmt in upgrade:
            con.execute(stmt)
        have = table_columns(con)["epochs"]
        for name, kind in GUARD_COLUMNS.items():
            if name not in have:
                con.execute(f"ALTER TABLE epochs ADD COLUMN {name} {kind}")
        if version < SCHEMA_VERSION:
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('clock', '0')")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
    return SCHEMA_VERSION
