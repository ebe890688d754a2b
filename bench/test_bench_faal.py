"""FAAL's class weights for one training step (CIFAR-10's 10 classes): fastfat's closed form
(methods.faal.dro_weights: a fixed-length search on the device, no host sync) against their
code's way, a cvxpy problem built and solved at every step (Clarabel here; theirs ECOS/MOSEK).
Both give the same weights to 1e-6 (tests/test_methods_new_faal.py); compare the medians."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastfat.methods import faal

A = np.random.default_rng(0).normal(size=10)


@pytest.mark.benchmark(group="FAAL class weights, one step (10 classes)")
@pytest.mark.parametrize("impl", ["closed-form", "cvxpy"])
def test_faal_weights(benchmark, impl):
    if impl == "closed-form":
        a = torch.tensor(A)
        run = lambda: faal.dro_weights(a, 0.5).numpy()
    else:
        cp = pytest.importorskip("cvxpy")
        u = np.full(10, 0.1)

        def run():
            q = cp.Variable(10, nonneg=True)
            cp.Problem(cp.Maximize(A @ q), [cp.sum(q) == 1, cp.sum(cp.kl_div(u, q)) <= 0.5]).solve(
                solver=cp.CLARABEL)
            return q.value
    q = benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    assert abs(q.sum() - 1) < 1e-6 and q.argmax() == A.argmax()
