"""One FAT training step (attack + train-mode forward + FAT loss + SGD) on a ResNet18 batch:
Trainer.train_step against reference.ref_train_step, from the same weights, batch and start
noise (fat-madry, lambda 0.5, the authors' PGD-10 in the full scale)."""
from __future__ import annotations

import pytest
import torch

from fastfat.train import Trainer

from .common import batch, fat_config, reference_stepper, twin_models


@pytest.mark.benchmark(group="FAT train step: ResNet18, one batch")
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_fat_train_step(benchmark, scale, impl):
    cfg = fat_config(width=scale.width, batch_size=scale.batch, steps=scale.steps)
    fast_model, ref_model = twin_models(cfg)
    x, y = batch(scale.batch)
    if impl == "fast":
        trainer = Trainer(cfg, fast_model)
        xc = x.contiguous(memory_format=torch.channels_last)
        run = lambda: float(trainer.train_step(xc, y, torch.Generator().manual_seed(0)).loss)
    else:
        step = reference_stepper(cfg, ref_model)
        run = lambda: step(x, y, torch.Generator().manual_seed(0))
    loss = benchmark.pedantic(run, rounds=scale.rounds, iterations=1, warmup_rounds=1)
    assert loss == loss and loss > 0   # finite and positive
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(scale.batch / benchmark.stats.stats.median)
