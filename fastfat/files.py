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
import hashlib
import io
import json
import os
import re
import tempfile

import torch

from .errors import UserError

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


def check_writable_dir(path: str, flag: str) -> None:
    """UserError (one line naming `flag`) unless `path` is a directory fastfat can write into, or
    can create: checked before any work, so no work is lost to a bad output directory. Nothing is
    created here."""
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary path beside `path` to write the file to: renamed onto `path` when the block
    ends normally, removed when it raises, so readers see the old file or the new one, never a
    part. For writers that want a path (FFCV); atomic_write_bytes is built on it."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
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


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write data to path atomically (atomic_path), synced to disk before the rename."""
    with atomic_path(path) as tmp:
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
