"""WAT's and FRL's formulas (fastfat.methods.wat / .frl) against values worked out by hand."""
import math

import torch

from fastfat import losses
from fastfat.methods import frl, wat

LN2, LN43 = math.log(2), math.log(4 / 3)
D = torch.float64


def t(*v):
    return torch.tensor(v, dtype=D)


# ---------------------------------------------------------------------------------------------
# WAT

def test_hedge_weights_are_c_times_softmax_of_eta_times_cumulative_cost():
    # exp(1 * [0, ln2, ln3]) = [1, 2, 3]: weights C * [1, 2, 3] / 6 with C = 2
    w = wat.hedge_weights(t(0.0, LN2, math.log(3)), eta=1.0)
    assert torch.allclose(w, t(1 / 3, 2 / 3, 1.0), atol=1e-15, rtol=0)
    # eta scales the cost: eta 0.5 on [0, 2 ln2, 2 ln3] is the same
    assert torch.allclose(wat.hedge_weights(t(0.0, 2 * LN2, 2 * math.log(3)), 0.5), w, atol=1e-15, rtol=0)
    # costs in the thousands do not overflow (their code's plain exp would give inf / inf)
    w = wat.hedge_weights(t(5000.0, 5000.0, 4000.0), eta=1.0)
    assert torch.allclose(w, t(1.0, 1.0, 0.0), atol=1e-15, rtol=0)


def test_initial_weights_are_ones_over_classes_and_average():
    assert wat.initial_weights(3).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_costs_are_class_means_then_overall_mean():
    assert wat.costs_from_stats(t(3.0, 4.0), t(1.0, 4.0)).tolist() == [3.0, 1.0, 1.4]
    # a class without validation samples costs 0
    assert wat.costs_from_stats(t(0.0, 4.0), t(0.0, 2.0)).tolist() == [0.0, 2.0, 2.0]


def _nat_adv():
    # nat logits 0 (p = [1/2, 1/2]); adv logits [0, ln 3] (q = [1/4, 3/4]):
    # CE = ln 2, KL(p || q) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3)
    nat = torch.zeros(3, 2, dtype=D)
    adv = torch.tensor([[0.0, math.log(3)]] * 3, dtype=D)
    return nat, adv


def test_per_sample_trades_is_ce_plus_beta_kl():
    nat, adv = _nat_adv()
    y = torch.tensor([0, 1, 1])
    got = wat.per_sample_trades(nat, adv, y, beta=2.0)
    assert torch.allclose(got, torch.full((3,), LN2 + LN43, dtype=D), atol=1e-14, rtol=0)


def test_wat_loss_weights_class_sums_and_adds_weighted_trades_mean():
    nat = torch.zeros(3, 2, dtype=D)   # CE = ln 2 per sample, KL 0 (adv = nat)
    y = torch.tensor([0, 0, 1])
    # (1 * 2 ln2 + 2 * ln2) / 3 + 0.5 * (3 ln2) / 3 = ln2 * (4/3 + 1/2)
    got = wat.wat_loss(nat, nat.clone(), y, 6.0, t(1.0, 2.0, 0.5), num_classes=2)
    assert abs(float(got) - LN2 * (4 / 3 + 1 / 2)) < 1e-14


def test_wat_loss_with_their_initial_weights_is_twice_trades():
    g = torch.Generator().manual_seed(0)
    nat, adv = torch.randn(8, 4, generator=g, dtype=D), torch.randn(8, 4, generator=g, dtype=D)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 1])
    got = wat.wat_loss(nat, adv, y, 6.0, wat.initial_weights(4), 4)
    assert abs(float(got) - 2 * float(losses.trades_loss(nat, adv, y, 6.0))) < 1e-12


def test_wat_loss_matches_their_per_class_loop_and_is_differentiable():
    g = torch.Generator().manual_seed(1)
    nat = torch.randn(10, 3, generator=g, dtype=D, requires_grad=True)
    adv = torch.randn(10, 3, generator=g, dtype=D)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])
    w = t(0.5, 1.5, 0.7, 0.3)
    ce = torch.nn.functional.cross_entropy(nat, y, reduction="none")
    kl = (torch.softmax(nat, 1) * (torch.log_softmax(nat, 1) - torch.log_softmax(adv, 1))).sum(1)
    want = sum(w[c] * (ce[y == c].sum() + 6.0 * kl[y == c].sum()) for c in range(3)) / 10 \
        + w[3] * (ce.mean() + 6.0 * kl.mean())
    got = wat.wat_loss(nat, adv, y, 6.0, w, 3)
    assert abs(float(got.detach()) - float(want.detach())) < 1e-12
    got.backward()
    assert nat.grad is not None and torch.isfinite(nat.grad).all()


# ---------------------------------------------------------------------------------------------
# FRL

def test_error_rates_clean_and_boundary_per_class_and_overall():
    ce, be, ce_all, be_all = frl.error_rates(t(8.0, 5.0), t(4.0, 5.0), t(10.0, 10.0))
    assert torch.allclose(ce, t(0.2, 0.5), atol=1e-15, rtol=0)
    assert torch.allclose(be, t(0.4, 0.0), atol=1e-15, rtol=0)
    assert abs(float(ce_all) - 0.35) < 1e-15 and abs(float(be_all) - 0.2) < 1e-15


def test_gaps_are_class_error_minus_overall_minus_bound():
    g = frl.gaps(t(0.2, 0.5), 0.35, 0.1)
    assert torch.allclose(g, t(-0.25, 0.05), atol=1e-15, rtol=0)


def test_project_clips_at_zero_and_scales_down_to_lim():
    assert torch.allclose(frl.project(t(-0.1, 0.3, 0.5), 0.5), t(0.0, 0.1875, 0.3125), atol=1e-15, rtol=0)
    assert frl.project(t(0.1, 0.2), 0.5).tolist() == [0.1, 0.2]   # under lim: unchanged


def test_rate_halves_at_every_40th_epoch_one_based():
    assert [frl.rate_at(0.05, e) for e in (0, 38, 39, 78, 79)] == [0.05, 0.05, 0.025, 0.025, 0.0125]


def test_update_multipliers_steps_projects_and_remargins():
    z = torch.zeros(2, dtype=D)
    kw = dict(rate_nat=0.05, rate_bndy=0.1, rate_margin=0.2, lim=0.5)
    n, b, m = frl.update_multipliers(z, z, z, t(-0.25, 0.05), t(0.3, -0.1), remargin=True, **kw)
    assert torch.allclose(n, t(0.0, 0.0025), atol=1e-15, rtol=0)
    assert torch.allclose(b, t(0.03, 0.0), atol=1e-15, rtol=0)
    assert torch.allclose(m, t(0.06, -0.02), atol=1e-15, rtol=0)   # not projected
    _, _, m = frl.update_multipliers(z, z, z, t(-0.25, 0.05), t(0.3, -0.1), remargin=False, **kw)
    assert m.tolist() == [0.0, 0.0]


def test_class_weights_are_the_lagrangian_coefficients():
    # their loop: 1/C + (C-1)/C lam_i - 1/C sum_{j != i} lam_j
    lam = t(0.1, 0.3, 0.0)
    assert torch.allclose(frl.class_weights(lam), t(0.3, 0.5, 0.2), atol=1e-15, rtol=0)


def test_margin_factors_exp_two_lambda_clipped():
    got = frl.margin_factors(t(0.0, LN2 / 2, -1.0, 1.0), margin_max=3.0)
    assert torch.allclose(got, t(1.0, 2.0, 0.98, 3.0), atol=1e-15, rtol=0)


def test_frl_loss_is_two_weighted_means():
    # sample 0 (y 0): nat 0 -> CE ln2; adv [0, ln3] -> KL 1/2 ln(4/3)
    # samples 1, 2 (y 1): nat [0, ln3] -> CE ln(4/3); adv = nat -> KL 0
    nat = torch.tensor([[0.0, 0.0], [0.0, math.log(3)], [0.0, math.log(3)]], dtype=D)
    adv = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)], [0.0, math.log(3)]], dtype=D)
    y = torch.tensor([0, 1, 1])
    got = frl.frl_loss(nat, adv, y, 1.5, t(0.3, 0.7), t(0.2, 0.8))
    want = (0.3 * LN2 + 1.4 * LN43) / 1.7 + 1.5 * (0.2 * 0.5 * LN43) / 1.8
    assert abs(float(got) - want) < 1e-14


def test_frl_loss_with_uniform_weights_is_trades():
    g = torch.Generator().manual_seed(2)
    nat, adv = torch.randn(6, 3, generator=g, dtype=D), torch.randn(6, 3, generator=g, dtype=D)
    y = torch.tensor([0, 1, 2, 2, 1, 1])
    w = frl.class_weights(torch.zeros(3, dtype=D))
    got = frl.frl_loss(nat, adv, y, 1.5, w, w)
    assert abs(float(got) - float(losses.trades_loss(nat, adv, y, 1.5))) < 1e-13


def test_per_sample_radius_from_class_factors():
    got = frl.per_sample(torch.tensor([1.0, 2.0]), torch.tensor([1, 0, 1]), 0.5)
    assert got.dtype == torch.float32 and got.tolist() == [1.0, 0.5, 1.0]
