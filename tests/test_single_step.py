"""Single-step training attacks (FGSM-RS, N-FGSM): the fast path (fastfat.attacks.pgd at one step
with its start and projection options) equals the reference (fastfat.reference.ref_fgsm_rs /
ref_nfgsm) in float64, keeps to its ball, and trains every method that takes it, fused and
unfused, as the reference trains."""
import copy

import pytest
import torch

from fastfat import attacks, reference
from fastfat.attacks import pgd, train_attack_args
from fastfat.config import make_train_config
from fastfat.data import MemoryLoader, make_synthetic
from fastfat.models import build_model
from fastfat.runfiles import build_for_config
from fastfat.train import Trainer
from test_fused import MEMBERS, assert_members_equal, configs, run_both

EPS = 8 / 255


def _model(device="cpu", seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", 10, width=8).eval().to(device)


def _batch(n=16, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 16, 16, generator=g)
    x[0, :, :2] = 0.0   # pixels on the box edges: the [0, 1] clamp is exercised
    x[1, :, :2] = 1.0
    return x.to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def _gen(device="cpu"):
    return torch.Generator(device=device).manual_seed(3)


@pytest.mark.parametrize("loss", ["ce", "kl"])
@pytest.mark.parametrize("kind", ["fgsm-rs", "n-fgsm"])
def test_fast_equals_reference_in_float64(kind, loss, device):
    model = _model(device).double()
    x, y = _batch(device=device)
    x = x.double()
    alpha = 1.25 * EPS if kind == "fgsm-rs" else EPS
    f = pgd(model, x, y, EPS, alpha, loss=loss, generator=_gen(device), **train_attack_args(kind, 7, EPS, 2.0))
    ref = reference.ref_fgsm_rs if kind == "fgsm-rs" else reference.ref_nfgsm
    r = ref(model, x, y, EPS, alpha, loss=loss, generator=_gen(device))
    assert f.dtype == r.dtype == torch.float64
    assert torch.equal(f, r)
    assert not torch.equal(f, x)


def test_balls_and_box():
    """FGSM-RS stays in the eps-ball; N-FGSM leaves it (no projection) but stays in (k + 1) eps;
    both stay in [0, 1]."""
    model = _model()
    x, y = _batch(64)
    rs = pgd(model, x, y, EPS, 1.25 * EPS, generator=_gen(), **train_attack_args("fgsm-rs", 9, EPS))
    nf = pgd(model, x, y, EPS, EPS, generator=_gen(), **train_attack_args("n-fgsm", 9, EPS, 2.0))
    for a in (rs, nf):
        assert a.min() >= 0 and a.max() <= 1
    assert (rs - x).abs().max() <= EPS + 1e-6
    assert (nf - x).abs().max() > 1.5 * EPS          # no projection: the noise alone reaches 2 eps
    assert (nf - x).abs().max() <= 3 * EPS + 1e-6
    # k = 0 is plain FGSM without a random start: one step of eps from x
    plain = pgd(model, x, y, EPS, EPS, **train_attack_args("n-fgsm", 9, EPS, 0.0))
    assert torch.equal(plain, pgd(model, x, y, EPS, EPS, 1, random_start=False))


def test_per_sample_radii():
    """Per-sample eps (a peer method's class-wise radii) scale the start and the step per sample."""
    model = _model()
    x, y = _batch(8)
    eps = torch.tensor([0.0, 0.02, 0.05, 0.1] * 2)
    out = pgd(model, x, y, eps, eps, generator=_gen(), **train_attack_args("n-fgsm", 9, eps, 2.0))
    dev = (out - x).abs().flatten(1).amax(1)
    assert dev[0] == 0 and dev[4] == 0
    assert torch.all(dev <= 3 * eps + 1e-6)


@pytest.mark.parametrize("method,extra", [("madry", {}), ("fat-madry", dict(lam=1.0)),
                                          ("trades", {}), ("fat-trades", dict(lam=1.0))])
@pytest.mark.parametrize("kind", ["fgsm-rs", "n-fgsm"])
def test_trainer_matches_the_reference(method, extra, kind, device):
    """Eight SGD steps in float64: the fast trainer (channels_last, BN-folded attack copy) ends
    with the reference's weights, each attacking with its method's objective."""
    cfg = make_train_config(None, dataset="synthetic", model="cnn", width=4, eps_train=EPS, lr=0.05,
                            method=method, train_attack=kind, **extra)
    tr, _ = make_synthetic(n_train=128)
    fast_model = build_for_config(cfg, device).double()
    ref_model = copy.deepcopy(fast_model).to(memory_format=torch.contiguous_format)
    trainer = Trainer(cfg, fast_model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    g_fast, g_ref = _gen(device), _gen(device)
    for x, y in list(MemoryLoader(tr, 16, False, device=device))[:8]:
        x = x.double()
        out = trainer.train_step(x.contiguous(memory_format=torch.channels_last), y, g_fast)
        ref_loss = reference.ref_train_step(
            ref_model, ref_opt, x.contiguous(), y, method=method, eps=cfg.eps_train, alpha=cfg.alpha(),
            steps=cfg.steps, lam=cfg.lam, beta=cfg.beta, mode=cfg.vcar_mode, num_classes=10,
            generator=g_ref, train_attack=kind, nfgsm_noise=cfg.nfgsm_noise)
        assert float(out.loss) == pytest.approx(ref_loss, rel=1e-6)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(fast_model.state_dict()[k], v, rtol=1e-6, atol=1e-9, msg=k)


def test_step_size_defaults_and_override():
    mk = lambda **kw: make_train_config(None, dataset="synthetic", eps_train=0.1, **kw)
    assert mk(train_attack="fgsm-rs").alpha() == pytest.approx(0.125)
    assert mk(train_attack="n-fgsm").alpha() == pytest.approx(0.1)
    assert mk(train_attack="n-fgsm", single_step_size="eps/2").alpha() == pytest.approx(0.05)
    assert mk(train_attack="pgd", step_size="eps/4", single_step_size="eps/2").alpha() == pytest.approx(0.025)
    assert mk(train_attack="n-fgsm").guard == "warn" and mk().guard == "off"
    assert mk(co_guard="stop").guard == "stop"


@pytest.mark.parametrize("kind", ["fgsm-rs", "n-fgsm"])
@pytest.mark.parametrize("family", ["madry", "fat-trades"])
def test_fused_single_step_equals_unfused(kind, family):
    """A fused group (members of their own method, radius, lambda and seed) trains each member as
    its unfused Trainer does with a single-step attack: same weights and losses after 5 steps in
    float64 (test_fused's harness)."""
    members = MEMBERS if family == "madry" else [dict(method="fat-trades", lam=0.0, seed=0),
                                                   dict(method="fat-trades", lam=1.0, eps_train=4 / 255, seed=1)]
    singles, fused, l1, l2 = run_both(configs(members, train_attack=kind, co_guard="off"), 5)
    for a, b in zip(l1, l2):
        assert b == pytest.approx(a, rel=1e-10)
    assert_members_equal(singles, fused, rtol=1e-10, atol=1e-10)


def test_absld_and_wat_take_it_bat_and_fair_ard_refuse():
    from fastfat import methods
    assert set(methods.NO_SINGLE_STEP) == {"bat", "fair-ard"}
    assert attacks.SINGLE_STEP == ("fgsm-rs", "n-fgsm")
