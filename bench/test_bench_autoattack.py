"""AutoAttack (`apgd`, `aa`), fastfat's implementation against pyautoattack on a briefly trained demo
CNN on digits, both eps_test of the demo, the same keyed seeds; each pair's robust sets are checked
to agree within one sample per class. The full comparison (497 images, ResNet18 too) is
`python -m bench.autoattack`."""
from __future__ import annotations

import pytest
import torch

from fastfat import autoattack
from fastfat.models.fold import fold_bn
from fastfat.seeding import eval_noise_seed

from .autoattack import EPS, digits_test_split, floor, trained_model

# (images, overrides) per scale: "full" the standard settings on 128 digits; "small" a smoke run
SIZES = {"full": (128, {}), "small": (32, dict(n_iter=5, square_n_queries=20))}
_ROBUST: dict[tuple, dict[str, torch.Tensor]] = {}


@pytest.fixture(scope="module")
def cnn():
    return trained_model("cnn", epochs=3)


@pytest.mark.parametrize("attack", ["apgd", "aa"])
@pytest.mark.parametrize("impl", ["fastfat", "pyautoattack"])
def test_bench_autoattack(benchmark, scale, cnn, attack, impl):
    benchmark.group = f"AutoAttack {attack}: fastfat vs pyautoattack, demo CNN, digits, eps {list(EPS)}"
    n, overrides = SIZES[scale.name]
    x, y = digits_test_split(n)
    attacked = fold_bn(cnn)
    seeds = [eval_noise_seed(0, 0, "aa", i) for i in range(len(EPS))]

    def ours():
        return autoattack.run_batch(attacked, x, y, attack, list(EPS), seeds, 10, **overrides)[1]

    def theirs():
        return torch.cat([autoattack.run(attacked, x, y, attack, e, s, 10, impl="pyautoattack", **overrides)[1]
                          for e, s in zip(EPS, seeds)])

    pred = benchmark.pedantic(ours if impl == "fastfat" else theirs, rounds=1, iterations=1, warmup_rounds=0)
    robust = _ROBUST.setdefault((scale.name, attack), {})
    robust[impl] = (pred == y.repeat(len(EPS))).view(len(EPS), -1)
    if len(robust) == 2:   # fp32 and other start noise: within one sample per class at each eps
        for a, b in zip(robust["fastfat"], robust["pyautoattack"]):
            diff = torch.bincount(y, weights=a.double(), minlength=10) - torch.bincount(y, weights=b.double(), minlength=10)
            assert diff.abs().max() <= 1
    benchmark.extra_info["robust"] = robust[impl].sum(1).tolist()


def test_floor_counts_the_passes_of_the_samples_both_leave_robust():
    """3 samples robust to both at eps 0.2 (fastfat 3, pyautoattack 4), none at 0.25: `apgd`
    costs each (1 + 9) x 101 forward-backward passes; `aa` adds FAB-T's 9 x 100 passes and
    forwards. Hand-computed at 100 us per pass and 40 us per forward."""
    r = {0.2: dict(robust_fastfat=3, robust_pyautoattack=4), 0.25: dict(robust_fastfat=0, robust_pyautoattack=1)}
    costs = (1e-4, 4e-5)
    assert floor({**r, "attack": "apgd"}, costs) == pytest.approx(3 * 1010 * 1e-4)
    assert floor({**r, "attack": "aa"}, costs) == pytest.approx(3 * (0.101 + 900 * 1.4e-4))
    assert floor({**r, "attack": "apgd"}, costs, n_iter=10, targets=2) == pytest.approx(3 * 3 * 11 * 1e-4)


def test_bench_autoattack_dropin(benchmark, scale):
    """fastfat.AutoAttack vs pyautoattack's AutoAttack, as a user's script calls them, on a model
    fastfat did not build (normalization inside, BatchNorm): within one sample per class."""
    from .autoattack_dropin import compare_dropin, trained_user_model
    benchmark.group = f"AutoAttack drop-in vs pyautoattack, user CNN, digits, eps {list(EPS)}"
    n, overrides = SIZES[scale.name]
    x, y = digits_test_split(n)
    model = trained_user_model(epochs=3)
    r = benchmark.pedantic(lambda: compare_dropin(model, x, y, EPS, n_iter=overrides.get("n_iter"),
                                                  n_queries=overrides.get("square_n_queries")),
                           rounds=1, iterations=1, warmup_rounds=0)
    assert all(r[e]["max_class_diff"] <= 1 for e in EPS)
    benchmark.extra_info.update(ratio=r["ratio"], robust=[r[e]["robust_fastfat"] for e in EPS])
