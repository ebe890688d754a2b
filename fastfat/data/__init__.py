"""Data: data sets as uint8 tensors (datasets; the (Fashion-)MNIST files in mnist and idx, SVHN's
and STL-10's in svhn_stl10), loaders that batch and augment them (loaders, and FFCV's in ffcv),
the choice between them (build), .beton conversion (convert), and the stratified draws: the
balanced training pool and the validation hold-out (split)."""
from .build import build_loader, choose_loader
from .datasets import DATASETS, DatasetInfo, ImageSet, dataset_info, load_dataset, make_synthetic
from .ffcv import beton_paths, ffcv_installed
from .loaders import EpochLoader, MemoryLoader, TorchvisionLoader, augment_batch

__all__ = ["build_loader", "choose_loader", "DATASETS", "DatasetInfo", "ImageSet", "dataset_info",
           "load_dataset", "make_synthetic", "beton_paths", "ffcv_installed", "EpochLoader",
           "MemoryLoader", "TorchvisionLoader", "augment_batch"]
