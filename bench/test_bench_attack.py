"""One training attack (PGD, the authors' 10 steps of 0.007 at eps 8/255 in the full scale) on a
ResNet18 batch: the trainer's (refresh the BN-folded channels_last copy, input gradients only,
batch split over the cores) against reference.ref_pgd (loss.backward() at every step, NCHW,
BN unfolded). Both from the same weights and the same start noise."""
from __future__ import annotations

import pytest
import torch

from fastfat import reference
from fastfat.train import Trainer

from .common import batch, fat_config, twin_models


@pytest.mark.benchmark(group="PGD attack: ResNet18, one training batch")
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_pgd_attack(benchmark, scale, impl):
    cfg = fat_config(width=scale.width, batch_size=scale.batch, steps=scale.steps)
    fast_model, ref_model = twin_models(cfg)
    x, y = batch(scale.batch)
    if impl == "fast":
        trainer = Trainer(cfg, fast_model)
        xc = x.contiguous(memory_format=torch.channels_last)
        run = lambda: trainer.adversarial(xc, y, torch.Generator().manual_seed(0))
    else:
        run = lambda: reference.ref_pgd(ref_model, x, y, cfg.eps_train, cfg.alpha(), cfg.steps,
                                        generator=torch.Generator().manual_seed(0))
    x_adv = benchmark.pedantic(run, rounds=scale.rounds, iterations=1, warmup_rounds=1)
    assert x_adv.shape == x.shape and float((x_adv - x).abs().max()) <= cfg.eps_train + 1e-6
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(scale.batch / benchmark.stats.stats.median)
