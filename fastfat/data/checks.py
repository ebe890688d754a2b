"""What every data loader checks of its files: that they hold images, that labels are whole numbers
in range, and that a failed download leaves nothing behind."""
from __future__ import annotations

import contextlib
import os

import numpy as np

from ..errors import UserError


def download_or_undo(name: str, root: str, fetch) -> None:
    """Run fetch() (torchvision's download into root); if it fails (offline, a refused proxy, a
    full disk), remove what it created under root, and root's new parents, leaving every file
    and folder that was there before, and raise one UserError line saying why."""
    made, d = [], os.path.abspath(root)
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    before = _tree(root)
    try:
        fetch()
    except Exception as e:   # offline, disk full, ...: say what failed, in one line
        for path in sorted(_tree(root) - before, key=len, reverse=True):   # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        for path in made:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise UserError(f"could not download {name} into {root}: {why or type(e).__name__}") from None


def _tree(root: str) -> set[str]:
    """Every path under root (root itself included when it exists)."""
    if not os.path.exists(root):
        return set()
    out = {os.path.abspath(root)}
    for d, dirs, files in os.walk(root):
        out.update(os.path.abspath(os.path.join(d, n)) for n in dirs + files)
    return out


def require_images(n: int, path: str, split: str) -> None:
    """UserError "no {split} images in {path}" for a data file holding none (split: training |
    test): every loader calls it, so an empty file never trains to "loss 0" or evaluates to []."""
    if n == 0:
        raise UserError(f"no {split} images in {path}")


def whole_labels(path: str, y, low: int, high: int, note: str = "") -> np.ndarray:
    """y (any array-like) as int64 [N] when every label is a whole number in low..high; else a
    UserError naming the file and the first bad label (a NaN, a string, 1.5, 11: never truncated
    or trained on). note: how the file's labels map to classes, for the message."""
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind in "iu":
        bad = (y < low) | (y > high)
    elif y.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(y) | (y != np.round(y)) | (y < low) | (y > high)
    else:   # strings, objects, booleans
        bad = np.ones(y.shape, bool)
    if bad.any():
        raise UserError(f"cannot read {path}: labels must be whole numbers {low}..{high}{note}, found "
                        f"{y[np.argmax(bad)].item()!r} ({y.dtype})")
    return y.astype(np.int64)
