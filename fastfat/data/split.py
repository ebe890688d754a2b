"""Stratified draws: the class-balanced training pool (train_per_class), the validation hold-out
that checkpoints are selected on (val_per_class), and the class-balanced test subset
(test_per_class); and a TrainConfig's training data drawn with them (training_pool,
split_training_set, loader_config)."""
from __future__ import annotations

import dataclasses

import torch

from ..errors import UserError
from ..seeding import SEED_SCALE, epoch_generator
from .datasets import ImageSet, load_dataset

# The smallest class of each data set's full training split, for train_per_class's check before
# any work (the published counts: MNIST's digit 5, SVHN's digit 9, STL-10's 500 labelled per
# class); a data set not listed is checked when it is loaded (balanced_pool).
TRAIN_PER_CLASS = {"cifar10": 5000, "cifar100": 500, "fashion-mnist": 6000, "mnist": 5421,
                   "svhn": 4659, "stl10": 500}

# The smallest class of each data set's test split (MNIST's digit 5, SVHN's digit 9, the digits'
# 497-image test split's digit 5), for test_per_class's check before any work.
TEST_PER_CLASS = {"cifar10": 1000, "cifar100": 100, "fashion-mnist": 1000, "mnist": 892,
                  "svhn": 1595, "stl10": 800, "digits": 37}


def check_test_per_class(per_class: int | None, dataset: str) -> None:
    """UserError when a class of dataset's test split holds fewer than per_class samples (for the
    data sets whose counts are known; the others are checked when loaded, by first_per_class)."""
    have = TEST_PER_CLASS.get(dataset)
    if per_class is not None and have is not None and per_class > have:
        raise UserError(f"test_per_class {per_class}: the smallest class of {dataset}'s test set "
                        f"holds {have} samples")


def first_per_class(data: ImageSet, per_class: int) -> ImageSet:
    """The first per_class samples of every class, in the set's order: a stratified test subset
    that needs no seed, so every run and sweep evaluates the same images. UserError when a class
    holds fewer."""
    labels = data.labels.cpu()
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(data.num_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < per_class:
            raise UserError(f"test_per_class {per_class}: class {c} has only {len(idx)} test samples")
        keep[idx[:per_class]] = True
    keep = keep.to(data.images.device)
    return ImageSet(data.images[keep], data.labels[keep], data.num_classes)


def balanced_pool(data: ImageSet, per_class: int, seed: int) -> ImageSet:
    """per_class samples of every class, a seeded random choice, kept in the set's original order.

    Draws from epoch_generator(seed, SEED_SCALE - 2, "cpu", "data"), an epoch no run reaches and
    not the hold-out's, so the pool depends only on (seed, labels, per_class). UserError when a
    class holds fewer."""
    labels = data.labels.cpu()
    counts = torch.bincount(labels, minlength=data.num_classes).tolist()
    short = [(c, n) for c, n in enumerate(counts) if n < per_class]
    if short:
        c, n = short[0]
        raise UserError(f"train_per_class {per_class}: class {c} has only {n} training samples")
    g = epoch_generator(seed, SEED_SCALE - 2, "cpu", "data")
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(data.num_classes):
        idx = (labels == c).nonzero().flatten()
        keep[idx[torch.randperm(len(idx), generator=g)[:per_class]]] = True
    keep = keep.to(data.images.device)
    return ImageSet(data.images[keep], data.labels[keep], data.num_classes)


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


# The functions below take a fastfat.config.TrainConfig (not imported: config imports this module).

def training_pool(cfg, data: ImageSet | None = None) -> ImageSet:
    """cfg's training ImageSet: the data set's training split (or `data`, already loaded), then
    train_per_class's balanced draw or train_limit's first N."""
    if data is None:
        data, _ = load_dataset(cfg.dataset, cfg.data_root, cfg.download)
    if cfg.train_per_class is not None:
        return balanced_pool(data, cfg.train_per_class, cfg.seed)
    return data.subset(cfg.train_limit)


def split_training_set(cfg, data: ImageSet | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, validation) ImageSets of cfg's training pool (training_pool of `data`, or of the
    data set's training split), stratified."""
    return stratified_holdout(training_pool(cfg, data), cfg.val_per_class, cfg.seed)


def loader_config(cfg):
    """cfg with loader "auto" pinned to "memory": the training part is an in-memory subset, which
    the FFCV files (written for the whole set) cannot serve."""
    return dataclasses.replace(cfg, loader="memory") if cfg.loader == "auto" else cfg
