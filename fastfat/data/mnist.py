"""MNIST and Fashion-MNIST: where their four idx files are looked up, and reading them.

Looked up, in order: under data_root in torchvision's layout (<root>/FashionMNIST/raw/,
<root>/MNIST/raw/, so a folder torchvision downloaded works as it is); for Fashion-MNIST, the
folder Debian's package dataset-fashion-mnist installs (/usr/share/datasets/fashion-mnist/);
else, with download=True, fetched by torchvision's own dataset class into data_root. Each file
may be gzipped or not (name with or without .gz).
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import UserError
from .checks import download_or_undo as _download, require_images
from .idx import read_idx_pair

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# name -> (torchvision's folder under data_root, its dataset class, system folders)
SOURCES = {
    "fashion-mnist": ("FashionMNIST", "FashionMNIST", ("/usr/share/datasets/fashion-mnist",)),
    "mnist": ("MNIST", "MNIST", ()),
}
APT_HINT = {"fashion-mnist": "apt-get install dataset-fashion-mnist, "}


def _find(folder: str) -> list[str | None]:
    """Each of FILES in folder (the plain name first, then .gz), None where absent."""
    found = []
    for f in FILES:
        paths = [p for p in (os.path.join(folder, f), os.path.join(folder, f + ".gz")) if os.path.isfile(p)]
        found.append(paths[0] if paths else None)
    return found


def locate(name: str, root: str, download: bool) -> list[str]:
    """The four files' paths (train images, train labels, test images, test labels); UserError
    naming what is missing and both routes to get it."""
    sub, cls, system = SOURCES[name]
    mine = os.path.join(root, sub, "raw")
    found = _find(mine)
    if any(found) and not all(found):   # a partial copy under data_root is a mistake to report
        missing = [f for f, p in zip(FILES, found) if p is None]
        raise UserError(f"{name} files missing in {mine}: {', '.join(missing)} (with or without .gz)")
    if all(found):
        return found
    for folder in system:
        found = _find(folder)
        if all(found):
            return found
    if download:
        import torchvision   # only needed to fetch the files
        _download(name, root, lambda: getattr(torchvision.datasets, cls)(root=root, train=True, download=True))
        found = _find(mine)
        if all(found):
            return found
    places = [mine] + list(system)
    raise UserError(f"{name} not found (looked in {', '.join(places)}): "
                    f"{APT_HINT.get(name, '')}or pass --download to fetch it with torchvision, "
                    f"or --data-root to point at a folder holding {sub}/raw/")


def read_mnist(name: str, root: str, download: bool, num_classes: int = 10
               ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images uint8 [N,1,28,28], labels int64 [N]), (test ...)); UserError for a bad file
    or files that disagree."""
    tri, trl, tei, tel = locate(name, root, download)
    train, test = read_idx_pair(tri, trl, 28, num_classes), read_idx_pair(tei, tel, 28, num_classes)
    require_images(len(train[0]), tri, "training")
    require_images(len(test[0]), tei, "test")
    return train, test
