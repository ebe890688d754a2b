"""How concurrent sweep processes share a results database's points: a claim names its owner
(host:pid) and carries a heartbeat and a lease; a claim whose owner is dead (this host) or silent
for longer than its lease (a reused pid, another host that is gone, a SIGSTOPped process) is stale
and may be taken over. The SQL of claiming lives in store.Store; this module holds the rules.
"""
from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from typing import NamedTuple

from . import dbfile

DEFAULT_LEASE_S = 600.0     # a claim whose owner is silent this long is stale


class Claim(NamedTuple):
    """What claim() found: status 'claimed' (now ours), 'done', 'busy' (a live process runs it) or
    'failed' (it failed in another process after this run began: a later run retries it). When a
    stale claim was taken over, the previous owner and how long it had been silent (seconds)."""
    status: str
    took_from: str | None = None
    silent_s: float | None = None


class ClaimLost(Exception):
    """Another process took this process's point over (its claim had gone stale)."""


def owner_id() -> str:
    """host:pid of this process, to tell a live running point from one left by a crash."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process that claimed a point still runs (only decidable on this host)."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's process: only its heartbeat tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def silent_s(row, now: float) -> float:
    """Seconds since a running point's owner last showed life (a version-1 row: since it started)."""
    beat = row["heartbeat"] if row["heartbeat"] is not None else row["started"]
    return now - (beat or 0.0)


def stale(row, now: float) -> bool:
    """A running claim whose owner is dead (this host) or silent longer than its lease (its pid
    may have been reused, or it ran on another host that is gone)."""
    lease = row["lease"] if row["lease"] is not None else DEFAULT_LEASE_S
    return not owner_alive(row["owner"]) or silent_s(row, now) > lease


class Heartbeat:
    """Renews a running point's claim (key: one key, or a fused group's list of keys) from a
    background thread on its own connection (a long epoch or evaluation must not look like a
    dead owner). `lost` turns True once this process holds none of the keys running (another
    process took them, or a group's members are all finished)."""

    def __init__(self, path: str, key, owner: str, period: float):
        self.keys = [key] if isinstance(key, str) else list(key)
        self.path, self.owner, self.period = path, owner, max(period, 0.05)
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.keys[0]}", daemon=True)

    def _beat(self) -> None:
        con = sqlite3.connect(self.path, timeout=dbfile.TIMEOUT_S, isolation_level=None)
        marks = ",".join("?" * len(self.keys))
        try:
            while not self._stop.wait(self.period):
                try:
                    cur = con.execute(f"UPDATE points SET heartbeat=? WHERE key IN ({marks}) AND owner=? "
                                      "AND status='running'", (time.time(), *self.keys, self.owner))
                except sqlite3.Error:
                    continue   # locked for longer than the timeout: try again next period
                if cur.rowcount == 0:
                    self.lost = True
                    return
        finally:
            con.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


