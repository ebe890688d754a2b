"""The two sides bench.compare times: the fast path as `fastfat train` runs it (FastSide) and the
reference as the authors run it (RefSide), their interleaved timing, and the model the
evaluation is timed on (eval_model)."""
from __future__ import annotations

import time

import torch

from fastfat import reference
from fastfat.data import MemoryLoader
from fastfat.train import Trainer, train_epoch

from .common import fat_config, twin_models


def say(*a):
    """print, flushed at once: the report is read while it runs."""
    print(*a, flush=True)


class FastSide:
    """The fast path as `fastfat train` runs it: Trainer + MemoryLoader + train_epoch."""

    def __init__(self, cfg, model, train_set):
        self.trainer = Trainer(cfg, model)
        self.loader = MemoryLoader(train_set, cfg.batch_size, True, seed=cfg.seed,
                                   crop_pad=cfg.crop_pad, flip=cfg.flip,
                                   channels_last=cfg.channels_last, drop_last=cfg.drop_last)
        self.epoch = 0

    def warm_up(self):
        x, y = next(iter(self.loader))
        self.trainer.train_step(x, y, torch.Generator().manual_seed(0))

    def run_epoch(self) -> float:
        row = train_epoch(self.trainer, self.loader, self.epoch)
        self.epoch += 1
        return row["loss"]


class RefSide:
    """The reference as the authors run it: ref_train for one epoch (its own DataLoader with
    per-sample transforms, SGD, ref_train_step per batch)."""

    def __init__(self, cfg, model, train_set):
        self.cfg, self.model, self.train_set = cfg, model, train_set

    def warm_up(self):
        reference.ref_train(self.cfg, self.train_set, self.model, max_steps=1)

    def run_epoch(self) -> float:
        reference.ref_train(self.cfg, self.train_set, self.model)
        return float("nan")   # ref_train returns the model only


def time_interleaved(sides: dict, repeats: int, label: str) -> dict:
    """{name: [seconds per run]}: `repeats` runs of each side, in alternating order."""
    times = {k: [] for k in sides}
    names = list(sides)
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            t0 = time.perf_counter()
            sides[k]()
            times[k].append(time.perf_counter() - t0)
            say(f"  {label} {r + 1}/{repeats} {k}: {times[k][-1]:.2f} s")
    return times



def eval_model(args, train_set) -> torch.nn.Module:
    """A model whose class accuracies under attack are neither all 0 nor all 1 at the compare's
    eps_test, so that agreeing on them means something: the fast trainer, Madry PGD-3 (step
    eps/2) at eps 16/255 on the un-augmented training set, then BN running statistics
    recomputed over that set (a few dozen steps leave them lagging far behind the weights)."""
    cfg = fat_config(width=args.width, batch_size=args.batch, method="madry", eps_train=16 / 255,
                     steps=3, step_size="eps/2", lr=0.05, crop_pad=0, flip=False)
    model = twin_models(cfg)[0]
    trainer = Trainer(cfg, model)
    loader = MemoryLoader(train_set, cfg.batch_size, True, seed=cfg.seed, channels_last=True)
    for epoch in range(args.eval_model_epochs):
        train_epoch(trainer, loader, epoch)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None          # a plain average over the batches below
    model.train()
    with torch.no_grad():
        for x, _ in MemoryLoader(train_set, 256, False):
            model(x)
    return model.eval()
