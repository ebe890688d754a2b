"""CIFAR-100's fine label -> coarse (super)class tables, as data: the data set's own
'coarse_labels' mapping and the FAT authors' cifar100_super_map.json. The reference
(fastfat.reference) reads them here; the kernels keep their own copy (fastfat.kernels stands
alone), and tests/test_losses.py pins the two equal and checks this one against the data set."""
from __future__ import annotations

# fine label i -> its coarse label (20 superclasses of 5 fine classes each)
CIFAR100_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)

# wzekai99/FAT's cifar100_super_map.json: the same table except fine label 39 (keyboard), which
# it puts in superclass 9 (CIFAR-100 says 5).
CIFAR100_COARSE_AUTHORS = CIFAR100_COARSE[:39] + (9,) + CIFAR100_COARSE[40:]
