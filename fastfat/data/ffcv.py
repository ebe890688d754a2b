"""FFCV data path: .beton files written by `fastfat data convert`, read by FFCVLoader.

File layout (one file per split, `beton_paths`): two fields, in this order,
  image: RGBImageField(write_mode='raw') for 3-channel sets (CIFAR), stored HWC uint8;
         NDArrayField(uint8, (H, W, C)) for other channel counts (digits: 8x8x1), since
         RGBImageField only takes 3 channels. Both are raw bytes, so pixels come back exact.
  label: IntField (int64).

FFCVLoader yields what MemoryLoader yields: (x float32 [B, C, H, W] in [0, 1], channels_last
unless asked otherwise; y int64 [B]). Training order is seeded per (seed, epoch) like
MemoryLoader.set_epoch. The crop/flip draws are seeded from the batch's sample indices, so an
epoch replays exactly with num_workers=1 (the default); with more numba threads each thread
draws from its own unseeded stream and augmentation is no longer reproducible.

FFCV side effects handled here: importing ffcv and building/iterating a Loader call
torch.set_num_threads(num_workers); the caller's torch thread count is restored.
FFCV reuses its output buffers a few batches later, so every yielded tensor is a fresh copy.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_path
from ..seeding import scaled_seed
from .datasets import DatasetInfo, ImageSet
from .loaders import EpochLoader

IMAGE_FIELD, LABEL_FIELD = "image", "label"
_RGB_TYPE_ID, _INT_TYPE_ID, _NDARRAY_TYPE_ID = 2, 1, 4   # ffcv.types.TYPE_ID_HANDLER keys
_RAW_MODE = 1                                             # RGBImageField mode byte for raw pixels


@contextlib.contextmanager
def keep_torch_threads():
    """FFCV's Compiler.set_num_threads also sets torch's thread count: put the caller's back."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


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


def require_ffcv(purpose: str = "the FFCV loader") -> None:
    """Import ffcv (keeping torch's thread count) or raise a UserError saying how to install it."""
    with keep_torch_threads():
        try:
            import ffcv  # noqa: F401  (imports the loader, writer and pipeline compiler)
        except Exception as e:   # ImportError, or a broken native build
            raise UserError(f"{purpose} needs the ffcv package ({type(e).__name__}: {e}); "
                            f"pip install 'fastfat[ffcv]' after apt-get install libopencv-dev "
                            f"libturbojpeg0-dev pkg-config") from None


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

class _Samples:
    """Indexable (image HWC uint8, label int) pairs, the shape DatasetWriter asks for."""

    def __init__(self, data: ImageSet):
        self.x = data.images.permute(0, 2, 3, 1).contiguous().numpy()   # [N, H, W, C] uint8
        self.y = data.labels.numpy()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def write_betons(jobs: list[tuple[str, ImageSet]], num_workers: int = 1) -> None:
    """Write each ImageSet (uint8 [N, C, H, W], int64 labels) to its .beton path.

    All files are written to temporary names in their target directories first and renamed
    only once every one of them is complete, so a failure leaves the old files in place.
    """
    require_ffcv("writing .beton files")
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    for path, data in jobs:
        if data.images.dtype != torch.uint8 or data.images.dim() != 4 or len(data) == 0:
            raise UserError(f"cannot write {path}: expected a non-empty uint8 [N, C, H, W] set")
        # DatasetWriter's workers die silently on a full disk and the writer then waits forever:
        # check the room first (pixels + per-sample metadata + a page per worker).
        need = data.images.numel() + 64 * len(data) + (num_workers + 2) * MIN_PAGE_SIZE
        folder = os.path.dirname(os.path.abspath(path))
        if shutil.disk_usage(folder).free < need:
            raise UserError(f"not enough free space in {folder} for {path} (~{need >> 20} MiB)")
    # Every file lands under a temporary name and is renamed only once all are complete, so
    # a failure leaves the old files in place.
    with contextlib.ExitStack() as stack:
        for path, data in jobs:
            tmp = stack.enter_context(atomic_path(path))
            c = data.images.shape[1]
            image = (RGBImageField(write_mode="raw") if c == 3
                     else NDArrayField(np.dtype("uint8"), tuple(data.images.shape[2:]) + (c,)))
            writer = DatasetWriter(tmp, {IMAGE_FIELD: image, LABEL_FIELD: IntField()},
                                   page_size=MIN_PAGE_SIZE, num_workers=num_workers)
            writer.from_indexed_dataset(_Samples(data))


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BetonInfo:
    """What a .beton holds: sample count, image shape (H, W, C), storage kind, label range."""
    num_samples: int
    shape: tuple[int, int, int]
    kind: str            # "rgb" (RGBImageField) or "ndarray" (NDArrayField)
    label_min: int
    label_max: int


def inspect_beton(path: str) -> BetonInfo:
    """Read a .beton's header, field table, metadata and allocation table, and check that they
    are complete and consistent (a truncated or corrupted file would otherwise crash or hang
    the loader's reader). Raises UserError with one line naming the problem."""
    require_ffcv("reading .beton files")
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    def bad(why):
        return UserError(f"{path}: not a usable FFCV .beton file ({why}); "
                         f"re-create it with fastfat data convert")

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (run fastfat data convert)")
    size = os.path.getsize(path)
    if size < HeaderType.itemsize:
        raise bad(f"{size} bytes, too short for a header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise bad(f"format version {header['version']}, expected {CURRENT_VERSION}")
    n, nf, table = int(header["num_samples"]), int(header["num_fields"]), int(header["alloc_table_ptr"])
    page = int(header["page_size"])
    if n == 0:
        raise bad("no samples")
    if page == 0 or page & (page - 1):
        raise bad(f"page size {page} is not a power of two")
    if nf != 2:
        raise bad(f"{nf} fields, expected {IMAGE_FIELD} and {LABEL_FIELD}")
    if size < HeaderType.itemsize + nf * FieldDescType.itemsize:
        raise bad("truncated field table")
    ids = np.fromfile(path, dtype=FieldDescType, count=nf, offset=HeaderType.itemsize)["type_id"]
    if ids[0] not in (_RGB_TYPE_ID, _NDARRAY_TYPE_ID) or ids[1] != _INT_TYPE_ID:
        raise bad(f"field types {list(map(int, ids))}, expected an image then an integer label")
    if table > size or (size - table) % ALLOC_TABLE_TYPE.itemsize:
        raise bad("truncated allocation table")
    try:
        reader = Reader(path)
    except Exception as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    meta, alloc = reader.metadata, reader.alloc_table
    if len(meta) != n or table < HeaderType.itemsize + nf * FieldDescType.itemsize + meta.nbytes:
        raise bad("truncated metadata")
    image_meta, labels = meta["f0"], meta["f1"]
    handler = reader.handlers[reader.field_names[0]]
    if ids[0] == _RGB_TYPE_ID:
        hs, ws = image_meta["height"], image_meta["width"]
        if (image_meta["mode"] != _RAW_MODE).any():
            raise bad("images are JPEG-compressed, not raw pixels")
        if hs.min() != hs.max() or ws.min() != ws.max():
            raise bad("images of different sizes")
        shape, kind = (int(hs[0]), int(ws[0]), 3), "rgb"
        ptrs = image_meta["data_ptr"]
    else:
        if handler.dtype != np.uint8 or len(handler.shape) != 3:
            raise bad(f"image array {handler.dtype} {handler.shape}, expected uint8 (H, W, C)")
        shape, kind = tuple(int(s) for s in handler.shape), "ndarray"
        ptrs = image_meta
    if len(alloc) != n:
        raise bad(f"{len(alloc)} stored images for {n} samples")
    if (alloc["size"] != np.prod(shape)).any():
        raise bad("stored image sizes do not match the image shape")
    if (alloc["ptr"] + alloc["size"] > table).any() or not np.isin(ptrs, alloc["ptr"]).all():
        raise bad("image data outside the file's data region")
    return BetonInfo(n, shape, kind, int(labels.min()), int(labels.max()))


def check_beton(path: str, info: DatasetInfo | None) -> BetonInfo:
    """inspect_beton, then check that image shape and labels fit the data set `info`."""
    b = inspect_beton(path)
    if info is not None:
        want = (info.size, info.size, info.channels)
        if b.shape != want:
            fmt = lambda s: "x".join(map(str, s))
            raise UserError(f"{path}: images are {fmt(b.shape)} but {info.name} images are "
                            f"{fmt(want)}; was it converted from another data set?")
        if b.label_min < 0 or b.label_max >= info.num_classes:
            raise UserError(f"{path}: labels span {b.label_min}..{b.label_max} but {info.name} "
                            f"has {info.num_classes} classes (0..{info.num_classes - 1})")
    return b


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _seed_operation(seed: int):
    """An FFCV pipeline step that seeds numba's random stream (the one RandomTranslate and
    RandomHorizontalFlip draw from) from the loader seed and the batch's sample indices.
    The order already depends on (seed, epoch), so the draws do too."""
    from ffcv.pipeline.operation import Operation

    base = np.uint64(seed % (1 << 63))

    class SeedAugmentation(Operation):
        def generate_code(self):
            def seed_rng(images, _dst, indices):
                h = base
                for i in range(indices.shape[0]):   # an LCG-style hash of the index list
                    h = h * np.uint64(6364136223846793005) + np.uint64(indices[i]) + np.uint64(1)
                np.random.seed(np.uint32(h >> np.uint64(32)))
                return images
            seed_rng.with_indices = True
            return seed_rng

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=True), None

    return SeedAugmentation()


class FFCVLoader(EpochLoader):
    """Batches from a .beton file through an FFCV pipeline; MemoryLoader's interface.

    train=True: random order seeded per (seed, epoch) (set_epoch), then RandomTranslate with
    zero fill (= RandomCrop(size, padding=crop_pad)) and RandomHorizontalFlip when flip.
    train=False: sequential order, no augmentation. limit keeps the first `limit` samples.
    Yields (x float32 [B, C, H, W] in [0, 1], channels_last when channels_last; y int64 [B]),
    both on `device` (ToDevice with non_blocking on CUDA; FFCV on CPU has no device step).
    The file is validated against `info` (shape, label range) before anything is compiled.
    """

    def __init__(self, path: str, *, batch_size: int, train: bool, seed: int = 0, device="cpu",
                 crop_pad: int = 0, flip: bool = False, channels_last: bool = True,
                 drop_last: bool = False, limit: int | None = None,
                 info: DatasetInfo | None = None, num_workers: int = 1):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if crop_pad < 0:
            raise UserError(f"crop padding must be >= 0, got {crop_pad}")
        if limit is not None and limit < 1:
            raise UserError(f"limit must be at least 1, got {limit}")
        self.beton = check_beton(path, info)
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.ndarray import NDArrayDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import (RandomHorizontalFlip, RandomTranslate, ToDevice, ToTensor,
                                     ToTorchImage)

        self.path, self.batch_size, self.train, self.seed = path, batch_size, train, seed
        self.device, self.channels_last, self.drop_last = torch.device(device), channels_last, drop_last
        self.num_samples = self.beton.num_samples if limit is None else min(limit, self.beton.num_samples)
        self.epoch = 0

        image = [SimpleRGBImageDecoder() if self.beton.kind == "rgb" else NDArrayDecoder()]
        if train and (crop_pad or flip):
            image.append(_seed_operation(seed))
            if crop_pad:
                image.append(RandomTranslate(padding=crop_pad, fill=(0,) * self.beton.shape[2]))
            if flip:
                image.append(RandomHorizontalFlip())
        label = [IntDecoder(), ToTensor()]
        image.append(ToTensor())
        self._on_cuda = self.device.type == "cuda"
        if self._on_cuda:
            image.append(ToDevice(self.device, non_blocking=True))
            label.append(ToDevice(self.device, non_blocking=True))
        image.append(ToTorchImage(channels_last=True))   # a permuted view of the NHWC batch

        with keep_torch_threads():
            self._loader = Loader(
                path, batch_size=batch_size, num_workers=num_workers,
                order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
                # Random order draws from default_rng(seed + epoch): scale the seed so that
                # (seed, epoch) pairs do not collide, as seeding.epoch_generator does.
                seed=scaled_seed(seed),
                indices=None if limit is None else np.arange(self.num_samples, dtype=np.uint64),
                pipelines={IMAGE_FIELD: image, LABEL_FIELD: label}, drop_last=drop_last)

    def __iter__(self):
        self._loader.next_epoch = self.epoch if self.train else 0
        with keep_torch_threads():
            it = iter(self._loader)
        try:
            for x, y in it:
                # .float() makes the copy FFCV's buffer reuse requires; it keeps channels_last.
                x = x.float().div_(255.0)
                y = y.reshape(-1).clone()
                if not self._on_cuda and self.device.type != "cpu":
                    x, y = x.to(self.device), y.to(self.device)
                if not self.channels_last:
                    x = x.contiguous()
                yield x, y
        finally:
            it.close()
