"""Opening a results database file without harming what is there: look at a file read-only before
writing to it (a foreign SQLite file or a stray file given as the database is refused untouched),
read-only connections for the report (also in a read-only directory), and read-write connections
whose errors (a missing or unwritable directory, a locked file) become one UserError line.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import urllib.parse

from ..errors import UserError
from .schema import table_columns

TIMEOUT_S = 30.0   # how long a connection waits for another process's transaction


def _uri(path: str, **params) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return "file:" + urllib.parse.quote(os.path.abspath(path)) + "?" + query


def _is_wal(path: str) -> bool:
    """Whether the file's header says WAL journal (bytes 18-19 are 2)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[18] == 2


def connect_ro(path: str, *, inspect: bool = False) -> sqlite3.Connection:
    """A read-only connection that writes nothing into the file.

    A WAL-mode database without a -wal file is read as immutable where a plain read-only open
    would fail or leave -wal/-shm files behind: for a look at a file before trusting it and for
    the report (inspect=True: the directory stays as it was), and in a directory we cannot write
    to. With a -wal file present a writer may be active, so the WAL is read the normal way (a
    sweep that starts during an immutable read writes into its own -wal; only its checkpoint at
    the end of its run changes the main file).
    """
    quiet = _is_wal(path) and not os.path.exists(path + "-wal")
    directory = os.path.dirname(os.path.abspath(path))
    if quiet and (inspect or not os.access(directory, os.W_OK)):
        con = sqlite3.connect(_uri(path, mode="ro", immutable=1), uri=True, isolation_level=None)
    else:
        con = sqlite3.connect(_uri(path, mode="ro"), uri=True, timeout=TIMEOUT_S, isolation_level=None)
    con.row_factory = sqlite3.Row
    return con


def look(path: str) -> tuple[dict[str, set[str]], str | None]:
    """({table name: its columns}, meta 'schema' value or None) of the SQLite file at path, read without writing.

    An absent or 0-byte file has no tables (a sweep creates its database that way, so another
    sweep starting at the same instant may find it so). Raises UserError for anything that is not
    a readable SQLite database. The file is read through SQLite, whose locks make a reader wait
    while another process writes the first schema, never from raw bytes.
    """
    if os.path.isdir(path):
        raise UserError(f"results database {path} is a directory; give a file name such as results.db")
    try:
        if os.path.getsize(path) == 0:
            return {}, None
    except FileNotFoundError:
        return {}, None
    except OSError as e:
        raise UserError(f"cannot read results database {path}: {e.strerror}") from None
    for inspect in (True, False):   # an immutable read can race a writer's checkpoint: once more
        try:
            con = connect_ro(path, inspect=inspect)
            try:
                tables = table_columns(con)
                row = (con.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
                       if "meta" in tables else None)
                return tables, None if row is None else str(row[0])
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            if inspect:
                continue
            if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
                raise UserError(f"{path} is not a fastfat results database (not an SQLite file); "
                                f"left untouched, choose another") from None
            raise UserError(f"cannot read results database {path}: {e}") from None
    raise AssertionError("unreachable")


def connect_rw(path: str) -> sqlite3.Connection:
    """A read-write connection in autocommit mode (transactions are explicit), creating the file and
    its directory if needed; a directory that cannot be made or written is one UserError line."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the directory {directory} for results database {path}: "
                        f"{e.strerror}") from None
    if not os.path.exists(path) and not os.access(directory, os.W_OK):
        raise UserError(f"cannot create results database {path}: directory {directory} is not writable")
    try:
        con = sqlite3.connect(path, timeout=TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as e:
        raise UserError(f"cannot open results database {path}: {e}") from None
    con.row_factory = sqlite3.Row
    return con


def remove_empty(path: str) -> None:
    """Remove a database file this process created that holds no table (its schema could not be
    written: a full disk), with its -wal, -shm and -journal files. A file another process filled
    with its schema in the meantime stays."""
    try:
        tables, _ = look(path)
    except UserError:
        return
    if not tables:
        for name in (path, path + "-wal", path + "-shm", path + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def use_wal(con: sqlite3.Connection, path: str) -> None:
    """Switch to the WAL journal (readers never wait for the writer). Needs a moment without other
    transactions: a process creating the schema at the same instant makes it busy, so retry."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            if con.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal":
                return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
        if time.monotonic() > deadline:
            raise UserError(f"results database {path} stayed locked for {TIMEOUT_S:.0f} s; "
                            f"is another program holding it?")
        time.sleep(0.05)
