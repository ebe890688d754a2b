"""The epochs the catastrophic-overfitting guard flagged (fastfat.guard), read from a results
database, and their Markdown table for the report.

flagged_epochs(con) is the query; flagged_markdown(rows) the rendering; report_section(db_path)
both, for report.md (empty for a database none of whose epochs was guarded). A database written
before the guard existed (its epochs table without the co_* columns) has no flagged epochs.
"""
from __future__ import annotations

import json
import sqlite3

from ..sweep.schema import table_columns

STOPPED = 2   # fastfat.guard.STOPPED: the run ended at this epoch on its best epoch's weights


def _has_guard_columns(con: sqlite3.Connection) -> bool:
    return {"co_flag", "co_pgd_acc", "co_fgsm_acc"} <= table_columns(con).get("epochs", set())


def report_section(db_path: str) -> str:
    """report.md's section on the catastrophic-overfitting guard: flagged_markdown of the
    database's flagged epochs, or "" when no epoch of it was guarded. Opens the file read-only."""
    from ..sweep.store import Store

    with Store(db_path, readonly=True) as store:
        con = store.db
        if not _has_guard_columns(con) or con.execute(
                "SELECT 1 FROM epochs WHERE co_flag IS NOT NULL LIMIT 1").fetchone() is None:
            return ""
        return flagged_markdown(flagged_epochs(con))


def flagged_epochs(con: sqlite3.Connection) -> list[dict]:
    """Every flagged epoch (co_flag 1 or 2) of the database's points, ordered by method,
    eps_train, lambda, seed, epoch: {"key", "method", "train_attack", "eps_train", "lam", "seed",
    "epoch" (1-based), "co_fgsm_acc", "co_pgd_acc" (fractions), "best_pgd_acc" (the point's best
    co_pgd_acc before that epoch), "stopped" (bool)}. con: any connection to the database,
    read-only included."""
    if not _has_guard_columns(con):
        return []
    cur = con.execute(
        "SELECT p.key, p.method, p.eps_train, p.lam, p.seed, p.train_config, e.epoch, e.co_fgsm_acc, "
        "e.co_pgd_acc, e.co_flag, (SELECT MAX(b.co_pgd_acc) FROM epochs b WHERE b.point = e.point "
        "AND b.epoch < e.epoch) FROM epochs e JOIN points p ON p.key = e.point WHERE e.co_flag >= 1 "
        "ORDER BY p.method, p.eps_train, p.lam, p.seed, e.epoch")
    rows = []
    for key, method, eps, lam, seed, tcfg, epoch, fgsm, pgd, flag, best in cur.fetchall():
        rows.append({"key": key, "method": method,
                     "train_attack": json.loads(tcfg).get("train_attack", "pgd"),
                     "eps_train": eps, "lam": lam, "seed": seed, "epoch": epoch, "co_fgsm_acc": fgsm,
                     "co_pgd_acc": pgd, "best_pgd_acc": best, "stopped": flag == STOPPED})
    return rows


def flagged_markdown(rows: list[dict]) -> str:
    """A Markdown section listing flagged_epochs' rows (accuracies in %), or a line saying that no
    epoch was flagged."""
    head = "## Catastrophic-overfitting guard: flagged epochs\n\n"
    if not rows:
        return head + "No epoch was flagged.\n"
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    lines = ["| method | attack | eps_train | lambda | seed | epoch | PGD % | best PGD % | FGSM % | stopped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['train_attack']} | {r['eps_train']:.4g} | {r['lam']:g} | "
                     f"{r['seed']} | {r['epoch']} | {pct(r['co_pgd_acc'])} | {pct(r['best_pgd_acc'])} | "
                     f"{pct(r['co_fgsm_acc'])} | {'yes' if r['stopped'] else 'no'} |")
    return head + "\n".join(lines) + "\n"
