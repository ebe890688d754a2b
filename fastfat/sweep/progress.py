"""The sweep's overall bar: the grid's points done in the database, by every process sharing it.

Why the database and not this process's own steps: with `workers = N` (or a second terminal, or
Ray tasks) each process trains only some of the points, so a count of its own work against the
grid's total stops short of 100% and its rate says nothing about the grid's. The bar re-reads the
database's statuses every POLL_S seconds (on its own read-only connection, in a thread) and
whenever this process finishes an epoch or a point; the remaining time is the points left
divided by the rate of points done since the bar started (by any process), so it is "?" until
the first point is measured.
"""
from __future__ import annotations

import os
import threading
import time

from ..runtime import progress_bar

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} points [{elapsed}{postfix}]"
POLL_S = 2.0   # seconds between reads of the database while this process is busy with a point


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def eta_seconds(done_now: int, done_at_start: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the rate measured so far ((done_now - done_at_start) points in elapsed
    seconds); None before any point has been measured, 0.0 when the grid is done."""
    if done_now >= total:
        return 0.0
    measured = done_now - done_at_start
    if measured <= 0 or elapsed <= 0:
        return None
    return (total - done_now) * elapsed / measured


class GridProgress:
    """A tqdm bar over the grid's points (total = len(keys)) whose count is the number of those
    points done in the database at db; the postfix says how many are running and failed there and
    the remaining time. enabled=False: nothing is drawn and nothing is read. Call close() (it reads
    the database once more first, so a finished grid closes at 100%)."""

    def __init__(self, db: str, keys: list[str], *, enabled: bool = True, poll_s: float = POLL_S):
        self.db, self.keys, self.enabled = db, list(keys), enabled
        self.bar = None
        if not enabled:
            return
        self._lock = threading.Lock()
        self._last = {"done": 0, "running": 0, "failed": 0}
        counts = self._read()
        self.done_at_start = counts["done"]
        self.t0 = time.monotonic()
        # The bar's own rate would count this bar's updates; the postfix carries the ETA instead.
        self.bar = progress_bar(len(self.keys), "sweep", True, position=0, unit="point", leave=True,
                                initial=counts["done"], bar_format=BAR_FORMAT)
        self._show(counts)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(poll_s,), daemon=True)
        self._thread.start()

    def _read(self) -> dict:
        """Statuses of the grid's points in the database (all 0 before it exists); the last ones
        read when it cannot be read this instant (a worker creating its schema, a busy WAL)."""
        from .store import Store
        if os.path.exists(self.db):
            try:
                with Store(self.db, readonly=True) as store:
                    self._last = store.counts(keys=self.keys)
            except Exception:
                pass
        return self._last

    def _refresh(self) -> None:
        """Read the database and draw; under the lock, so a slower read never overwrites a newer one."""
        with self._lock:
            self._show(self._read())

    def _show(self, counts: dict) -> None:
        eta = eta_seconds(counts["done"], self.done_at_start, len(self.keys), time.monotonic() - self.t0)
        self.bar.n = counts["done"]
        self.bar.set_postfix_str(f"{counts['running']} running, {counts['failed']} failed, "
                                 f"eta {'?' if eta is None else _clock(eta)}")

    def _poll(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            self._refresh()

    def update(self, n: int = 1) -> None:
        """This process moved on (an epoch or a point of its own, n steps, not counted: the
        database is the count): re-read the database now."""
        if self.bar is not None:
            self._refresh()

    def close(self) -> None:
        if self.bar is None:
            return
        self._stop.set()
        self._thread.join()
        self._refresh()
        self.bar.close()
        self.bar = None
