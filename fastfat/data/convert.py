"""`fastfat data convert` and `check` as library calls: FFCV .beton files for a data set.

convert reads what load_dataset reads (any data set fastfat knows: CIFAR, (Fashion-)MNIST, SVHN,
STL-10 from their files, or the bundled digits) and writes OUT/<name>_train.beton and OUT/<name>_test.beton (beton_paths), raw pixels,
so the FFCV loader serves exactly the images the memory loader serves. check validates both
files of a data set the way the FFCV loader does before training.
"""
from __future__ import annotations

import os

from ..errors import UserError
from ..files import check_writable_dir, made_dirs
from .datasets import dataset_info, load_dataset
from .ffcv import BetonInfo, beton_paths, check_beton, require_ffcv, write_betons


def convert(dataset: str, out: str, *, data_root: str = "data", download: bool = False,
            force: bool = False, workers: int = 1) -> list[tuple[str, BetonInfo]]:
    """Write the data set's train and test .beton files into `out`; returns each path with what
    reading it back found. Everything is checked before anything is written."""
    info = dataset_info(dataset)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    require_ffcv("fastfat data convert")
    paths = beton_paths(out, info.name)
    check_writable_dir(out, "--out", [os.path.basename(p) for p in paths])
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise UserError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")
    folders = [p for p in existing if os.path.isdir(p)]
    if folders:   # --force replaces files; a directory in a file's place would stop it half-way
        raise UserError(f"{', '.join(folders)} is a directory, not a .beton file; "
                        f"--force replaces files only: move it away or choose another --out")
    train, test = load_dataset(info.name, data_root, download)
    with made_dirs(out):   # a directory made for a pair that could not be written goes again
        write_betons([(paths[0], train), (paths[1], test)], num_workers=workers)
    return [(p, check_beton(p, info)) for p in paths]   # read back, as the loader will


def check(dataset: str, data_root: str = "data") -> list[tuple[str, BetonInfo]]:
    """Validate a data set's two .beton files under data_root; UserError on the first bad one."""
    info = dataset_info(dataset)
    require_ffcv("fastfat data check")
    return [(p, check_beton(p, info)) for p in beton_paths(data_root, info.name)]
