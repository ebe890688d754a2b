"""Data sets and loaders.

Data sets come in as uint8 NCHW tensors (`ImageSet`). The default loader (`MemoryLoader`) keeps a
whole set on the device and augments in batch there (random crop with zero padding, horizontal
flip), airbench's way; `TorchvisionLoader` is the classic torch DataLoader with per-sample PIL
transforms, kept as an option and used by the reference implementation. Both yield
(x float32 [B, C, H, W] in [0, 1], y int64 [B]); MemoryLoader's x is channels_last.

CIFAR files are read straight from torchvision's on-disk format (the python pickle batches), so
torchvision downloads them when asked and tests can fabricate files in the same format.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set: shapes and the augmentation it is trained with."""
    name: str
    num_classes: int
    channels: int
    size: int          # images are size x size
    crop_pad: int      # RandomCrop padding used for training
    flip: bool         # horizontal flip is label-preserving for this data


DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, 4, True),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, 4, True),
    # Digits are 8x8: a 4-pixel shift would move half the digit out; mirrored digits change meaning.
    "digits": DatasetInfo("digits", 10, 1, 8, 1, False),
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
        try:
            cls(root=root, train=True, download=True)
        except Exception as e:  # offline, disk full, ...: say what failed, in one line
            raise UserError(f"could not download {name} into {root}: {e}") from None
        missing = [f for f in train_files + test_files if not os.path.isfile(os.path.join(base, f))]
    if missing:
        raise UserError(f"{name} files missing in {base}: {', '.join(missing)} "
                        f"(pass --download to fetch them, or --data-root to point at them)")

    def read(files):
        xs, ys = [], []
        for f in files:
            path = os.path.join(base, f)
            try:
                with open(path, "rb") as fh:
                    d = pickle.load(fh, encoding="bytes")
                x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(d[label_key], dtype=np.int64)
            except Exception as e:
                raise UserError(f"cannot read {path}: not a CIFAR batch file ({type(e).__name__})") from None
            if len(x) != len(y):
                raise UserError(f"cannot read {path}: {len(x)} images but {len(y)} labels")
            xs.append(x)
            ys.append(y)
        return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                        DATASETS[name].num_classes)

    return read(train_files), read(test_files)


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


def load_dataset(name: str, root: str = "data", download: bool = False) -> tuple[ImageSet, ImageSet]:
    """(train, test) ImageSets for cifar10 | cifar100 | digits | synthetic, on the CPU."""
    info = dataset_info(name)
    if info.name in _CIFAR_FILES:
        return _read_cifar(info.name, root, download)
    if info.name == "digits":
        return _load_digits()
    return make_synthetic()


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

STREAMS = {"data": 0, "attack": 1}


def epoch_generator(seed: int, epoch: int, device, stream: str = "data") -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch, stream): resuming at epoch k
    replays it. stream "data" orders and augments the batches; "attack" draws the training
    attack's start noise, so the two never reuse each other's random numbers."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch) * 2 + STREAMS[stream])
    return g


def augment_batch(x: torch.Tensor, pad: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding `pad` and random horizontal flip, in batch.

    x uint8 or float [B, C, H, W] -> same dtype [B, C, H, W] in channels_last memory layout.
    Equivalent per sample to torchvision RandomCrop(H, padding=pad) + RandomHorizontalFlip().
    """
    b, c, h, w = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]   # [B, H, 1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]   # [B, 1, W]
        # Advanced indexing on dims 0, 2, 3 gives [B, H, W, C]: channels_last once permuted.
        x = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        m = torch.rand(b, generator=g, device=x.device) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x.contiguous(memory_format=torch.channels_last)


class MemoryLoader:
    """Batches from a device-resident uint8 ImageSet, augmented on the device.

    train=True: a seeded shuffle and crop/flip, reproducible per (seed, epoch) via set_epoch;
    train=False: sequential order, no augmentation. Yields (x float32 [B,C,H,W] in [0,1], y int64),
    x channels_last when channels_last=True. drop_last is off unless asked.
    """

    def __init__(self, data: ImageSet, batch_size: int, train: bool, *, seed: int = 0,
                 device="cpu", crop_pad: int = 0, flip: bool = False, channels_last: bool = True,
                 drop_last: bool = False):
        self.data = data.to(device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.device, self.crop_pad, self.flip = torch.device(device), crop_pad, flip
        self.channels_last, self.drop_last = channels_last, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.data)
        if self.train:
            g = epoch_generator(self.seed, self.epoch, self.device)
            order = torch.randperm(n, generator=g, device=self.device)
        else:
            order = None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            idx = order[sl] if order is not None else sl
            x, y = self.data.images[idx], self.data.labels[idx]
            if self.train and (self.crop_pad or self.flip):
                x = augment_batch(x, self.crop_pad, self.flip, g)
            x = x.float().div_(255.0)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


class _PILDataset(torch.utils.data.Dataset):
    """Per-sample PIL images from a uint8 ImageSet, the way torchvision's CIFAR10 serves them."""

    def __init__(self, data: ImageSet, transform):
        self.x = data.images.permute(0, 2, 3, 1).numpy()  # HWC, as PIL wants
        self.y = data.labels.numpy()
        self.transform = transform
        self.epoch_seed = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        img = self.x[i]
        img = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        # torchvision's random transforms draw from the global RNG: give each sample its own
        # seeded stream so that the epoch replays exactly and the caller's RNG is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.epoch_seed * 1_000_003 + i)
            x = self.transform(img)
        return x, int(self.y[i])


class TorchvisionLoader:
    """A torch DataLoader with per-sample torchvision transforms (the authors' data path).

    Yields (x float32 NCHW [B,C,H,W] in [0,1], y int64). train=True shuffles with a generator
    seeded per (seed, epoch) and applies RandomCrop(pad) + RandomHorizontalFlip.
    """

    def __init__(self, data: ImageSet, batch_size: int, train: bool, *, seed: int = 0,
                 crop_pad: int = 0, flip: bool = False, num_workers: int = 0, device="cpu",
                 drop_last: bool = False):
        import torchvision.transforms as T
        ops = []
        if train and crop_pad:
            ops.append(T.RandomCrop(data.images.shape[-1], padding=crop_pad))
        if train and flip:
            ops.append(T.RandomHorizontalFlip())
        ops.append(T.ToTensor())
        self.dataset = _PILDataset(data, T.Compose(ops))
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.num_workers, self.device, self.drop_last = num_workers, torch.device(device), drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        g = epoch_generator(self.seed, self.epoch, "cpu")
        self.dataset.epoch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.train,
                                         generator=g, num_workers=self.num_workers,
                                         drop_last=self.drop_last)
        for x, y in dl:
            yield x.to(self.device), y.to(self.device)


# ---------------------------------------------------------------------------------------------
# Selection: --loader auto | memory | torchvision | ffcv
# ---------------------------------------------------------------------------------------------

def beton_paths(data_root: str, dataset: str) -> tuple[str, str]:
    """Where `fastfat data convert` puts a data set's FFCV files: DATA_ROOT/<name>_{train,test}.beton."""
    return (os.path.join(data_root, f"{dataset}_train.beton"),
            os.path.join(data_root, f"{dataset}_test.beton"))


def ffcv_installed() -> bool:
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
    except Exception:  # ImportError, or a broken native build
        return False
    finally:
        torch.set_num_threads(threads)  # importing ffcv sets torch to one thread
    return True


def choose_loader(kind: str, data_root: str, dataset: str) -> str:
    """Resolve 'auto' (ffcv if installed and converted, else memory); check an explicit 'ffcv'."""
    if kind == "auto":
        have = ffcv_installed() and all(os.path.isfile(p) for p in beton_paths(data_root, dataset))
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
                 data: ImageSet | None = None):
    """One loader for split 'train' (shuffled, augmented) or 'test' (sequential, plain).

    kind: auto | memory | torchvision | ffcv. crop_pad / flip default to the data set's.
    `data` may pass an already loaded ImageSet (memory and torchvision loaders).
    """
    info = dataset_info(dataset)
    kind = choose_loader(kind, data_root, info.name)
    train = split == "train"
    pad = info.crop_pad if crop_pad is None else crop_pad
    flp = info.flip if flip is None else flip
    if kind == "ffcv":
        from .ffcv_data import FFCVLoader
        path = beton_paths(data_root, info.name)[0 if train else 1]
        return FFCVLoader(path, batch_size=batch_size, train=train, seed=seed, device=device,
                          crop_pad=pad if train else 0, flip=flp and train,
                          channels_last=channels_last, drop_last=drop_last and train,
                          limit=limit, info=info)
    if data is None:
        tr, te = load_dataset(info.name, data_root, download)
        data = tr if train else te
    data = data.subset(limit)
    if kind == "torchvision":
        return TorchvisionLoader(data, batch_size, train, seed=seed, crop_pad=pad if train else 0,
                                 flip=flp and train, num_workers=num_workers, device=device,
                                 drop_last=drop_last and train)
    return MemoryLoader(data, batch_size, train, seed=seed, device=device,
                        crop_pad=pad if train else 0, flip=flp and train,
                        channels_last=channels_last, drop_last=drop_last and train)
