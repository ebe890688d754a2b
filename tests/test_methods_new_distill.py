"""Fair-ARD's and ABSLD's formulas against hand-computed values on small tensors, and their
attacks against plain float64 loops in their code's shape."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfat import attacks
from fastfat.methods import absld, fair_ard

D = torch.float64


def linear_model(seed=0, classes=3, dim=12):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(dim, classes)).to(D).eval()


# --------------------------------------------------------------------------------------------
# Fair-ARD

def test_fair_ard_class_weights_by_hand():
    # kappa 1, 2, 4 -> 1/kappa^2 = 1, 1/4, 1/16 (sum 21/16) -> x 3 / (21/16): 16/7, 4/7, 1/7
    # -> clamped to [5/6, 5/2]: 16/7, 5/6, 5/6  (the 1e-5 shift moves them by < 1e-4)
    w = fair_ard.class_weights(torch.tensor([1.0, 2.0, 4.0], dtype=D), 2.0)
    torch.testing.assert_close(w, torch.tensor([16 / 7, 5 / 6, 5 / 6], dtype=D), atol=1e-4, rtol=0)
    # beta 0: every k_c = 1 -> weights 1 whatever kappa
    torch.testing.assert_close(fair_ard.class_weights(torch.tensor([0.5, 7.0], dtype=D), 0.0),
                               torch.ones(2, dtype=D))
    # a class never correct (kappa 0) takes the top weight, the others the floor
    w = fair_ard.class_weights(torch.tensor([0.0, 3.0, 5.0], dtype=D), 2.0)
    torch.testing.assert_close(w, torch.tensor([5 / 2, 5 / 6, 5 / 6], dtype=D))


def test_fair_ard_distill_loss_by_hand():
    teacher = torch.tensor([[0.0, 0.0]], dtype=D)           # soft label 1/2, 1/2 at any T
    student = torch.tensor([[math.log(3.0), 0.0]], dtype=D)  # softmax 3/4, 1/4 at T = 1
    w = torch.tensor([2.0], dtype=D)
    # T = 1: KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); / C = 2; x w = 2
    got = fair_ard.distill_loss(student, teacher, w, 1.0)
    assert float(got) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # T = 2: the student's softmax at logits / 2 is r = sqrt3 / (sqrt3 + 1), 1 - r; x T^2 = 4
    r = math.sqrt(3) / (math.sqrt(3) + 1)
    kl = 0.5 * math.log(0.5 / r) + 0.5 * math.log(0.5 / (1 - r))
    assert float(fair_ard.distill_loss(student, teacher, w, 2.0)) == pytest.approx(4 * kl / 2 * 2, rel=1e-6)


def test_fair_ard_counting_matches_their_loop():
    """pgd_counting = their AttackPGD (eval mode): the same iterates and, per sample, the number
    of iterates x_0..x_{K-1} classified correctly."""
    model = linear_model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 2, 2, dtype=D, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    eps, alpha, steps = 0.3, 0.1, 5
    noise = attacks.uniform_noise(x, torch.Generator().manual_seed(5))
    x_adv, kappa = fair_ard.pgd_counting(model, x, y, eps, alpha, steps,
                                         generator=torch.Generator().manual_seed(5), fold_bn=False)
    xk, ref = (x + noise * eps).clamp(0, 1), torch.zeros(16, dtype=D)
    for _ in range(steps):
        xk.requires_grad_(True)
        out = model(xk)
        ref += (out.argmax(1) == y).to(D)
        grad, = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xk)
        xk = torch.min(torch.max(xk.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.equal(kappa.to(D), ref) and 0 < ref.sum() < 16 * steps   # not all 0 or all K
    # bounded, not equal: kernels.pgd_step does its math in fp32 (~3e-8 on values in [0, 1])
    torch.testing.assert_close(x_adv, xk, atol=1e-7, rtol=0)


def test_fair_ard_counting_without_a_ball_counts_clean_correctness():
    model = linear_model(seed=3)
    x = torch.rand(10, 3, 2, 2, dtype=D, generator=torch.Generator().manual_seed(2))
    y = torch.arange(10) % 3
    _, kappa = fair_ard.pgd_counting(model, x, y, 0.0, 0.1, 4, fold_bn=False)
    assert torch.equal(kappa, 4 * (model(x).argmax(1) == y).float())


# --------------------------------------------------------------------------------------------
# ABSLD

def test_absld_temperature_update_by_hand():
    one = torch.ones(3, dtype=D)
    # gap = -1, 0, 1 (max |gap| 1): the hardest class's temperature drops by the rate
    got = absld.update_temperatures(one, torch.tensor([1.0, 2.0, 3.0], dtype=D), 0.1, 0.5, 5.0)
    torch.testing.assert_close(got, torch.tensor([1.1, 1.0, 0.9], dtype=D))
    # gap = 2, -2, 0 -> / 2 -> 1, -1, 0; x 0.1, clamped to [0.5, 5]
    got = absld.update_temperatures(torch.tensor([0.55, 4.95, 1.0], dtype=D),
                                    torch.tensor([4.0, 0.0, 2.0], dtype=D), 0.1, 0.5, 5.0)
    torch.testing.assert_close(got, torch.tensor([0.5, 5.0, 1.0], dtype=D))
    # equal losses: no step (their code divides 0 by 0)
    torch.testing.assert_close(absld.update_temperatures(one, torch.full((3,), 0.7, dtype=D), 0.1, 0.5, 5.0), one)


def test_absld_soft_kl_by_hand_and_their_gradient():
    teacher = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=D)
    student = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=D, requires_grad=True)
    # both rows: KL = 1/2 ln(4/3) (row 1) and 3/4 ln(3/2) + 1/4 ln(1/2) (row 2); mean over N * C = 4
    want = (0.5 * math.log(4 / 3) + 0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 4
    got = absld.soft_kl(student, teacher)
    assert float(got.detach()) == pytest.approx(want, rel=1e-12)
    # their kl_loss(log softmax(s), softmax(t)) = -a b + log(b + 1e-5) b, meaned: the same gradient
    grad, = torch.autograd.grad(got, student)
    a, b = F.log_softmax(student, 1), F.softmax(teacher, 1)
    theirs, = torch.autograd.grad((-a * b + torch.log(b + 1e-5) * b).mean(), student)
    torch.testing.assert_close(grad, theirs, rtol=1e-12, atol=1e-15)


class _Cfg:
    absld_code_temperatures = False


def test_absld_soft_labels_per_class_and_their_code():
    state = absld.ABSLD.__new__(absld.ABSLD)
    state.cfg = _Cfg()
    state.temp_adv = torch.tensor([2.0, 0.5], dtype=D)
    state.temp_nat = torch.tensor([4.0, 1.0], dtype=D)
    t = torch.tensor([[2.0, -4.0], [1.0, 3.0]])
    y = torch.tensor([0, 1])
    adv, nat = state.soft_labels(t, y)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -2.0], [2.0, 6.0]]))
    torch.testing.assert_close(nat, torch.tensor([[0.5, -1.0], [1.0, 3.0]]))
    state.cfg.absld_code_temperatures = True   # their code: one storage divided by both
    adv, nat = state.soft_labels(t, y)
    want = torch.tensor([[0.25, -0.5], [2.0, 6.0]])
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(nat, want)


def test_absld_attack_matches_their_inner_loss():
    """pgd(loss="kl", target=teacher soft labels) = their absld_inner_loss (eval mode, start
    x + 0.001 N(0, 1), sign steps on the summed KL to the teacher, projection, clamp)."""
    model, teacher = linear_model(seed=0), linear_model(seed=1)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(8, 3, 2, 2, dtype=D, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    soft = teacher(x).detach() / 1.7
    eps, alpha = 0.2, 0.05
    got = attacks.pgd(model, x, y, eps, alpha, 4, loss="kl", generator=torch.Generator().manual_seed(9),
                      fold_bn=False, target=soft)
    xa = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(D)
    for _ in range(4):
        xa.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(xa), 1), F.softmax(soft, 1), reduction="sum")
        grad, = torch.autograd.grad(kl, xa)
        xa = torch.min(torch.max(xa.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    torch.testing.assert_close(got, xa, atol=1e-7, rtol=0)   # pgd_step's fp32 math
    # the target matters: the student's own prediction gives another attack
    own = attacks.pgd(model, x, y, eps, alpha, 4, loss="kl", generator=torch.Generator().manual_seed(9),
                      fold_bn=False)
    assert (own - got).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:reduction")   # KLDivLoss warns about 'mean', which they use
def test_fair_ard_distill_loss_is_their_per_sample_loop():
    """Their loss: per sample nn.KLDivLoss()(log_softmax(s_i / T), softmax(t_i / T)) (its default
    'mean' over the C entries of a 1-D input) times w_{y_i}, summed / N, times T^2."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 4, dtype=D, generator=g) * 3, torch.randn(6, 4, dtype=D, generator=g) * 3
    w = torch.rand(6, dtype=D, generator=g) + 0.5
    temp = 30.0
    kl = nn.KLDivLoss()
    theirs = sum(kl(F.log_softmax(s[i] / temp, dim=0), F.softmax(t[i] / temp, dim=0)) * w[i]
                 for i in range(6)) / 6 * temp * temp
    torch.testing.assert_close(fair_ard.distill_loss(s, t, w, temp), theirs, rtol=1e-10, atol=0)
