"""Models fastfat did not write: `--model FILE.py:Name` or `--model package.module:Name`.

Name is a class or function in that file or module; it is called with the keyword arguments
num_classes, in_channels (and width, when given) that its signature accepts, and must return an
nn.Module taking [N, in_channels, H, W] images in [0, 1] and returning logits [N, num_classes].
A file's spec is kept with its absolute path; checkpoints record the spec and the sha256 of the
file that defined it (source_record), so evaluation and resume rebuild the same model and say
when the file has changed since (check_source).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys

import torch.nn as nn

from ..errors import UserError


def is_spec(name) -> bool:
    """Whether a --model value names user code (FILE.py:Name or package.module:Name)."""
    return isinstance(name, str) and ":" in name and not name.startswith(":")


def _split(spec: str) -> tuple[str, str]:
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise UserError(f"--model {spec!r}: expected FILE.py:Name or package.module:Name")
    return where, attr


def _is_file(where: str) -> bool:
    return where.endswith(".py") or os.sep in where or "/" in where


def canonical_spec(spec: str) -> str:
    """The spec with its file made absolute; UserError if the file or module does not exist or
    lacks the name (the module is imported to check)."""
    where, attr = _split(spec.strip())
    if _is_file(where):
        where = os.path.abspath(os.path.expanduser(where))
    _lookup(where, attr, spec)
    return f"{where}:{attr}"


def _load_module(where: str, spec: str):
    if not _is_file(where):
        try:
            return importlib.import_module(where)
        except ImportError as e:
            raise UserError(f"--model {spec}: cannot import {where} ({e})") from None
    if not os.path.isfile(where):
        raise UserError(f"--model {spec}: no such file {os.path.abspath(where)}")
    digest = file_digest(where)
    name = f"fastfat_user_{digest[:12]}_{os.path.splitext(os.path.basename(where))[0]}"
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.util.spec_from_file_location(name, where)
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as e:   # the user's file failed to run: one line saying why
        del sys.modules[name]
        raise UserError(f"--model {spec}: {where} failed to import: {type(e).__name__}: {e}") from None
    return module


def _lookup(where: str, attr: str, spec: str):
    module = _load_module(where, spec)
    if not hasattr(module, attr):
        raise UserError(f"--model {spec}: {where} has no {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise UserError(f"--model {spec}: {attr} is a {type(fn).__name__}, not a class or function")
    return fn


def build_user_model(spec: str, num_classes: int, in_channels: int, width: int | None = None) -> nn.Module:
    """spec's model: Name(num_classes=..., in_channels=..., [width=...]) with the arguments its
    signature accepts; UserError if it raises or returns no nn.Module."""
    where, attr = _split(spec)
    fn = _lookup(where, attr, spec)
    offered = {"num_classes": num_classes, "in_channels": in_channels}
    if width is not None:
        offered["width"] = width
    try:
        params = inspect.signature(fn).parameters
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kwargs = offered
        else:
            kwargs = {k: v for k, v in offered.items() if k in params}
    except (TypeError, ValueError):   # no signature (a builtin): offer nothing
        kwargs = {}
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise UserError(f"--model {spec}: {attr}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) raised "
                        f"{type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec}: {attr}(...) returned a {type(model).__name__}, not a torch nn.Module")
    return model


def file_digest(path: str) -> str:
    """sha256 (hex) of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _source_path(spec: str) -> str | None:
    where, _ = _split(spec)
    if _is_file(where):
        return where
    found = importlib.util.find_spec(where)
    return found.origin if found is not None and found.origin and os.path.isfile(found.origin) else None


def source_record(spec: str) -> dict:
    """What a checkpoint records of a user model: {"spec", "file", "sha256"}."""
    path = _source_path(spec)
    return {"spec": spec, "file": path, "sha256": file_digest(path) if path else None}


def check_source(record: dict | None, spec: str, what: str) -> str | None:
    """A one-line note when the file defining spec changed since `record` was written (its sha256
    differs or it is gone), else None. what: the checkpoint, for the note."""
    if not record or not record.get("sha256"):
        return None
    path = _source_path(spec)
    now = file_digest(path) if path and os.path.isfile(path) else None
    if now == record["sha256"]:
        return None
    state = "is gone" if now is None else f"changed (sha256 {record['sha256'][:12]} then, {now[:12]} now)"
    return f"{record.get('file') or spec}, which defines the model of {what}, {state} since it was written"


def model_label(name: str) -> str:
    """A short file-name-safe label of a model name: a user model's FILE stem (or module) and Name
    ("my-models-Net": no "_", which separates a point key's fields), fastfat's own names as they are."""
    if not is_spec(name):
        return name
    where, attr = _split(name)
    stem = os.path.splitext(os.path.basename(where))[0] if _is_file(where) else where
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in f"{stem}-{attr}")


def anchored(name, base: str):
    """A user model's relative FILE.py:Name taken relative to `base` (a sweep file's directory);
    anything else as it is."""
    if not is_spec(name):
        return name
    where, attr = _split(name)
    if _is_file(where) and not os.path.isabs(os.path.expanduser(where)):
        return f"{os.path.join(base, where)}:{attr}"
    return name
