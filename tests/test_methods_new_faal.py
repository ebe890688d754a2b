"""FAAL's closed-form DRO weights against cvxpy's solution of the same problem (their code's
formulation), and its class margins and weighted loss against hand-computed values."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fastfat.methods import faal

import cvxpy as cp  # noqa: E402  (the dev extra installs it)


def cvxpy_weights(a: np.ndarray, r: float, divergence: str) -> tuple[np.ndarray, float]:
    """(q, optimal value) from a conic solver, as FAAL's DAW builds the problem."""
    c = len(a)
    u = np.full(c, 1.0 / c)
    q = cp.Variable(c, nonneg=True)
    kl = cp.sum(cp.kl_div(u, q)) if divergence == "code" else cp.sum(cp.kl_div(q, u))
    prob = cp.Problem(cp.Maximize(a @ q), [cp.sum(q) == 1, kl <= r])
    # tolerances at 1e-12: at 1e-10 Clarabel's q is off by ~1e-6 (checked); at 1e-12 it may warn
    # "inaccurate" (the KKT residual sits near float64 resolution), the test checks q itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return q.value, prob.value


def kl(q: np.ndarray, divergence: str) -> float:
    u = 1.0 / len(q)
    if divergence == "code":
        return float(np.sum(u * np.log(u / q)))
    return float(np.sum(np.where(q > 0, q * np.log(np.maximum(q, 1e-300) / u), 0.0)))


CASES = [
    # (name, class losses, radius)
    *[(f"random{i}", np.random.default_rng(i).normal(size=10), r)
      for i, r in enumerate((0.01, 0.1, 0.5, 1.0, 2.0))],
    ("margins", np.random.default_rng(7).uniform(-1, 1, size=10) * np.arange(1, 11), 0.5),
    ("tied max", np.array([0.3, 0.9, 0.9, -0.2, 0.1]), 0.5),
    ("two classes", np.array([-0.4, 0.6]), 0.05),
    ("hundred", np.random.default_rng(3).normal(size=100), 0.5),
]


@pytest.mark.parametrize("divergence", faal.DIVERGENCES)
@pytest.mark.parametrize("name,a,r", CASES, ids=[c[0] for c in CASES])
def test_closed_form_matches_cvxpy(name, a, r, divergence):
    q = faal.dro_weights(torch.tensor(a, dtype=torch.float64), r, divergence).numpy()
    ref, value = cvxpy_weights(a, r, divergence)
    assert abs(q.sum() - 1) < 1e-12 and (q >= 0).all()
    assert kl(q, divergence) <= r + 1e-9                     # feasible
    assert abs(a @ q - value) < 1e-6 * max(1.0, abs(value))  # optimal
    # the maximiser is unique here (strictly concave in q on the ball's boundary, a not constant)
    np.testing.assert_allclose(q, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("divergence", faal.DIVERGENCES)
def test_edge_cases(divergence):
    a = torch.tensor([0.25] * 6, dtype=torch.float64)
    # all losses equal: any q on the simplex is optimal; the closed form gives the uniform one
    torch.testing.assert_close(faal.dro_weights(a, 0.5, divergence), torch.full((6,), 1 / 6,
                                                                               dtype=torch.float64))
    # r = 0: the ball is the uniform point
    b = torch.tensor([0.1, -0.3, 0.8, 0.2], dtype=torch.float64)
    torch.testing.assert_close(faal.dro_weights(b, 0.0, divergence),
                               torch.full((4,), 0.25, dtype=torch.float64))
    # r large: all the mass on the largest loss (the vertex), as cvxpy's value says
    q = faal.dro_weights(b, 50.0, divergence)
    _, value = cvxpy_weights(b.numpy(), 50.0, divergence)
    assert q.argmax() == 2 and q[2] > 1 - 1e-6
    assert abs(float(b @ q) - value) < 1e-6


def test_edge_cases_match_cvxpy_value():
    """r = 0 and all-equal losses give cvxpy's optimal value (its q is not unique there)."""
    for divergence in faal.DIVERGENCES:
        for a, r in ((np.full(5, -0.7), 0.5), (np.array([0.1, -0.3, 0.8, 0.2]), 0.0)):
            q = faal.dro_weights(torch.tensor(a), r, divergence).numpy()
            # r = 0 is an equality constraint for the solver; ask it at a tiny radius instead
            _, value = cvxpy_weights(a, max(r, 1e-12), divergence)
            assert abs(a @ q - value) < 1e-5


def test_tilting_is_exponential():
    """The KL(q || u) maximiser is q ~ exp(a / t) (ratios of weights follow the loss gaps)."""
    a = torch.tensor([0.2, -0.5, 1.1, 0.4], dtype=torch.float64)
    q = faal.dro_weights(a, 0.3, "tilting")
    t = (a[2] - a[0]) / (q[2] / q[0]).log()
    torch.testing.assert_close((q.log() - q.log()[0]), (a - a[0]) / t)


def test_margins_and_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1],     # class 0: margin 0.2 - 0.7 = -0.5
                          [0.1, 0.3, 0.6],     # class 1: 0.6 - 0.3 = 0.3
                          [0.5, 0.4, 0.1]])    # class 1: 0.5 - 0.4 = 0.1
    y = torch.tensor([0, 1, 1])
    m, n = faal.class_margins(probs, y, 3)
    torch.testing.assert_close(m, torch.tensor([-0.5, 0.2, -1.0], dtype=torch.float64))
    torch.testing.assert_close(n, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    q = faal.faal_weights(probs, y, 3, 0.5)
    # the solver sees a = n * m = [-0.5, 0.4, 0]: class 1 weighs most, class 0 least
    torch.testing.assert_close(q, faal.dro_weights(torch.tensor([-0.5, 0.4, 0.0],
                                                                dtype=torch.float64), 0.5))
    assert q[1] > q[2] > q[0]
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    expected = 3 / 3 * (q[0] * 1.0 + q[1] * 2.0 + q[1] * 4.0)
    torch.testing.assert_close(faal.weighted_loss(losses, y, q), expected)
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(faal.weighted_loss(losses, y, uniform), losses.mean())
