"""Data sets as uint8 tensors (`ImageSet`): CIFAR-10/100 read from torchvision's on-disk format,
MNIST and Fashion-MNIST (mnist.py), SVHN and STL-10 (svhn_stl10.py), scikit-learn's bundled
digits, and a synthetic set for tests; `DatasetInfo` holds their shapes.

CIFAR files are read straight from torchvision's on-disk format (the python pickle batches), so
torchvision downloads them when asked and tests can fabricate files in the same format. They are
unpickled by a restricted unpickler (`read_cifar_batch`): a batch file from an untrusted
--data-root cannot run code.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from .checks import download_or_undo, require_images, whole_labels


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set: shapes and the augmentation it is trained with."""
    name: str
    num_classes: int
    channels: int
    size: int          # images are size x size
    crop_pad: int      # RandomCrop padding used for training
    flip: bool         # horizontal flip is label-preserving for this data
    classes: tuple[str, ...] = ()   # class names by label, where the data set names them


DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, 4, True,
                           ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                            "ship", "truck")),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, 4, True),
    # Digits are 8x8: a 4-pixel shift would move half the digit out; mirrored digits change meaning.
    "digits": DatasetInfo("digits", 10, 1, 8, 1, False),
    # 28x28 grey: a 2-pixel shift keeps the object in the frame; a mirrored garment is the same
    # garment, a mirrored digit is not.
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, 2, True,
                                 ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                                  "shirt", "sneaker", "bag", "ankle boot")),
    "mnist": DatasetInfo("mnist", 10, 1, 28, 2, False),
    "svhn": DatasetInfo("svhn", 10, 3, 32, 4, False),
    # STL-10's labelled 96x96 images, padded by 4 for cropping and flipped, as DAFA trains them
    "stl10": DatasetInfo("stl10", 10, 3, 96, 4, True,
                         ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                          "truck")),
    "synthetic": DatasetInfo("synthetic", 10, 3, 16, 2, True),
}


def dataset_info(name: str) -> DatasetInfo:
    """DatasetInfo for a data set name; UserError naming the choices if unknown."""
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}") from None


@dataclass
class ImageSet:
    """A labelled image set held as tensors: images uint8 [N, C, H, W], labels int64 [N]."""
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return self.labels.numel()

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device), self.num_classes)

    def subset(self, n: int | None) -> "ImageSet":
        """The first n samples (all when n is None)."""
        if n is None or n >= len(self):
            return self
        return ImageSet(self.images[:n], self.labels[:n], self.num_classes)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What protocol-2 pickles written by Python 3 call to rebuild bytes (_codecs.encode(s,
    "latin1")); any other codec is refused."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


# Every global a CIFAR batch pickle may name. The original files (Python 2, numpy 1.x) hold a
# dict of bytes/str, lists of ints and bytes, and one uint8 array rebuilt by
# numpy.core.multiarray._reconstruct(numpy.ndarray, ..., numpy.dtype); numpy 2 writes the module
# as numpy._core; protocol 5 (Python 3.14's default) rebuilds arrays with numeric._frombuffer.
# Resolved here to the running numpy's own functions, so numpy.core (deprecated) is never imported.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
    ("numpy.core.numeric", "_frombuffer"): np.zeros(0).__reduce_ex__(5)[0],
    ("numpy._core.numeric", "_frombuffer"): np.zeros(0).__reduce_ex__(5)[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR batch holds (dict, list, bytes, str, int and
    numpy arrays): any other global (a callable a malicious pickle would run) is refused."""

    def find_class(self, module, name):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def read_cifar_batch(path: str) -> dict:
    """The dict in one CIFAR batch file (keys as bytes, as torchvision reads them); UserError,
    in one line, for a file that is not a CIFAR batch or names anything a batch does not hold."""
    try:
        with open(path, "rb") as fh:
            d = _CifarUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise UserError(f"cannot read {path}: not a CIFAR batch file ({e}; not loaded)") from None
    except Exception as e:
        raise UserError(f"cannot read {path}: not a CIFAR batch file ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise UserError(f"cannot read {path}: not a CIFAR batch file (holds a {type(d).__name__})")
    return d


_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _read_cifar(name: str, root: str, download: bool) -> tuple[ImageSet, ImageSet]:
    folder, train_files, test_files, label_key = _CIFAR_FILES[name]
    base = os.path.join(root, folder)
    missing = [f for f in train_files + test_files if not os.path.isfile(os.path.join(base, f))]
    if missing and download:
        import torchvision  # only needed to fetch the files
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        download_or_undo(name, root, lambda: cls(root=root, train=True, download=True))
        missing = [f for f in train_files + test_files if not os.path.isfile(os.path.join(base, f))]
    if missing:
        raise UserError(f"{name} files missing in {base}: {', '.join(missing)} "
                        f"(pass --download to fetch them, or --data-root to point at them)")

    def read(files, split):
        xs, ys = [], []
        for f in files:
            path = os.path.join(base, f)
            d = read_cifar_batch(path)
            try:
                x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(d[label_key])
            except Exception as e:
                raise UserError(f"cannot read {path}: not a CIFAR batch file ({type(e).__name__})") from None
            require_images(len(x), path, split)
            if len(x) != len(y):
                raise UserError(f"cannot read {path}: {len(x)} images but {len(y)} labels")
            classes = DATASETS[name].num_classes
            if y.dtype.kind in "iu" and (int(y.min()) < 0 or int(y.max()) >= classes):
                bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
                raise UserError(f"cannot read {path}: not a valid CIFAR batch (label {bad} is "
                                f"outside 0..{classes - 1})")
            y = whole_labels(path, y, 0, classes - 1)
            xs.append(x)
            ys.append(y)
        return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                        DATASETS[name].num_classes)

    return read(train_files, "training"), read(test_files, "test")


DIGITS_TRAIN = 1300  # the rest (497) is the test split


def _load_digits() -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 grey levels -> 0..255, so the digits go through the same uint8 path as CIFAR.
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(y))  # fixed, seeded split
    tr, te = perm[:DIGITS_TRAIN], perm[DIGITS_TRAIN:]
    mk = lambda idx: ImageSet(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]), 10)
    return mk(tr), mk(te)


def make_synthetic(n_train: int = 500, n_test: int = 200, seed: int = 0,
                   info: DatasetInfo = DATASETS["synthetic"]) -> tuple[ImageSet, ImageSet]:
    """A tiny learnable set for tests: one random template per class plus pixel noise, uint8."""
    g = torch.Generator().manual_seed(seed)
    shape = (info.channels, info.size, info.size)
    templates = torch.rand((info.num_classes, *shape), generator=g)

    def draw(n):
        y = torch.arange(n) % info.num_classes
        y = y[torch.randperm(n, generator=g)]
        x = 0.6 * templates[y] + 0.4 * torch.rand((n, *shape), generator=g)
        return ImageSet((x * 255).round().to(torch.uint8), y, info.num_classes)

    return draw(n_train), draw(n_test)


def _from_arrays(pair, num_classes: int) -> ImageSet:
    x, y = pair
    return ImageSet(torch.from_numpy(x), torch.from_numpy(y), num_classes)


def load_dataset(name: str, root: str = "data", download: bool = False) -> tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets for any name in DATASETS, on the CPU (images uint8 [N, C, H, W])."""
    info = dataset_info(name)
    if info.name in _CIFAR_FILES:
        return _read_cifar(info.name, root, download)
    if info.name in ("fashion-mnist", "mnist", "svhn", "stl10"):
        from .mnist import read_mnist
        from .svhn_stl10 import read_stl10, read_svhn
        if info.name == "svhn":
            tr, te = read_svhn(root, download)
        elif info.name == "stl10":
            tr, te = read_stl10(root, download)
        else:
            tr, te = read_mnist(info.name, root, download, info.num_classes)
        return _from_arrays(tr, info.num_classes), _from_arrays(te, info.num_classes)
    if info.name == "digits":
        return _load_digits()
    return make_synthetic()
