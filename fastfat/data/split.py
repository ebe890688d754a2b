"""A stratified hold-out of a training set: the validation split that checkpoints are selected on."""
from __future__ import annotations

import torch

from ..errors import UserError
from ..seeding import SEED_SCALE, epoch_generator
from .datasets import ImageSet


def holdout_counts(class_counts: list[int], per_class: float) -> list[int]:
    """How many samples of each class go to validation: per_class >= 1 is that number of every
    class; 0 < per_class < 1 that fraction of each class, rounded, at least 1. UserError when a
    class would keep no training sample."""
    if per_class >= 1:
        want = [int(per_class)] * len(class_counts)
    else:
        want = [max(1, round(per_class * n)) for n in class_counts]
    for c, (w, n) in enumerate(zip(want, class_counts)):
        if n and w >= n:
            raise UserError(f"val_per_class {per_class:g}: class {c} has {n} training samples, "
                            f"so holding out {w} leaves none to train on")
    return [min(w, n) for w, n in zip(want, class_counts)]


def stratified_holdout(data: ImageSet, per_class: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, validation): per class, a seeded random choice of holdout_counts(...) samples goes
    to validation, the rest stays for training, each part in the set's original order.

    The choice draws from epoch_generator(seed, SEED_SCALE - 1, "cpu", "data"), the data stream
    of an epoch no run reaches, so it shares no random numbers with any epoch's order or
    augmentation, and depends only on (seed, labels, per_class)."""
    labels = data.labels.cpu()
    counts = torch.bincount(labels, minlength=data.num_classes).tolist()
    take = holdout_counts(counts, per_class)
    g = epoch_generator(seed, SEED_SCALE - 1, "cpu", "data")
    val = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(data.num_classes):
        idx = (labels == c).nonzero().flatten()
        val[idx[torch.randperm(len(idx), generator=g)[:take[c]]]] = True
    part = lambda m: ImageSet(data.images[m.to(data.images.device)], data.labels[m.to(data.labels.device)],
                              data.num_classes)
    return part(~val), part(val)
