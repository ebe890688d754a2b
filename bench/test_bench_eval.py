"""One evaluation pass (clean, FGSM, PGD-20, C&W-inf at eps 16/255 and 20/255, class by class):
fastfat.evaluate.evaluate (one pass over the data, all radii of an attack in one batch with
per-sample eps, BN folded, channels_last, input gradients only) against
reference.ref_evaluate (one pass per attack and radius, the authors' way). Same model, same
keyed start noise, so both report the same class accuracies (checked in tests/test_evaluate.py
and by bench.compare)."""
from __future__ import annotations

import pytest

from fastfat import reference
from fastfat.config import make_eval_config
from fastfat.data import MemoryLoader
from fastfat.evaluate import evaluate

from .common import fat_config, synthetic32, twin_models

EPS_TEST = [16 / 255, 20 / 255]


@pytest.mark.benchmark(group="evaluation pass: ResNet18, clean + 3 attacks x 2 eps")
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_evaluation_pass(benchmark, scale, impl):
    cfg = fat_config(width=scale.width)
    fast_model, ref_model = (m.eval() for m in twin_models(cfg))
    test = synthetic32(0, scale.eval_images)[1]
    ecfg = make_eval_config(None, attacks=list(scale.eval_attacks), eps_test=EPS_TEST,
                            batch_size=min(256, scale.eval_images), seed=0)
    if impl == "fast":
        run = lambda: evaluate(fast_model, MemoryLoader(test, ecfg.batch_size, False), ecfg, 10)
    else:
        run = lambda: reference.ref_evaluate(ref_model, test, attacks=ecfg.attacks, eps_list=EPS_TEST,
                                             batch_size=ecfg.batch_size, seed=ecfg.seed)
    records = benchmark.pedantic(run, rounds=scale.rounds, iterations=1, warmup_rounds=0)
    assert [r["attack"] for r in records] == ["clean"] + [a for a in ecfg.attacks for _ in EPS_TEST]
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(scale.eval_images / benchmark.stats.stats.median)
