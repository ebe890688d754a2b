"""SVHN and STL-10 read from the files torchvision downloads, in torchvision's layout and label
mapping; torchvision itself fetches them with download=True.

The files are read here rather than through torchvision's classes, which refuse any file whose
md5 differs from the published one (so tests could not make small files in the same format):
- SVHN: <root>/train_32x32.mat and test_32x32.mat (MATLAB v5: X uint8 [32, 32, 3, N], y [N, 1]
  with 1..10, where 10 is the digit 0; torchvision maps 10 -> 0, as here);
- STL-10: <root>/stl10_binary/{train,test}_{X,y}.bin (X: N x 3 x 96 x 96 bytes, each image
  stored column-major, so transposed as torchvision does; y: one byte 1..10 per image, minus 1).
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import UserError
from .checks import download_or_undo as _download, require_images, whole_labels

SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
STL10_DIR = "stl10_binary"
STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")


def _ensure(name: str, paths: list[str], root: str, download: bool, fetch) -> None:
    """UserError naming the missing files (or a failed download); fetch() downloads them."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing and download:
        _download(name, root, fetch)
        missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{name} files missing: {', '.join(missing)} (pass --download to fetch them "
                        f"with torchvision, or --data-root to point at them)")


def _check_labels(path: str, y: np.ndarray, n_images: int, low: int, high: int, note: str = "") -> np.ndarray:
    """y as int64 when it has one whole-number label in low..high per image; UserError otherwise."""
    if len(y) != n_images:
        raise UserError(f"cannot read {path}: {n_images} images but {len(y)} labels")
    return whole_labels(path, y, low, high, note)


def _read_svhn_mat(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        m = scipy.io.loadmat(path)
        x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1)
    except Exception as e:   # not a .mat, or no X / y in it
        raise UserError(f"cannot read {path}: not an SVHN .mat file ({type(e).__name__})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise UserError(f"cannot read {path}: X must be uint8 32x32x3xN, found {x.dtype} {x.shape}")
    require_images(x.shape[3], path, split)
    y = _check_labels(path, y, x.shape[3], 1, 10, " (10 is the digit 0, mapped to 0 as torchvision does)")
    # [H, W, C, N] -> [N, C, H, W]; label 10 is the digit 0 (torchvision's mapping)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10


def read_svhn(root: str, download: bool):
    """((train images uint8 [N,3,32,32], labels int64 [N]), (test ...)) from torchvision's files."""
    paths = [os.path.join(root, f) for f in SVHN_FILES]

    def fetch():
        import torchvision
        for split in ("train", "test"):
            torchvision.datasets.SVHN(root=root, split=split, download=True)

    _ensure("svhn", paths, root, download, fetch)
    return _read_svhn_mat(paths[0], "training"), _read_svhn_mat(paths[1], "test")


def _read_stl10_split(base: str, split: str):
    xp, yp = os.path.join(base, f"{split}_X.bin"), os.path.join(base, f"{split}_y.bin")
    x = np.fromfile(xp, dtype=np.uint8)
    per = 3 * 96 * 96
    if x.size % per:
        raise UserError(f"cannot read {xp}: {x.size} bytes is not a whole number of 3x96x96 images")
    x = x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)   # stored column-major
    require_images(len(x), xp, "training" if split == "train" else "test")
    y = np.fromfile(yp, dtype=np.uint8)
    y = _check_labels(yp, y, len(x), 1, 10, " (1 is class 0, as torchvision reads them)")
    return np.ascontiguousarray(x), y - 1


def read_stl10(root: str, download: bool):
    """((train images uint8 [5000,3,96,96], labels int64 0..9), (test ...)): the labelled splits."""
    base = os.path.join(root, STL10_DIR)
    paths = [os.path.join(base, f) for f in STL10_FILES]

    def fetch():
        import torchvision
        torchvision.datasets.STL10(root=root, split="train", download=True)

    _ensure("stl10", paths, root, download, fetch)
    return _read_stl10_split(base, "train"), _read_stl10_split(base, "test")
