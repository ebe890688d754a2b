"""Loaders over an in-memory ImageSet: MemoryLoader (the whole set on the device, augmented in
batch there, airbench's way) and TorchvisionLoader (a torch DataLoader with per-sample PIL
transforms, the authors' data path, used by the reference). Both yield (x float32
[B, C, H, W] in [0, 1], y int64 [B]); MemoryLoader's x is channels_last unless asked otherwise.
"""
from __future__ import annotations

import torch

from ..seeding import epoch_generator, sample_seed
from .datasets import ImageSet


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


class EpochLoader:
    """What every loader shares: an epoch set by set_epoch (it seeds the order and augmentation)
    and a length in batches from num_samples, batch_size and drop_last."""
    num_samples: int
    batch_size: int
    drop_last: bool
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class MemoryLoader(EpochLoader):
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
        self.num_samples = len(self.data)

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
            # augment_batch returns channels_last; NCHW when asked (MemoryLoader(channels_last=False))
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last
                             else torch.contiguous_format)
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
            torch.manual_seed(sample_seed(self.epoch_seed, i))
            x = self.transform(img)
        return x, int(self.y[i])


class TorchvisionLoader(EpochLoader):
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
        self.num_samples = len(self.dataset)

    def __iter__(self):
        g = epoch_generator(self.seed, self.epoch, "cpu")
        self.dataset.epoch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.train,
                                         generator=g, num_workers=self.num_workers,
                                         drop_last=self.drop_last)
        for x, y in dl:
            yield x.to(self.device), y.to(self.device)
