"""Section 5 of the paper in numbers: linear classifiers on a two-class Gaussian mixture.

Model (Definition 5.1): y = +1 with prior alpha, else -1; x | y=+1 ~ N(mu+ 1, sigma+^2 I_d),
x | y=-1 ~ N(-mu- 1, sigma-^2 I_d). Classifier f(x) = sign(<w, x> + b), sign(0) = +1.
Attacks are l_inf balls of radius eps; for a linear model the worst case is closed form:
the robust margin is y(<w, x> + b) - eps ||w||_1.

Why w = 1. For u = w / ||w||_2 and eps < min(mu+, mu-), each class's robust margin mean
mu (u.1) - eps ||u||_1 <= (mu - eps) sqrt(d) with equality at u = 1/sqrt(d), and the margin's
std is sigma whatever u is; so w proportional to 1 is optimal for every bias at once and only
the bias b has to be found. (For min(mu+, mu-) <= eps < (mu+ + mu-)/2 the formulas below
are the best classifier with w proportional to 1, the paper's setting.) With w = 1 the score is
S = sum_i x_i ~ N(d mu+, d sigma+^2) or N(-d mu-, d sigma-^2), and training at eps_train is
natural training with mu -> mu - eps_train.

The constant K. The paper leaves K as "a positive constant". Minimising the risk over b gives
the Bayes condition alpha pdf+(t) = (1 - alpha) pdf-(t) at t = -b on the eps-shifted scores,
which is a quadratic in t; solving it reproduces Theorems 5.2/5.3 exactly with

    K = d * log(alpha * sigma- / ((1 - alpha) * sigma+))     (dimensionless)

(equal variances: K = d log(alpha / (1 - alpha))). K is positive only when
alpha sigma- > (1 - alpha) sigma+; e.g. with equal variances only for alpha > 1/2, which is
when the paper's R+ < R- holds. For other alpha the same formulas hold with K <= 0.

Two corrections to the printed formulas, found by checking them numerically (tests):
- eta* / gamma*: the square-root term needs a factor d and K/d^2 inside the root,
      eta* = (A + d s+ s- M sqrt(1 + 2 K (s-^2 - s+^2) / (d^2 M^2))) / (s-^2 - s+^2),
  M = mu+ + mu- (- 2 eps_train for gamma*). As printed it only holds for d = 1 and does not
  reduce to Eq. (5) as sigma- -> sigma+.
- Theorem 5.6: by the mean-value theorem VCRA = exp(-xi^2)/(2 pi d^3) (K sigma / M')^2 with xi
  between the two Phi arguments; the paper's 1/pi form holds with its xi^2 = xi_mvt^2 + ln 2.

Theorem 5.5 as stated (sigma- >= sigma+ alone) is not true in general: with unequal variances
the optimal threshold can make class +1 the weaker class at eps_train = 0, and VCRA first falls
as eps_train closes that gap (d=10, mu+-=0.5, sigma+=1, sigma-=1.5, alpha=0.4, eps_test=0.3:
VCRA falls from 0.32e-2 to 0 over eps_train in [0, 0.3]). It holds (checked over random
parameter grids, see tests) when, in addition, class -1 is at least as vulnerable as class +1
for the naturally trained model at eps_test and eps_train <= eps_test; with equal variances it
holds for every alpha != 1/2. Theorem 5.7 (equal variances) then follows for any eps_train > 0.

Accuracies are fractions; VCRA is the population variance over the two classes,
(p+ - p-)^2 / 4, the paper prints it x100 ("x10^-2"). "Average" is the mean over classes.
The `fastfat theory` run (the theorems' checks, theory.png, theory.json) is fastfat.theory_run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UserError


def _phi(x):
    """The standard normal CDF, scipy.stats.norm.cdf. scipy is imported on first use: every
    `fastfat` command imports this module to build its parser, and scipy.stats and
    scipy.optimize cost 1.3 s of that start-up on the 2-core CPU (python -X importtime)."""
    from scipy.stats import norm
    return norm.cdf(x)

DEFAULTS = dict(d=10, mu_pos=0.5, mu_neg=0.5, sigma_pos=1.0, sigma_neg=1.5, alpha=0.6,
                eps_test=0.3, n=100_000, repeats=5, seed=0)
DEFAULT_EPS_TRAIN = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


@dataclass(frozen=True)
class Mixture:
    """The (mu+, mu-, sigma+, sigma-) Gaussian mixture of Definition 5.1 with prior alpha."""
    d: int
    mu_pos: float
    mu_neg: float
    sigma_pos: float
    sigma_neg: float
    alpha: float

    def validate(self) -> "Mixture":
        if not (isinstance(self.d, (int, np.integer)) and self.d >= 1):
            raise UserError(f"d must be a positive integer, got {self.d}")
        for name in ("mu_pos", "mu_neg", "sigma_pos", "sigma_neg"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise UserError(f"{name} must be a finite number > 0, got {v}")
        if not 0 < self.alpha < 1:
            raise UserError(f"alpha must be in (0, 1), got {self.alpha}")
        return self


def K_constant(m: Mixture) -> float:
    """K = d log(alpha sigma- / ((1 - alpha) sigma+)), the paper's "positive constant" (see
    module docstring); positive iff alpha sigma- > (1 - alpha) sigma+."""
    return m.d * math.log(m.alpha * m.sigma_neg / ((1 - m.alpha) * m.sigma_pos))


def _check_eps_train(m: Mixture, eps_train: float) -> None:
    half = (m.mu_pos + m.mu_neg) / 2
    if not (math.isfinite(eps_train) and 0 <= eps_train < half):
        raise UserError(f"eps_train must be in [0, (mu+ + mu-)/2) = [0, {half:g}), got {eps_train}")


def optimal_bias(m: Mixture, eps_train: float = 0.0) -> float:
    """Bias b of the risk-minimising classifier sign(<1, x> + b) under an eps_train attack:
    eta* of Theorem 5.2 (eps_train = 0) and gamma* of Theorem 5.3, in units of the score S.

    Equal variances: b = d (mu- - mu+) / 2 - sigma^2 log((1 - alpha) / alpha) / M'.
    Otherwise: b = (B + d s+ s- M' sqrt(1 + 2 K (s-^2 - s+^2) / (d^2 M'^2))) / (s-^2 - s+^2),
    B = -d(mu+ s-^2 + mu- s+^2 - eps_train (s+^2 + s-^2)), M' = mu+ + mu- - 2 eps_train.
    This root is the local minimum of the risk in b (the other root is a maximum); raises
    UserError when no local minimum exists or when labelling everything as one class does
    better, because then the theorems do not apply."""
    m.validate()
    _check_eps_train(m, eps_train)
    d, sp, sn, a = m.d, m.sigma_pos, m.sigma_neg, m.alpha
    mp, mn = m.mu_pos - eps_train, m.mu_neg - eps_train
    M = mp + mn
    D = sn ** 2 - sp ** 2
    if D == 0:
        b = d * (mn - mp) / 2 - sp ** 2 * math.log((1 - a) / a) / M
    else:
        root = 1 + 2 * K_constant(m) * D / (d ** 2 * M ** 2)
        if root < 0:
            raise UserError("no linear threshold beats a constant classifier at eps_train="
                            f"{eps_train:g} (classes overlap too much); use larger mu or d")
        B = -d * (mp * sn ** 2 + mn * sp ** 2)
        b = (B + d * sp * sn * M * math.sqrt(root)) / D
    r_pos, r_neg = classwise_risk(m, b, eps_train)
    if a * r_pos + (1 - a) * r_neg >= min(a, 1 - a):
        raise UserError("predicting a single class beats every linear threshold at eps_train="
                        f"{eps_train:g} (classes overlap too much); use larger mu or d")
    return b


def classwise_risk(m: Mixture, b: float, eps: float) -> tuple[float, float]:
    """(R+, R-) of sign(<1, x> + b) under an l_inf attack of radius eps (eps = 0: natural):
    R+ = Phi((-b - d(mu+ - eps)) / (sqrt(d) sigma+)), R- = Phi((b - d(mu- - eps)) / (sqrt(d) sigma-))."""
    rd = math.sqrt(m.d)
    r_pos = _phi((-b - m.d * (m.mu_pos - eps)) / (rd * m.sigma_pos))
    r_neg = _phi((b - m.d * (m.mu_neg - eps)) / (rd * m.sigma_neg))
    return float(r_pos), float(r_neg)


def adversarial_risks(m: Mixture, eps_train: float, eps_test: float) -> tuple[float, float]:
    """Theorem 5.3 (Theorem 5.2 at eps_train = eps_test = 0): class-wise risk of f_adv trained
    at eps_train and attacked at eps_test."""
    return classwise_risk(m, optimal_bias(m, eps_train), eps_test)


def natural_risks(m: Mixture) -> tuple[float, float]:
    """Theorem 5.2: class-wise natural risk of the naturally trained classifier."""
    return adversarial_risks(m, 0.0, 0.0)


def equal_variance_risks(m: Mixture, eps_train: float, eps_test: float) -> tuple[float, float]:
    """The paper's printed equal-variance forms (Eqs. 5-6; Theorem 5.3 with sigma+ = sigma-):
    R+- = Phi((-C -+ 2 K sigma^2) / (2 d^1.5 sigma M')), C = d^2 M' (mu+ + mu- - 2 eps_test)."""
    if m.sigma_pos != m.sigma_neg:
        raise ValueError("equal_variance_risks needs sigma_pos == sigma_neg")
    s, d, K = m.sigma_pos, m.d, K_constant(m)
    Mp = m.mu_pos + m.mu_neg - 2 * eps_train
    C = d ** 2 * Mp * (m.mu_pos + m.mu_neg - 2 * eps_test)
    den = 2 * d ** 1.5 * s * Mp
    return float(_phi((-C - 2 * K * s ** 2) / den)), float(_phi((-C + 2 * K * s ** 2) / den))


def vcra(acc_pos: float, acc_neg: float) -> float:
    """Definition 5.4 for L = 2: population variance of the two class accuracies."""
    return (acc_pos - acc_neg) ** 2 / 4


def theory_point(m: Mixture, eps_train: float, eps_test: float) -> dict:
    """Class-wise robust accuracy, class-mean average and VCRA of f_adv(eps_train) at eps_test."""
    b = optimal_bias(m, eps_train)
    r_pos, r_neg = classwise_risk(m, b, eps_test)
    # the variance of accuracies equals that of risks; risks keep their precision when tiny
    return dict(bias=b, acc_pos=1 - r_pos, acc_neg=1 - r_neg,
                avg=1 - (r_pos + r_neg) / 2, vcra=vcra(r_pos, r_neg))


def theorem_5_6_xi(m: Mixture, eps_train: float, eps_test: float) -> float:
    """xi making Theorem 5.6's VCRA = exp(-xi^2) / (pi d^3) (K sigma / M')^2 exact (equal
    variances). The mean-value point xi_mvt with the correct 1/(2 pi) is sqrt(xi^2 - ln 2)."""
    if m.sigma_pos != m.sigma_neg:
        raise ValueError("Theorem 5.6 needs sigma_pos == sigma_neg")
    t = theory_point(m, eps_train, eps_test)
    Mp = m.mu_pos + m.mu_neg - 2 * eps_train
    scale = (K_constant(m) * m.sigma_pos / Mp) ** 2 / (math.pi * m.d ** 3)
    return math.sqrt(math.log(scale / t["vcra"]))


def theorem_5_7_conditions(m: Mixture, eps_train: float, eps_test: float) -> bool:
    """Theorem 5.7's sufficient conditions (equal variances): eps_train < M/e and
    eps_test < M/2 - e K^3 sigma^3 / (d^4 M), M = mu+ + mu-."""
    M, K, s = m.mu_pos + m.mu_neg, K_constant(m), m.sigma_pos
    return (m.sigma_pos == m.sigma_neg and eps_train < M / math.e
            and eps_test < M / 2 - math.e * K ** 3 * s ** 3 / (m.d ** 4 * M))


# ---------------------------------------------------------------- simulation

def sample(m: Mixture, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n draws (x, y) from the mixture; y in {+1, -1}."""
    y = np.where(rng.random(n) < m.alpha, 1.0, -1.0)
    mean = np.where(y > 0, m.mu_pos, -m.mu_neg)[:, None]
    sd = np.where(y > 0, m.sigma_pos, m.sigma_neg)[:, None]
    return mean + sd * rng.standard_normal((n, m.d)), y


def robust_correct(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, eps: float) -> np.ndarray:
    """Whether every z with ||z - x||_inf <= eps is classified as y by sign(<w, z> + b):
    y = +1 needs <w, x> + b - eps ||w||_1 >= 0, y = -1 needs <w, x> + b + eps ||w||_1 < 0."""
    s = X @ w + b
    l1 = eps * np.abs(w).sum()
    return np.where(y > 0, s - l1 >= 0, s + l1 < 0)


def _best_bias(score: np.ndarray, y: np.ndarray, shift: float) -> float:
    """Exact minimiser over b of the empirical robust 0-1 risk of sign(score + b) with robust
    margin shift = eps ||w||_1: class +1 is right iff b >= shift - score (call it a),
    class -1 iff b < -shift - score (call it c). Errors(b) = #{a > b} + #{c <= b} only drops
    at some a, so trying every a finds the minimum; b is put mid-way to the next rise."""
    a = np.sort(shift - score[y > 0])
    c = np.sort(-shift - score[y < 0])
    errors = (len(a) - np.searchsorted(a, a, side="right")) + np.searchsorted(c, a, side="right")
    i = int(np.argmin(errors))
    if errors[i] > len(a):                      # labelling everything -1 does better
        return float(c[0]) - 1.0
    nxt = c[np.searchsorted(c, a[i], side="right"):]
    return float((a[i] + nxt[0]) / 2) if len(nxt) else float(a[i]) + 1.0


def _smoothed_bias(score: np.ndarray, y: np.ndarray, shift: float, b0: float) -> float:
    """Refine b0 by minimising the kernel-smoothed robust 0-1 risk mean Phi(-margin / h).
    The exact empirical minimiser converges only at the rate n^(-1/3) (the argmin of a step
    function); smoothing lowers the variance but biases b, since it widens both classes by h.
    h = 0.25 s n^(-1/5), s the pooled within-class std of the score, keeps that bias well under
    the noise (measured at n = 1e5 on the default mixture: class-wise accuracy error rms
    0.0068 vs 0.0089 exact, mean error < 0.001)."""
    s = math.sqrt((score[y > 0].var() + score[y < 0].var()) / 2)
    h = 0.25 * s * len(score) ** -0.2
    sign_y = np.where(y > 0, 1.0, -1.0)

    def risk(b):
        return _phi(-(sign_y * (score + b) - shift) / h).mean()

    from scipy.optimize import minimize_scalar
    res = minimize_scalar(risk, bounds=(b0 - 5 * h, b0 + 5 * h), method="bounded",
                          options=dict(xatol=1e-4 * h))
    return float(res.x)


def train_linear(X: np.ndarray, y: np.ndarray, eps: float) -> tuple[np.ndarray, float]:
    """(w, b) trained at eps. w minimises the adversarial logistic loss
    mean log(1 + exp(-(y(<w, x> + b) - eps ||w||_1))) (convex; its population minimiser is
    proportional to 1 by symmetry) with L-BFGS. Then b is refit to minimise the empirical
    robust 0-1 risk, the objective of Eq. (7), which the logistic loss only approximates when
    the variances differ: exactly, then smoothed (see _smoothed_bias)."""
    n, d = X.shape

    def loss_grad(theta):
        w, b = theta[:d], theta[d]
        z = y * (X @ w + b) - eps * np.abs(w).sum()
        loss = np.logaddexp(0.0, -z).mean()
        g = -np.exp(-np.logaddexp(0.0, z))      # d loss_i / d z_i = -sigmoid(-z), stable
        gw = (X.T @ (g * y)) / n - eps * np.sign(w) * g.mean()
        return loss, np.append(gw, (g * y).mean())

    theta0 = np.append(np.full(d, 0.1), 0.0)
    from scipy.optimize import minimize
    res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B", options=dict(maxiter=500))
    w = res.x[:d]
    score, shift = X @ w, eps * np.abs(w).sum()
    return w, _smoothed_bias(score, y, shift, _best_bias(score, y, shift))


def classwise_accuracy(X, y, w, b, eps) -> dict:
    """Held-out class-wise robust accuracy (fractions), class mean and VCRA."""
    ok = robust_correct(X, y, w, b, eps)
    acc_pos, acc_neg = float(ok[y > 0].mean()), float(ok[y < 0].mean())
    return dict(acc_pos=acc_pos, acc_neg=acc_neg, avg=(acc_pos + acc_neg) / 2,
                vcra=vcra(acc_pos, acc_neg))


def simulate(m: Mixture, eps_grid, eps_test: float, n: int, seed: int, repeats: int = 5) -> list[dict]:
    """For each of `repeats` independent replicates: draw n training and n test samples, train
    at every eps_train, evaluate at eps_test. Returns per eps_train the mean over replicates of
    each metric and its standard error std/sqrt(repeats), which covers both the test-sample
    noise and the noise of training on finite data. Within a replicate every eps_train sees
    the same samples, so the curve's noise is shared rather than point to point."""
    rng = np.random.default_rng(seed)
    runs = []                                   # runs[r][i]: metrics of replicate r at eps_grid[i]
    for _ in range(repeats):
        Xtr, ytr = sample(m, n, rng)
        Xte, yte = sample(m, n, rng)
        row = []
        for eps in eps_grid:
            w, b = train_linear(Xtr, ytr, eps)
            row.append(classwise_accuracy(Xte, yte, w, b, eps_test))
            row[-1]["cos_w_1"] = float(w.sum() / (np.linalg.norm(w) * math.sqrt(m.d)))
        runs.append(row)
    out = []
    for i in range(len(eps_grid)):
        point = {}
        for key in runs[0][i]:
            vals = np.array([run[i][key] for run in runs])
            point[key] = float(vals.mean())
            point[f"se_{key}"] = float(vals.std(ddof=1) / math.sqrt(repeats)) if repeats > 1 else float("nan")
        out.append(point)
    return out
