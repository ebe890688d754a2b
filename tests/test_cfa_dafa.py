"""CFA and DAFA (fastfat.methods): their formulas against hand-computed values and their config
checks (the runs: test_cfa_dafa_runs.py)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfat import losses, methods
from fastfat.config import base_method, make_train_config
from fastfat.errors import UserError
from fastfat.methods.cfa import calibrated_beta, calibrated_eps, ccr_weights, fawa_update
from fastfat.methods.dafa import class_weights

D64 = torch.float64


def _cfg(method="cfa-madry", **kw):
    """A digits run of a second or so: the small CNN, 2 epochs, PGD-2."""
    base = dict(method=method, width=8, epochs=2, train_limit=300, steps=2, eps_train=0.1,
                device="cpu", loader="memory", schedule="constant")
    if method.startswith("cfa-"):
        base.update(cfa_begin=1)
        if kw.get("cfa_fawa", True):
            base.update(val_per_class=5, val_attack="pgd2")
    base.update(kw)
    return make_train_config("demo", **base)


# ---------------------------------------------------------------------------------------------
# CFA

def test_ccm_radii_from_the_previous_epochs_class_accuracy():
    """t_y = correct_y / n_y of the epoch's train-mode adversarial predictions; from cfa_begin
    on, class y is attacked at (lambda1 + t_y) * eps with the step unchanged; before, at eps."""
    cfg = _cfg(cfa_begin=1, cfa_lambda1=0.5, cfa_fawa=False)
    m = methods.build(cfg, 10, "cpu")
    m.start_epoch(0)
    y = torch.tensor([0, 0, 1, 1, 2])
    assert m.radii(y) == (cfg.eps_train, cfg.alpha())
    # predictions: class 0 one of two right, class 1 both, class 2 none
    pred = torch.tensor([0, 3, 1, 1, 0])
    m.loss(y, F.one_hot(pred, 10).float(), None)
    m.end_epoch(0, nn.Linear(1, 1), {})
    t = [0.5, 1.0, 0.0] + [0.0] * 7
    assert m.train_acc.tolist() == t
    m.start_epoch(1)
    eps, alpha = m.radii(y)
    expect = torch.tensor([(0.5 + t[c]) * cfg.eps_train for c in y.tolist()], dtype=D64)
    assert torch.allclose(eps, expect, rtol=0, atol=1e-15) and alpha == cfg.alpha()
    assert torch.allclose(calibrated_eps(torch.tensor([0.2, 0.5, 1.0], dtype=D64), 0.5, 0.1),
                          torch.tensor([0.07, 0.1, 0.15], dtype=D64), rtol=0, atol=1e-15)


def test_ccr_betas_and_their_trades_loss():
    """beta_y = (lambda2 + t_y) * beta; the loss is CFA's normalised one
    sum_i [(1 - b_i) CE_i + b_i KL_i] / N with b = beta_y / (1 + beta_y), times 1 + beta."""
    t = torch.tensor([0.2, 0.5], dtype=D64)
    betas = calibrated_beta(t, 0.5, 6.0)
    assert torch.allclose(betas, torch.tensor([4.2, 6.0], dtype=D64), rtol=0, atol=1e-14)
    ce_w, kl_w = ccr_weights(betas, 6.0)
    assert torch.allclose(ce_w, torch.tensor([7 / 5.2, 1.0], dtype=D64), rtol=0, atol=1e-14)
    assert torch.allclose(kl_w, torch.tensor([7 * 4.2 / 5.2, 6.0], dtype=D64), rtol=0, atol=1e-14)
    nat = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], dtype=D64)
    adv = torch.tensor([[0.5, 1.0, -1.0], [1.0, 0.0, 0.5]], dtype=D64)
    y = torch.tensor([0, 1])
    soft = lambda row: [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
    p, q = [soft(r) for r in nat.tolist()], [soft(r) for r in adv.tolist()]
    ce = [-math.log(p[i][int(y[i])]) for i in range(2)]
    kl = [sum(a * math.log(a / b) for a, b in zip(p[i], q[i])) for i in range(2)]
    b = [4.2 / 5.2, 6 / 7]
    cfa_code = sum((1 - b[i]) * ce[i] / 2 + b[i] * kl[i] / 2 for i in range(2))
    got = losses.weighted_trades_loss(nat, adv, y, ce_w[y], kl_w[y])
    assert abs(float(got) - 7 * cfa_code) < 1e-12
    # beta_y = beta is TRADES
    same = losses.weighted_trades_loss(nat, adv, y, 1.0, 6.0)
    assert abs(float(same) - float(losses.trades_loss(nat, adv, y, 6.0))) < 1e-12


def test_fawa_is_an_ema_gated_by_the_validation_worst_class():
    """Below the threshold nothing changes (and nothing is evaluated instead of the weights);
    the first epoch at or above it copies the weights, later ones average with decay; integer
    buffers are copied."""
    cfg = _cfg(cfa_fawa_decay=0.85, cfa_fawa_threshold=0.2)
    m = methods.build(cfg, 10, "cpu")
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    w = model[0].weight
    rows = [(1.0, 0.1), (1.0, 0.2), (3.0, 0.5), (5.0, 0.19)]   # (weight, val_worst_acc)
    expect = [None, 1.0, 0.85 * 1.0 + 0.15 * 3.0, 0.85 * 1.0 + 0.15 * 3.0]
    for epoch, ((value, worst), want) in enumerate(zip(rows, expect)):
        with torch.no_grad():
            w.fill_(value)
        model[1].num_batches_tracked.fill_(epoch)
        m.start_epoch(epoch)
        row = m.end_epoch(epoch, model, {"val_worst_acc": worst})
        if want is None:
            assert m.fawa is None and methods.EVAL_MODEL not in m.state_dict()
        else:
            assert abs(float(m.fawa["0.weight"]) - want) < 1e-6
            assert int(m.fawa["1.num_batches_tracked"]) == min(epoch, 2)
    assert row["fawa_updates"] == 2
    a, b = {"w": torch.tensor([2.0], dtype=D64)}, {"w": torch.tensor([4.0], dtype=D64)}
    assert float(fawa_update(a, b, 0.88)["w"]) == 2.0 * 0.88 + 4.0 * (1 - 0.88)


# ---------------------------------------------------------------------------------------------
# DAFA

def test_dafa_class_weights_by_hand():
    """p_ii < p_jj: W_i += lambda p_ij p_jj; else W_i -= lambda p_ji p_ii (their loop)."""
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.05, 0.05, 0.9]], dtype=D64)
    # W0 = 1 + .3*.7 + .1*.9; W1 = 1 - .3*.7 + .1*.9; W2 = 1 - .1*.9 - .1*.9
    assert torch.allclose(class_weights(p, 1.0), torch.tensor([1.30, 0.88, 0.82], dtype=D64),
                          rtol=0, atol=1e-15)
    assert torch.allclose(class_weights(p, 2.0), torch.tensor([1.60, 0.76, 0.64], dtype=D64),
                          rtol=0, atol=1e-15)
    # equal diagonals: both take the else branch and lose
    tie = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=D64)
    assert class_weights(tie, 1.0).tolist() == [0.75, 0.75]


def test_dafa_statistics_weights_radii_and_losses():
    """The last warm-up epoch's mean adversarial softmax per class gives the weights; after it,
    class y's radius and step are W_y times eps and alpha, and W_y weights its CE (Madry: the
    adversarial CE; TRADES: the natural CE, beta * KL unweighted)."""
    cfg = _cfg("dafa-madry", dafa_warmup=1, dafa_lambda=1.0)
    m = methods.build(cfg, 3, "cpu")
    m.start_epoch(0)
    assert m.collect
    rows = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.05, 0.05, 0.9]], dtype=D64)
    # two samples of class 0 whose softmax averages to row 0; one each of classes 1 and 2
    probs = torch.stack([rows[0] + torch.tensor([0.1, -0.1, 0.0], dtype=D64),
                         rows[0] - torch.tensor([0.1, -0.1, 0.0], dtype=D64), rows[1], rows[2]])
    y = torch.tensor([0, 0, 1, 2])
    m.loss(y, probs.log().float(), None)
    row = m.end_epoch(0, nn.Linear(1, 1), {})
    assert torch.allclose(m.weights, torch.tensor([1.30, 0.88, 0.82], dtype=D64), atol=1e-6)
    assert row["dafa_weights"] == m.weights.tolist()
    m.start_epoch(1)
    assert not m.collect
    eps, alpha = m.radii(y)
    w = m.weights[y]
    assert torch.equal(eps, w * cfg.eps_train) and torch.equal(alpha, w * cfg.alpha())
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 3.0]], dtype=D64)
    ce = F.cross_entropy(logits, y, reduction="none")
    loss, _ = m.loss(y, logits, None)
    assert abs(float(loss) - float((w * ce).mean())) < 1e-12
    t = methods.build(_cfg("dafa-trades", dafa_warmup=1), 3, "cpu")
    t.load_state_dict(m.state_dict())
    nat = logits.flip(1)
    kl = (F.softmax(nat, 1) * (F.log_softmax(nat, 1) - F.log_softmax(logits, 1))).sum(1)
    loss, _ = t.loss(y, logits, nat)
    ce_nat = F.cross_entropy(nat, y, reduction="none")
    assert abs(float(loss) - float((w * ce_nat).mean() + 6.0 * kl.mean())) < 1e-12


# ---------------------------------------------------------------------------------------------
# Config

@pytest.mark.parametrize("overrides, message", [
    (dict(method="cfa-madry", cfa_begin=1), "--val-per-class"),
    (dict(method="cfa-madry", cfa_fawa=False, cfa_begin=2), "cfa_begin 2"),
    (dict(method="dafa-trades", dafa_warmup=2), "dafa_warmup 2"),
    (dict(method="dafa-madry", dafa_warmup=1.5), "whole number of epochs"),
    (dict(method="dafa-madry", dafa_warmup=1, dafa_lambda=-1), "dafa_lambda must be in"),
    (dict(method="madry", cfa_fawa_decay=1.5), "cfa_fawa_decay must be in"),
    (dict(method="madry", cfa_fawa_threshold=-0.1), "cfa_fawa_threshold must be in"),
    (dict(method="madry", cfa_lambda1=float("nan")), "cfa_lambda1"),
])
def test_config_errors(overrides, message):
    base = dict(dataset="digits", model="cnn", epochs=2, device="cpu")
    with pytest.raises(UserError, match=message):
        make_train_config(None, **dict(base, **overrides))


def test_config_defaults_and_names():
    cfg = make_train_config(None, method="cfa-trades", val_per_class=0.02)
    assert (cfg.cfa_lambda1, cfg.cfa_lambda2, cfg.cfa_begin) == (0.5, 0.5, 10)
    assert (cfg.cfa_fawa, cfg.cfa_fawa_decay, cfg.cfa_fawa_threshold) == (True, 0.85, 0.2)
    assert (cfg.dafa_lambda, cfg.dafa_warmup) == (1.0, 70)
    assert [base_method(m) for m in ("cfa-madry", "cfa-trades", "dafa-madry", "dafa-trades")] == \
        ["madry", "trades", "madry", "trades"]
    # a fraction of the epochs
    assert methods.base.epochs_of(0.64, 110) == 70 and methods.base.epochs_of(0.01, 10) == 1
