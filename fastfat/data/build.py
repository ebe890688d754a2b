"""Choosing and building a loader: --loader auto | memory | torchvision | ffcv."""
from __future__ import annotations

import os

from ..errors import UserError
from .datasets import ImageSet, dataset_info, load_dataset
from .ffcv import FFCVLoader, beton_paths, ffcv_installed
from .loaders import MemoryLoader, TorchvisionLoader
from .split import first_per_class


def choose_loader(kind: str, data_root: str, dataset: str) -> str:
    """Resolve 'auto' (ffcv if installed and converted, else memory); check an explicit 'ffcv'."""
    if kind == "auto":
        # the files first: importing ffcv costs seconds (numba), wasted when nothing is converted
        have = all(os.path.isfile(p) for p in beton_paths(data_root, dataset)) and ffcv_installed()
        return "ffcv" if have else "memory"
    if kind == "ffcv":
        if not ffcv_installed():
            raise UserError("--loader ffcv: the ffcv package is not installed "
                            "(pip install 'fastfat[ffcv]', after apt-get install libopencv-dev "
                            "libturbojpeg0-dev pkg-config)")
        missing = [p for p in beton_paths(data_root, dataset) if not os.path.isfile(p)]
        if missing:
            raise UserError(f"--loader ffcv: missing {', '.join(missing)} "
                            f"(run: fastfat data convert --dataset {dataset} --out {data_root})")
    return kind


def build_loader(kind: str, dataset: str, split: str, *, data_root: str = "data",
                 download: bool = False, batch_size: int, seed: int = 0, device="cpu",
                 crop_pad: int | None = None, flip: bool | None = None, channels_last: bool = True,
                 drop_last: bool = False, limit: int | None = None, num_workers: int = 0,
                 data: ImageSet | None = None, per_class: int | None = None):
    """One loader for split 'train' (shuffled, augmented) or 'test' (sequential, plain).

    kind: auto | memory | torchvision | ffcv. crop_pad / flip default to the data set's.
    `data` may pass an already loaded ImageSet (memory and torchvision loaders). limit keeps the
    first `limit` samples; per_class the first `per_class` of every class (not with ffcv, whose
    files are read in order without their labels; auto then picks memory).
    """
    info = dataset_info(dataset)
    if per_class is not None:
        if kind == "ffcv":
            raise UserError("test_per_class needs the memory or torchvision loader, not ffcv")
        kind = "memory" if kind == "auto" else kind
    kind = choose_loader(kind, data_root, info.name)
    train = split == "train"
    pad = info.crop_pad if crop_pad is None else crop_pad
    flp = info.flip if flip is None else flip
    if kind == "ffcv":
        path = beton_paths(data_root, info.name)[0 if train else 1]
        return FFCVLoader(path, batch_size=batch_size, train=train, seed=seed, device=device,
                          crop_pad=pad if train else 0, flip=flp and train,
                          channels_last=channels_last, drop_last=drop_last and train,
                          limit=limit, info=info)
    if data is None:
        tr, te = load_dataset(info.name, data_root, download)
        data = tr if train else te
    data = data.subset(limit) if per_class is None else first_per_class(data, per_class)
    if kind == "torchvision":
        return TorchvisionLoader(data, batch_size, train, seed=seed, crop_pad=pad if train else 0,
                                 flip=flp and train, num_workers=num_workers, device=device,
                                 drop_last=drop_last and train)
    return MemoryLoader(data, batch_size, train, seed=seed, device=device,
                        crop_pad=pad if train else 0, flip=flp and train,
                        channels_last=channels_last, drop_last=drop_last and train)
