"""fastfat.theory: every closed form against an independent computation (quadrature of the
Gaussian density, brute force, sampling), the theorems' monotonicity claims over parameter
grids, the simulation against the theory, and the `fastfat theory` command."""
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.optimize import minimize_scalar

from fastfat import theory as T
from fastfat.errors import UserError

# (d, mu+, mu-, sigma+, sigma-, alpha), eps_train: both sides of alpha = 1/2, both orders of
# the variances, equal variances, natural and adversarial training
CASES = [
    ((10, 0.5, 0.5, 1.0, 1.5, 0.6), 0.0),
    ((10, 0.5, 0.5, 1.0, 1.5, 0.6), 0.2),
    ((5, 0.8, 0.4, 1.2, 0.9, 0.3), 0.1),
    ((20, 0.3, 0.6, 1.0, 1.0, 0.7), 0.15),
    ((1, 1.0, 2.0, 0.7, 1.3, 0.45), 0.5),
    ((8, 0.6, 0.6, 1.0, 1.0, 0.2), 0.0),
]


def _pdf(s, mean, sd):
    return math.exp(-0.5 * ((s - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def _quad_risks(m, b, eps):
    """Class-wise robust risks of sign(<1, x> + b) by integrating the density of S = <1, x>
    over the region the attack can flip: S + b - d eps < 0 (class +1), S + b + d eps >= 0 (-1)."""
    rd = math.sqrt(m.d)
    mp, sp = m.d * m.mu_pos, rd * m.sigma_pos
    mn, sn = -m.d * m.mu_neg, rd * m.sigma_neg
    r_pos = quad(_pdf, mp - 12 * sp, -b + m.d * eps, args=(mp, sp), limit=200)[0] if -b + m.d * eps > mp - 12 * sp else 0.0
    r_neg = quad(_pdf, -b - m.d * eps, mn + 12 * sn, args=(mn, sn), limit=200)[0] if -b - m.d * eps < mn + 12 * sn else 0.0
    return r_pos, r_neg


def _numeric_optimal_bias(m, eps):
    """Minimise the prior-weighted robust risk over b: a coarse grid, then a bounded search."""
    def risk(b):
        r_pos, r_neg = _quad_risks(m, b, eps)
        return m.alpha * r_pos + (1 - m.alpha) * r_neg
    scale = math.sqrt(m.d) * max(m.sigma_pos, m.sigma_neg)
    lo, hi = -m.d * m.mu_pos - 4 * scale, m.d * m.mu_neg + 4 * scale
    grid = np.linspace(lo, hi, 401)
    i = int(np.argmin([risk(b) for b in grid]))
    res = minimize_scalar(risk, bounds=(grid[max(i - 1, 0)], grid[min(i + 1, 400)]), method="bounded",
                          options=dict(xatol=1e-9 * scale))
    return res.x


@pytest.mark.parametrize("params,eps", CASES)
def test_optimal_bias_and_risks_match_quadrature(params, eps):
    m = T.Mixture(*params)
    b = T.optimal_bias(m, eps)
    scale = math.sqrt(m.d) * max(m.sigma_pos, m.sigma_neg)
    assert b == pytest.approx(_numeric_optimal_bias(m, eps), abs=1e-4 * scale)
    for eps_test in (0.0, eps, eps + 0.1):
        got = T.classwise_risk(m, b, eps_test)
        assert got == pytest.approx(_quad_risks(m, b, eps_test), abs=1e-7)


def test_printed_eta_star_needs_the_factor_d():
    """The paper's eta* as printed (no d before the root, K not divided by d^2) is not the
    optimum for d > 1; the corrected one is (previous test)."""
    m = T.Mixture(10, 0.5, 0.5, 1.0, 1.5, 0.6)
    K, D, M = T.K_constant(m), m.sigma_neg ** 2 - m.sigma_pos ** 2, m.mu_pos + m.mu_neg
    A = -m.d * (m.mu_pos * m.sigma_neg ** 2 + m.mu_neg * m.sigma_pos ** 2)
    printed = (A + m.sigma_pos * m.sigma_neg * M * math.sqrt(1 + 2 * K * D / M ** 2)) / D
    assert abs(printed - _numeric_optimal_bias(m, 0.0)) > 1.0


def test_K_sign_and_which_class_is_weaker():
    # K > 0 iff alpha sigma- > (1 - alpha) sigma+; with equal variances, class +1 has the
    # smaller risk (the paper's R+ < R-) exactly when K > 0, i.e. alpha > 1/2
    for alpha in (0.2, 0.4, 0.5, 0.6, 0.8):
        m = T.Mixture(10, 0.5, 0.5, 1.0, 1.0, alpha)
        K = T.K_constant(m)
        assert K == pytest.approx(10 * math.log(alpha / (1 - alpha)))
        r_pos, r_neg = T.adversarial_risks(m, 0.1, 0.2)
        assert np.sign(r_neg - r_pos) == np.sign(round(K, 12))
    assert T.K_constant(T.Mixture(10, 0.5, 0.5, 1.0, 1.5, 0.45)) > 0


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.7])
def test_paper_equal_variance_forms_agree_with_general_formula(alpha):
    m = T.Mixture(12, 0.4, 0.7, 1.1, 1.1, alpha)
    for eps_train, eps_test in [(0.0, 0.0), (0.0, 0.2), (0.2, 0.2), (0.3, 0.5)]:
        assert T.equal_variance_risks(m, eps_train, eps_test) == pytest.approx(
            T.adversarial_risks(m, eps_train, eps_test), abs=1e-12)
        # the unequal-variance root is continuous into the equal-variance case
        near = T.Mixture(12, 0.4, 0.7, 1.1, 1.1 * (1 + 1e-7), alpha)
        assert T.optimal_bias(near, eps_train) == pytest.approx(T.optimal_bias(m, eps_train), abs=1e-4)


def test_robust_correct_matches_corner_search():
    # for a linear score the worst l_inf perturbation sits at a corner of the box
    rng = np.random.default_rng(1)
    d, eps = 3, 0.3
    X = rng.normal(size=(200, d))
    y = np.where(rng.random(200) < 0.5, 1.0, -1.0)
    w, b = rng.normal(size=d), 0.2
    corners = np.array(list(itertools.product((-eps, eps), repeat=d)))
    scores = (X[:, None, :] + corners[None]) @ w + b            # (n, 8)
    brute = np.where(y > 0, (scores >= 0).all(1), (scores < 0).all(1))
    assert np.array_equal(T.robust_correct(X, y, w, b, eps), brute)


def test_best_bias_is_the_exact_empirical_minimiser():
    rng = np.random.default_rng(2)
    score = rng.normal(size=60)
    y = np.where(score + rng.normal(scale=1.0, size=60) > 0, 1.0, -1.0)
    shift = 0.2

    def errors(b):
        return int((~T.robust_correct(score[:, None], y, np.ones(1), b, shift)).sum())
    best = min(errors(b) for b in np.linspace(-5, 5, 20001))
    assert errors(T._best_bias(score, y, shift)) == best


@pytest.mark.parametrize("params,eps_test", [((10, 0.5, 0.5, 1.0, 1.5, 0.6), 0.3),
                                             ((5, 0.8, 0.4, 1.2, 0.9, 0.3), 0.2),
                                             ((20, 0.3, 0.6, 1.0, 1.0, 0.7), 0.1)])
def test_closed_forms_agree_with_monte_carlo(params, eps_test):
    """Sample the mixture, apply the closed-form optimal classifier, attack it in closed form:
    class-wise risks and VCRA within 3 standard errors of Theorems 5.2/5.3."""
    m = T.Mixture(*params)
    X, y = T.sample(m, 300_000, np.random.default_rng(3))
    assert (y > 0).mean() == pytest.approx(m.alpha, abs=0.005)
    for eps_train in (0.0, eps_test):
        b = T.optimal_bias(m, eps_train)
        wrong = ~T.robust_correct(X, y, np.ones(m.d), b, eps_test)
        emp, se = [], []
        for mask, r in zip((y > 0, y < 0), T.adversarial_risks(m, eps_train, eps_test)):
            p = wrong[mask].mean()
            emp.append(p)
            se.append(math.sqrt(r * (1 - r) / mask.sum()))
            assert abs(p - r) < 3 * se[-1]
        th = T.theory_point(m, eps_train, eps_test)["vcra"]
        vcra_se = abs(emp[0] - emp[1]) / 2 * math.hypot(*se)
        assert abs(T.vcra(1 - emp[0], 1 - emp[1]) - th) < 3 * vcra_se + 1e-12


def _random_mixtures(n, seed, equal=False):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        sp = rng.uniform(0.3, 2.0)
        sn = sp if equal else sp * rng.uniform(1.0, 2.5)
        yield T.Mixture(int(rng.integers(1, 40)), *rng.uniform(0.1, 2.0, 2), sp, sn, rng.uniform(0.05, 0.95))


def _vcra_curve(m, eps_test, k=10):
    return [T.theory_point(m, e, eps_test)["vcra"] for e in np.linspace(0, eps_test, k)]


def test_theorem_5_5_vcra_increases_over_a_parameter_grid():
    """sigma- >= sigma+, class -1 at least as vulnerable as class +1 for the natural model at
    eps_test, and 0 <= eps_train <= eps_test: VCRA strictly increases with eps_train."""
    checked = 0
    for m in _random_mixtures(600, 4):
        eps_test = 0.9 * (m.mu_pos + m.mu_neg) / 2 * np.random.default_rng(checked).random()
        try:
            nat = T.theory_point(m, 0.0, eps_test)
            curve = _vcra_curve(m, eps_test)
        except UserError:                     # no interior optimum: theorems do not apply
            continue
        # skip nearly separable mixtures, where float risks underflow and the curve is flat 0
        if nat["acc_neg"] <= nat["acc_pos"] and 1 - nat["acc_neg"] > 1e-6:
            checked += 1
            assert np.all(np.diff(curve) > 0), m
    assert checked > 100


def test_theorem_5_5_equal_variances_any_alpha():
    checked = 0
    for m in _random_mixtures(200, 5, equal=True):
        eps_test = 0.45 * (m.mu_pos + m.mu_neg)
        try:
            curve = _vcra_curve(m, eps_test)
        except UserError:
            continue
        if abs(m.alpha - 0.5) > 0.01 and curve[0] > 1e-12:
            checked += 1
            assert np.all(np.diff(curve) > 0), m
    assert checked > 50


def test_theorem_5_5_as_stated_has_counterexamples():
    # sigma- > sigma+ but alpha < 1/2 makes class +1 the weaker one: AT first closes the gap
    m = T.Mixture(10, 0.5, 0.5, 1.0, 1.5, 0.4)
    curve = _vcra_curve(m, 0.3, 7)
    assert curve[1] < curve[0]


def test_theorem_5_7_adversarial_vcra_exceeds_natural():
    checked = 0
    for m in _random_mixtures(300, 6, equal=True):
        M = m.mu_pos + m.mu_neg
        for eps_train, eps_test in [(0.1 * M, 0.2 * M), (0.3 * M, 0.3 * M), (0.2 * M, 0.45 * M)]:
            if not T.theorem_5_7_conditions(m, eps_train, eps_test) or abs(m.alpha - 0.5) < 0.01:
                continue
            try:
                nat, adv = T.theory_point(m, 0, eps_test)["vcra"], T.theory_point(m, eps_train, eps_test)["vcra"]
            except UserError:
                continue
            checked += 1
            assert adv > nat, m
    assert checked > 100


@pytest.mark.parametrize("alpha", [0.6, 0.8, 0.3])
def test_theorem_5_6_xi_is_a_mean_value_point(alpha):
    """With the paper's 1/pi, xi^2 - ln 2 is the square of a mean-value point of Phi between
    the two class-wise Phi arguments c -+ delta."""
    m = T.Mixture(10, 0.6, 0.4, 1.3, 1.3, alpha)
    s = m.sigma_pos
    for eps_train, eps_test in [(0.0, 0.1), (0.1, 0.2), (0.3, 0.3)]:
        xi_mvt = math.sqrt(T.theorem_5_6_xi(m, eps_train, eps_test) ** 2 - math.log(2))
        M, Mp = m.mu_pos + m.mu_neg, m.mu_pos + m.mu_neg - 2 * eps_train
        c = -math.sqrt(m.d) * (M - 2 * eps_test) / (2 * s)
        delta = T.K_constant(m) * s / (m.d ** 1.5 * Mp)
        lo, hi = sorted((abs(c - delta), abs(c + delta)))
        if (c - delta) * (c + delta) < 0:      # the interval holds 0: |xi| can be anywhere below
            lo = 0.0
        assert lo < xi_mvt < hi


def test_training_recovers_the_closed_forms():
    m = T.Mixture(5, 0.6, 0.5, 1.0, 1.3, 0.6)
    sim = T.simulate(m, [0.0, 0.2], 0.25, n=20_000, seed=7, repeats=4)
    for eps, s in zip([0.0, 0.2], sim):
        t = T.theory_point(m, eps, 0.25)
        assert s["cos_w_1"] > 0.99
        for key in ("acc_pos", "acc_neg"):
            assert abs(s[key] - t[key]) < 3 * s[f"se_{key}"] + 0.003


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastfat", "theory", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_figure_and_json(tmp_path):
    out = tmp_path / "th"
    r = _cli("--out", str(out), "--d", "5", "--n", "3000", "--repeats", "2", "--eps-train", "0,0.1,0.2")
    assert r.returncode == 0, r.stderr
    assert (out / "theory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "theory.json").read_text())
    assert [p["eps_train"] for p in res["points"]] == [0.0, 0.1, 0.2]
    assert res["theorem_5_5"]["applies"] is True
    assert "Theorem 5.5" in r.stdout
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("bad", [["--alpha", "1.5"], ["--sigma-neg", "0"], ["--mu-pos", "-1"],
                                 ["--eps-train", "0,0.5"], ["--eps-train", "-0.1"], ["--d", "0"],
                                 ["--eps-test", "-1"], ["--repeats", "1"],
                                 ["--mu-pos", "0.05", "--mu-neg", "0.05", "--d", "1", "--sigma-neg", "1",
                                  "--alpha", "0.9", "--eps-train", "0"]])
def test_cli_bad_parameter_exits_2_and_writes_nothing(tmp_path, capsys, bad):
    from fastfat.cli import main             # in-process: same path as the command, no start-up cost
    out = tmp_path / "th"
    assert main(["theory", "--out", str(out), "--n", "1000", *bad]) == 2
    assert "fastfat: error:" in capsys.readouterr().err
    assert not out.exists()
