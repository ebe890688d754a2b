"""Class-wise metrics: hand-computed values, and fast == the reference's per-class loops."""
import math

import numpy as np
import pytest
import torch

from fastfat import metrics
from fastfat.reference import ref_class_accuracy, ref_classwise_loss, ref_summary

# 8 samples, 4 classes, class 3 absent.
PRED = [0, 0, 1, 1, 2, 2, 2, 0]
Y = [0, 0, 0, 1, 1, 2, 2, 2]
# class 0: predictions 0, 0, 1 -> 2/3; class 1: 1, 2 -> 1/2; class 2: 2, 2, 0 -> 2/3; class 3: none
HAND_ACC = [2 / 3, 1 / 2, 2 / 3]
HAND_AVG = 11 / 18
HAND_VCRA = ((1 / 18) ** 2 * 2 + (2 / 18) ** 2) / 3    # = 1/162
HAND_WORST = 1 / 2
HAND_NSTD = (1 / 162) ** 0.5 / (11 / 18)                # = sqrt(2) / 11


def _logits_for(pred, c):
    """Logits whose argmax is pred, with the other entries varied so argmax is really tested."""
    g = torch.Generator().manual_seed(0)
    z = torch.rand(len(pred), c, generator=g)
    z[torch.arange(len(pred)), torch.tensor(pred)] = 2.0
    return z


def test_classwise_accuracy_by_hand():
    for inp in (torch.tensor(PRED), _logits_for(PRED, 4)):
        acc = metrics.classwise_accuracy(inp, torch.tensor(Y), 4)
        assert acc.dtype == torch.float64 and acc.shape == (4,)
        assert acc[:3].tolist() == pytest.approx(HAND_ACC, abs=1e-15)
        assert math.isnan(acc[3])


def test_class_correct_counts():
    correct, total = metrics.class_correct(torch.tensor(PRED), torch.tensor(Y), 4)
    assert correct.tolist() == [2, 1, 2, 0] and total.tolist() == [3, 2, 3, 0]


def test_summary_numbers_by_hand():
    acc = metrics.classwise_accuracy(torch.tensor(PRED), torch.tensor(Y), 4)
    assert HAND_VCRA == pytest.approx(1 / 162)
    assert metrics.average_accuracy(acc) == pytest.approx(HAND_AVG, abs=1e-15)
    assert metrics.vcra(acc) == pytest.approx(HAND_VCRA, abs=1e-15)
    assert metrics.vca(acc) == pytest.approx(HAND_VCRA, abs=1e-15)   # same statistic on clean accuracy
    assert metrics.worst_class_accuracy(acc) == HAND_WORST
    assert metrics.summarize(acc) == pytest.approx({"avg_acc": HAND_AVG, "vcra": HAND_VCRA,
                                                    "worst_acc": HAND_WORST, "worst_k_acc": HAND_AVG,
                                                    "worst_k": 3, "nstd": HAND_NSTD}, abs=1e-15)
    # plain lists work too, and agree with numpy's population variance
    assert metrics.vcra(HAND_ACC) == pytest.approx(float(np.var(HAND_ACC)), abs=1e-15)


def test_fairness_metrics_by_hand():
    acc = [0.9, 0.2, float("nan"), 0.5, 0.4, 0.8]          # a NaN (absent) class is left out
    assert metrics.worst_k_accuracy(acc, 1) == 0.2 == metrics.worst_class_accuracy(acc)
    assert metrics.worst_k_accuracy(acc, 2) == pytest.approx(0.3, abs=1e-15)
    assert metrics.worst_k_accuracy(acc, 3) == pytest.approx(1.1 / 3, abs=1e-15)
    assert metrics.worst_k_accuracy(acc, 9) == pytest.approx(0.56, abs=1e-15)   # k > classes: all
    # mean 0.56, deviations .34 -.36 -.06 -.16 .24: variance 0.332 / 5, std / mean
    assert metrics.normalized_std(acc) == pytest.approx((0.332 / 5) ** 0.5 / 0.56, abs=1e-15)
    assert HAND_NSTD == pytest.approx(2 ** 0.5 / 11, abs=1e-15)
    assert metrics.normalized_std([0.3] * 4) == 0.0
    assert metrics.normalized_std([0.0] * 4) is None            # 0 / 0: undefined, JSON null
    s = metrics.summarize(acc, k=2)
    assert (s["worst_k"], s["worst_k_acc"]) == (2, pytest.approx(0.3, abs=1e-15))
    with pytest.raises(ValueError):
        metrics.worst_k_accuracy(acc, 0)


def test_tradeoff_rho_by_hand():
    # base: worst 0.20, avg 0.50; new: worst 0.30 (+50%), avg 0.45 (-10%): rho = 0.5 - 0.1
    assert metrics.tradeoff_rho(0.30, 0.45, 0.20, 0.50) == pytest.approx(0.4, abs=1e-15)
    # same numbers: 0; a lower worst class and a higher average: -0.25 + 0.2
    assert metrics.tradeoff_rho(0.2, 0.5, 0.2, 0.5) == 0.0
    assert metrics.tradeoff_rho(0.15, 0.6, 0.20, 0.50) == pytest.approx(-0.05, abs=1e-15)
    assert math.isnan(metrics.tradeoff_rho(0.1, 0.5, 0.0, 0.5))


def test_vcra_is_population_variance_not_unbiased():
    acc = [0.0, 1.0]
    assert metrics.vcra(acc) == 0.25          # unbiased would be 0.5
    assert metrics.vcra([0.7] * 10) == 0.0


def test_classwise_loss_by_hand():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 1.0, 1.0, 1.0])
    means, var = metrics.classwise_loss(loss, torch.tensor(Y), 4)
    # class means 2, 5, 1 (class 3 absent); population variance 26/9
    assert means[:3].tolist() == pytest.approx([2.0, 5.0, 1.0])
    assert math.isnan(means[3])
    assert var == pytest.approx(26 / 9, rel=1e-6)


def test_classwise_loss_detaches():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    means, _ = metrics.classwise_loss(loss, torch.tensor([0, 0, 1, 1]), 2)
    assert not means.requires_grad


def test_reference_metrics_by_hand():
    acc = ref_class_accuracy(torch.tensor(PRED), torch.tensor(Y), 4)
    assert acc[:3] == pytest.approx(HAND_ACC, abs=1e-15) and math.isnan(acc[3])
    assert ref_summary(acc) == pytest.approx({"avg_acc": HAND_AVG, "vcra": HAND_VCRA,
                                             "worst_acc": HAND_WORST}, abs=1e-15)
    means, var = ref_classwise_loss(torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 1.0, 1.0, 1.0]), torch.tensor(Y), 4)
    assert means[:3] == pytest.approx([2.0, 5.0, 1.0]) and math.isnan(means[3])
    assert var == pytest.approx(26 / 9, rel=1e-12)


@pytest.mark.parametrize("c,n", [(10, 1000), (100, 1000), (100, 150)])
def test_metrics_fast_equal_reference(c, n):
    g = torch.Generator().manual_seed(c + n)
    y = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g)
    logits[torch.arange(n), y] += 1.0          # better than chance, and uneven across classes
    fast = metrics.classwise_accuracy(logits, y, c)
    ref = ref_class_accuracy(logits.argmax(1), y, c)
    torch.testing.assert_close(fast, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-15, equal_nan=True)
    if n == 150:
        assert fast.isnan().any()             # some classes absent: the NaN path is exercised
    want = ref_summary(ref)
    got = metrics.summarize(fast)
    for k in ("avg_acc", "vcra", "worst_acc"):
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15)
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    means_f, var_f = metrics.classwise_loss(loss, y, c)
    means_r, var_r = ref_classwise_loss(loss, y, c)
    torch.testing.assert_close(means_f.double(), torch.tensor(means_r, dtype=torch.float64),
                               rtol=1e-5, atol=0, equal_nan=True)
    assert var_f == pytest.approx(var_r, rel=1e-5)   # fp32 class means vs float64


def test_class_correct_has_no_syncing_op(syncing_ops):
    """No bincount (two host syncs per call on CUDA, 14 per evaluation batch): fixed-size
    index_add counts, the same numbers."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (200,), generator=g)
    logits = torch.randn(200, 10, generator=g)
    assert syncing_ops(metrics.class_correct, logits, y, 10) == set()
    correct, total = metrics.class_correct(logits, y, 10)
    assert total.tolist() == torch.bincount(y, minlength=10).double().tolist()
    assert correct.tolist() == [float(((logits.argmax(1) == y) & (y == c)).sum()) for c in range(10)]
