"""A strict reader of the idx files MNIST and Fashion-MNIST ship in (gzipped or not).

An idx file is 2 zero bytes, a type byte (0x08: unsigned bytes, the only type these sets use), a
byte with the number of dimensions, one big-endian uint32 per dimension, then exactly the
product of the dimensions in data bytes. Anything else (a truncated or padded file, another
type, a foreign file, a broken gzip stream) is refused with one line naming the file.
"""
from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np

from ..errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08


def _raw_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it starts with gzip's magic number."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:   # BadGzipFile is an OSError
        raise UserError(f"cannot read {path}: not a readable idx file ({type(e).__name__}: {e})") from None
    return raw


def read_idx(path: str, ndim: int) -> np.ndarray:
    """The uint8 array in an idx file with `ndim` dimensions (1: labels [N], 3: images [N, H, W]);
    UserError naming the file for a wrong magic number, dimension count or size."""
    raw = _raw_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != UBYTE or raw[3] != ndim:
        raise UserError(f"cannot read {path}: not an idx file of unsigned bytes with {ndim} "
                        f"dimension(s) (magic number {raw[:4].hex() or 'missing'}, expected "
                        f"00000{UBYTE:x}{ndim:02x})")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise UserError(f"cannot read {path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    want = int(np.prod(dims, dtype=np.int64))
    if len(raw) - head != want:
        raise UserError(f"cannot read {path}: its header says {' x '.join(map(str, dims))} = {want} "
                        f"bytes of data but it holds {len(raw) - head} (truncated or not this file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def read_idx_pair(images_path: str, labels_path: str, size: int, num_classes: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 1, size, size], labels int64 [N]) from an idx image file and its label
    file; UserError when they disagree (counts), the images are not size x size, or a label is
    outside [0, num_classes)."""
    x = read_idx(images_path, 3)
    y = read_idx(labels_path, 1)
    if x.shape[1:] != (size, size):
        raise UserError(f"cannot read {images_path}: images are {x.shape[1]}x{x.shape[2]}, "
                        f"expected {size}x{size}")
    if len(x) != len(y):
        raise UserError(f"{images_path} holds {len(x)} images but {labels_path} holds {len(y)} "
                        f"labels: the files do not belong together")
    if len(y) and int(y.max()) >= num_classes:
        raise UserError(f"cannot read {labels_path}: label {int(y.max())} is outside 0..{num_classes - 1}")
    return x[:, None].copy(), y.astype(np.int64)
