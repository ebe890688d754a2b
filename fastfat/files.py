"""Every file fastfat writes goes through here: one atomic write (bytes, text, JSON, PNG figures)
and verified checkpoints.

A checkpoint is a plain dict of tensors, numbers and strings, so it loads with
torch.load(..., weights_only=True). It carries a SHA-256 digest of its own contents: a file
that unpickles but was altered (or truncated) is refused with one clear message. The digest is
unkeyed: it detects corruption, not tampering by anyone who can rewrite the file (they can
recompute it). A file with a valid digest is then checked for the parts training needs.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings

import torch

from .errors import DiskFull, UserError

FORMAT = "fastfat-checkpoint-v1"


def temp_prefix(path: str) -> str:
    """The name prefix of the temporary files written for path (".NAME."; suffix ".tmp")."""
    return "." + os.path.basename(path) + "."


def remove_stale_temps(path: str) -> list[str]:
    """Remove the temporary files atomic_path left beside `path` when a process died mid-write
    (kill -9: its cleanup never ran). Only names of our own making (temp_prefix(path), random
    part, ".tmp") are touched. Call it only where no other process writes `path` (a run being
    resumed). Returns the paths removed."""
    d = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(temp_prefix(path)) + r"[A-Za-z0-9_]+\.tmp")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(d):
            if pattern.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(d, name))
                    removed.append(os.path.join(d, name))
    return removed


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
TEMP_SUFFIX_LEN = 8 + len(".tmp")   # mkstemp's random part and our suffix


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KiB" if n >= 2 ** 10 else f"{n} bytes"


def disk_full_error(path: str, needed: int | None = None) -> DiskFull:
    """The one-line error for a write that found no room: how much it needed (when known) and how
    much the file system has left."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        free = f", {_size(shutil.disk_usage(d).free)} free there"
    except OSError:
        free = ""
    need = f" ({_size(needed)} needed{free})" if needed is not None else (f" ({free[2:]})" if free else "")
    return DiskFull(f"disk full: cannot write {path}{need}")


def check_writable_dir(path: str, flag: str, names=()) -> None:
    """UserError (one line naming `flag`) unless `path` is a directory fastfat can write into, or
    can create, with the files `names` in it: checked before any work, so no work is lost to a bad
    output directory. Every path component must fit the file system's name limit; in a directory
    that exists, each name's temporary file (the atomic write's) is created and removed, so the
    real names are tried, and no name may be taken by a directory (the final rename would fail
    after the work). A name with a `*` ("*.png") is a pattern for names known only later (a
    report's tables): no directory there may match it. Nothing else is created here."""
    if not path or not path.strip():
        raise UserError(f"{flag}: empty path; give an output directory")
    p = os.path.abspath(path)
    probe = p
    while not os.path.exists(probe):      # the nearest existing ancestor must take the new dirs
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        what = "is a file, not a directory" if probe == p else f"cannot be created: {probe} is not a directory"
        raise UserError(f"{flag} {path} {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == p else f" (cannot create it in {probe})"
        raise UserError(f"{flag} {path} is not writable{where}")
    try:
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    parts = [c for c in os.path.relpath(p, probe).split(os.sep) if c not in ("", ".")]
    patterns = [n for n in names if "*" in n]
    names = [n for n in names if "*" not in n]
    parts += [temp_prefix(n) + "x" * TEMP_SUFFIX_LEN for n in names]
    for c in parts:
        if len(os.fsencode(c)) > name_max:
            raise UserError(f"{flag} {path}: a name in it is {len(os.fsencode(c))} bytes long, over "
                            f"this file system's limit of {name_max} bytes")
    longest = max([os.path.join(p, n) for n in names] + [p], key=lambda q: len(os.fsencode(q)))
    if len(os.fsencode(longest)) + TEMP_SUFFIX_LEN + 1 >= path_max:
        raise UserError(f"{flag} {path}: the path is too long ({len(os.fsencode(longest))} bytes; "
                        f"this system's limit is {path_max})")
    if probe == p:
        _check_names_not_dirs(p, path, flag, names, patterns)
        for n in names:   # the real names, as the atomic write will make them
            try:
                fd, tmp = tempfile.mkstemp(dir=p, prefix=temp_prefix(n), suffix=".tmp")
            except OSError as e:
                raise UserError(f"{flag} {path}: cannot create {n} there ({e.strerror})") from None
            os.close(fd)
            os.unlink(tmp)


def _check_names_not_dirs(p: str, path: str, flag: str, names, patterns) -> None:
    taken = [n for n in names if os.path.isdir(os.path.join(p, n))]
    if patterns:
        taken += sorted(e for e in os.listdir(p) if e not in names and os.path.isdir(os.path.join(p, e))
                        and any(fnmatch.fnmatch(e, pat) for pat in patterns))
    if taken:
        ext = os.path.splitext(taken[0])[1] or "plain"
        raise UserError(f"{flag} {path}: {taken[0]} is a directory, not a {ext} file (fastfat writes that "
                        f"name); move it or choose another {flag}")


@contextlib.contextmanager
def made_dirs(path: str):
    """Make the directory `path` (and its missing parents) for the block's files; if the block
    raises, the directories made here are removed again where they are empty, so a failed write
    leaves the tree as it was."""
    made, d = [], os.path.abspath(path)
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(path, exist_ok=True)
        yield path
    except BaseException:
        _rmdirs(made)
        raise


def _rmdirs(dirs: list[str]) -> None:
    for d in dirs:   # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, needed: int | None = None):
    """A temporary path beside `path` to write the file to: renamed onto `path` when the block
    ends normally, removed when it raises, so readers see the old file or the new one, never a
    part. A full disk (or quota) becomes one UserError saying so (disk_full_error; needed: the
    file's size in bytes, when known). For writers that want a path (FFCV); atomic_write_bytes is
    built on it."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        with made_dirs(d):   # a directory made for this file goes again if the file fails
            fd, tmp = tempfile.mkstemp(dir=d, prefix=temp_prefix(path), suffix=".tmp")
            os.close(fd)
            try:
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
                yield tmp
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(path, needed) from None
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write data to path atomically (atomic_path), synced to disk before the rename."""
    with atomic_path(path, len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def atomic_write_png(path: str, fig, **savefig_kwargs) -> None:
    """A matplotlib figure as a PNG file, atomically (rendered in memory, then written)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    atomic_write_bytes(path, buf.getvalue())


def _digest(state: dict) -> str:
    """SHA-256 over every entry (sorted keys; tensors by dtype, shape and bytes)."""
    h = hashlib.sha256()

    def feed(key: str, v):
        h.update(key.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                feed(f"{key}/{k}", v[k])
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                feed(f"{key}[{i}]", item)
        else:
            h.update(repr(v).encode())

    for k in sorted(state):
        if k != "digest":
            feed(k, state[k])
    return h.hexdigest()


def save_checkpoint(path: str, state: dict) -> None:
    """Atomically save a checkpoint dict (model, optimizer, epoch, config, ...) with its digest."""
    state = dict(state, format=FORMAT)
    state["digest"] = _digest(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


# What a training checkpoint holds (fastfat.train writes it): key -> type. "scaler" is optional.
CHECKPOINT_KEYS = {"model": dict, "optimizer": dict, "epoch": int, "config": dict, "log": list}


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load and verify a checkpoint written by save_checkpoint: its digest, then its structure
    (CHECKPOINT_KEYS); UserError if missing or bad."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():   # torch warns about a raw pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: not a valid fastfat checkpoint "
                        f"({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"cannot read checkpoint {path}: not a fastfat checkpoint")
    if state.get("digest") != _digest(state):
        raise UserError(f"checkpoint {path} failed its integrity check (altered or corrupted)")
    # A valid digest says the file is as some writer made it, not that it has every part.
    for key, kind in CHECKPOINT_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            problem = "lacks" if key not in state else "has a malformed"
            raise UserError(f"checkpoint {path} {problem} {key!r} entry: not a complete fastfat checkpoint")
    return state
