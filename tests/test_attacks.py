"""Attacks: hand-checkable properties of the fast path, and fast == reference adversarial examples.

Fast path: fastfat.attacks (input gradients only, sum objectives, kernels.pgd_step, any layout).
Reference: fastfat.reference.ref_pgd (the authors' shape: loss.backward(), mean CE, NCHW).
Both draw the same start from the same generator, so they should produce the same adversarial
examples; the only legitimate differences are sign flips of gradient elements that are zero up
to rounding (mean vs sum objective, channels_last vs NCHW convolutions), checked at the first
step where the two trajectories part.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfat import attacks, kernels, runtime
from fastfat.attacks import PGD, cw_inf, fgsm, pgd, uniform_noise
from fastfat.data import make_synthetic
from fastfat.models import build_model
from fastfat.reference import ref_cw, ref_cwloss, ref_fgsm, ref_pgd

EPS, ALPHA = 8 / 255, 2 / 255


def _model(name="cnn", seed=0, num_classes=10, device="cpu"):
    torch.manual_seed(seed)
    return build_model(name, num_classes, width=8).eval().to(device)


def _batch(n=16, size=16, seed=0, c=10, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0, :, :2] = 0.0          # pixels on the box edges, so the [0, 1] clamp is exercised
    x[1, :, :2] = 1.0
    return x.to(device), torch.randint(0, c, (n,), generator=g).to(device)


def _gen(seed=1, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.fixture(scope="module")
def trained():
    """A tiny CNN trained naturally for a few epochs on the synthetic set, and a test batch."""
    tr, te = make_synthetic(n_train=500, n_test=64, seed=0)
    torch.manual_seed(0)
    model = build_model("cnn", 10, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x_all, y_all = tr.images.float() / 255, tr.labels
    for _ in range(3):
        for i in range(0, 500, 50):
            opt.zero_grad()
            F.cross_entropy(model(x_all[i:i + 50]), y_all[i:i + 50]).backward()
            opt.step()
    with torch.no_grad():   # BN running stats as the average over the training set, not lagging
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model(x_all)
    model.eval()
    x, y = te.images.float() / 255, te.labels
    assert (model(x).argmax(1) == y).float().mean() > 0.8   # it did learn (chance is 0.1)
    return model, x, y


# ---------------------------------------------------------------------------------------------
# Start-noise convention

@pytest.mark.parametrize("eps", [8 / 255, 16 / 255, 0.031, 0.1, 0.3])
def test_uniform_start_equals_uniform_eps_bit_for_bit(eps):
    """The fast path's U(-1, 1) * eps equals the reference's uniform_(-eps, eps), same generator,
    whatever x's layout (the noise is drawn in NCHW order)."""
    x, _ = _batch()
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        fast = uniform_noise(xin, _gen(7)) * eps
        ref = torch.empty(x.shape).uniform_(-eps, eps, generator=_gen(7))
        assert torch.equal(fast, ref)


# ---------------------------------------------------------------------------------------------
# Properties of the fast path

@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ball_box_and_layout(loss, channels_last, device):
    model = _model(device=device)
    x, y = _batch(device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    eps = 0.05
    adv = pgd(model, x, y, eps, 0.02, 5, loss=loss, generator=_gen(device=device))
    assert torch.equal(x, x_before)                       # input untouched
    assert adv.shape == x.shape and adv.dtype == torch.float32 and not adv.requires_grad
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert (adv != x).any()                               # it did move
    if channels_last:
        assert adv.is_contiguous(memory_format=torch.channels_last) and not adv.is_contiguous()
    else:
        assert adv.is_contiguous()


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_per_sample_eps_respected(loss, device):
    model = _model(device=device)
    x, y = _batch(n=8, device=device)
    eps = torch.tensor([0.0, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.2], device=device)
    adv = pgd(model, x, y, eps, eps / 4, 6, loss=loss, generator=_gen(device=device))
    dist = (adv - x).abs().flatten(1).amax(1)
    assert (dist <= eps + 1e-6).all()
    assert torch.equal(adv[0], x[0])                      # eps 0: not moved at all
    assert (dist[1:] > 0.5 * eps[1:]).all()               # the others used their own radius


def test_per_sample_eps_equals_float_eps_when_uniform(device):
    model = _model(device=device)
    x, y = _batch(n=8, device=device)
    a = pgd(model, x, y, EPS, ALPHA, 4, generator=_gen(device=device))
    for eps, alpha in ((torch.full((8,), EPS), torch.full((8,), ALPHA)), (torch.full((8,), EPS), ALPHA),
                       (EPS, torch.full((8,), ALPHA))):
        b = pgd(model, x, y, eps, alpha, 4, generator=_gen(device=device))
        assert torch.equal(a, b)


def test_per_sample_eps_shape_checked():
    model = _model()
    x, y = _batch(n=8)
    with pytest.raises(ValueError):
        pgd(model, x, y, torch.full((7,), EPS), ALPHA, 1)


def test_unknown_attack_loss():
    model = _model()
    x, y = _batch(n=4)
    with pytest.raises(ValueError):
        pgd(model, x, y, EPS, ALPHA, 1, loss="hinge")


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_eps_zero_returns_x(loss):
    model = _model()
    x, y = _batch()
    assert torch.equal(pgd(model, x, y, 0.0, ALPHA, 5, loss=loss, generator=_gen()), x)
    assert torch.equal(fgsm(model, x, y, 0.0, generator=_gen()), x)


def test_zero_steps_no_start_returns_x():
    model = _model()
    x, y = _batch()
    assert torch.equal(pgd(model, x, y, EPS, ALPHA, 0, random_start=False), x)


def test_model_mode_restored_per_module():
    model = _model().train()
    model.features[1].eval()                              # a mixed-mode model
    modes = {n: m.training for n, m in model.named_modules()}
    x, y = _batch(n=8)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    for loss in ("ce", "cw", "kl"):
        pgd(model, x, y, EPS, ALPHA, 2, loss=loss, generator=_gen())
        assert {n: m.training for n, m in model.named_modules()} == modes
    hook.remove()
    assert seen and not any(seen)                         # the attack ran in eval mode


def test_batchnorm_stats_untouched():
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch(n=8)
    pgd(model, x, y, EPS, ALPHA, 3, generator=_gen())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_parameter_grads_untouched():
    model = _model()
    x, y = _batch(n=8)
    params = list(model.parameters())
    pgd(model, x, y, EPS, ALPHA, 3, generator=_gen())
    assert all(p.grad is None for p in params)            # None stays None
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i))
    grads = [p.grad for p in params]
    for loss in ("ce", "cw", "kl"):
        pgd(model, x, y, EPS, ALPHA, 3, loss=loss, generator=_gen())
    for i, (p, g) in enumerate(zip(params, grads)):
        assert p.grad is g and torch.equal(g, torch.full_like(p, float(i)))


def test_attack_raises_the_loss_on_a_trained_model(trained):
    model, x, y = trained
    eps = 16 / 255
    with torch.no_grad():
        clean = model(x)
    ce_clean = F.cross_entropy(clean, y)
    for adv in (pgd(model, x, y, eps, eps / 4, 10, generator=_gen()), fgsm(model, x, y, eps, generator=_gen())):
        with torch.no_grad():
            assert F.cross_entropy(model(adv), y) > ce_clean
    adv = cw_inf(model, x, y, eps, eps / 4, 10, generator=_gen())
    with torch.no_grad():
        # the C&W objective (negative margin) goes up
        assert ref_cwloss(model(adv), y) > ref_cwloss(clean, y)
    adv = pgd(model, x, y, eps, eps / 4, 10, loss="kl", generator=_gen())
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(model(adv), 1), F.softmax(clean, 1), reduction="sum")
    assert kl > 1e-2
    # and the attacks beat accuracy: PGD lowers it
    with torch.no_grad():
        acc_clean = (clean.argmax(1) == y).float().mean()
        acc_adv = (model(pgd(model, x, y, eps, eps / 4, 10, generator=_gen())).argmax(1) == y).float().mean()
    assert acc_adv < acc_clean


def test_pgd_class_equals_pgd_with_the_same_seed():
    model = _model()
    x, y = _batch()
    atk = PGD(model, eps=EPS, alpha=ALPHA, steps=4)
    torch.manual_seed(123)
    a = atk(x, y)
    torch.manual_seed(123)
    b = pgd(model, x, y, EPS, ALPHA, 4)
    assert torch.equal(a, b)
    torch.manual_seed(124)
    assert not torch.equal(atk(x, y), a)                  # and it is random
    assert "eps=" in repr(atk)


def test_fgsm_is_one_step_of_eps_after_a_random_start():
    model = _model()
    x, y = _batch()
    eps = 0.05
    got = fgsm(model, x, y, eps, generator=_gen())
    # by hand: start, CE gradient sign, step of eps, project, clamp
    start = (x + torch.empty(x.shape).uniform_(-eps, eps, generator=_gen())).clamp(0, 1).requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(model(start), y, reduction="sum"), start)
    want = torch.min(torch.max(start.detach() + eps * g.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.equal(got, want)
    assert torch.equal(fgsm(model, x, y, eps, random_start=False),
                       pgd(model, x, y, eps, eps, 1, random_start=False))


def test_noise_argument_replaces_the_generator():
    model = _model()
    x, y = _batch()
    noise = uniform_noise(x, _gen(9))
    assert torch.equal(pgd(model, x, y, EPS, ALPHA, 3, noise=noise), pgd(model, x, y, EPS, ALPHA, 3, generator=_gen(9)))


# ---------------------------------------------------------------------------------------------
# Fast == reference

def _objective_grad(model, point, x, y, loss, form, kappa=50.0):
    """Gradient of an attack objective at `point`, model in eval mode, no parameter grads kept.

    form "ref": the reference's objective (mean CE, authors' cwloss, KLDivLoss on softmax), NCHW.
    form "fast": the fast path's (summed CE, kernels.cw_margin, kernels.trades_kl) in point's
    layout, CE rescaled by 1/N to the reference's scale.
    """
    model.eval()
    p = point.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    with torch.no_grad():
        nat = model(x)
    out = model(p)
    if form == "ref":
        if loss == "ce":
            obj = F.cross_entropy(out, y)
        elif loss == "cw":
            obj = ref_cwloss(out, y, kappa)
        else:
            obj = nn.KLDivLoss(reduction="sum")(F.log_softmax(out, 1), F.softmax(nat, 1))
    else:
        if loss == "ce":
            obj = F.cross_entropy(out, y, reduction="sum") / len(y)
        elif loss == "cw":
            obj = kernels.cw_margin(out, y, kappa).sum()
        else:
            obj = kernels.trades_kl(out, nat).sum()
    (g,) = torch.autograd.grad(obj, p, allow_unused=False)
    return g.contiguous()


def _check_rounding_only(model, point, x, y, loss, diff):
    """The elements where fast and reference first part must be sign flips of gradient elements
    that are zero within fp32 rounding: the two fp32 gradients have opposite signs there, and the
    float64 gradient is no larger than the reference's own fp32 rounding error in that sample
    (the band is the reference's, so a wrong fast gradient cannot widen it)."""
    layout = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()) else torch.contiguous_format
    g_ref = _objective_grad(model, point.contiguous(), x.contiguous(), y, loss, "ref")
    g_fast = _objective_grad(model, point.contiguous(memory_format=layout),
                             x.contiguous(memory_format=layout), y, loss, "fast")
    m64 = copy.deepcopy(model).double()
    g64 = _objective_grad(m64, point.double().contiguous(), x.double().contiguous(), y, loss, "ref").float()
    assert (g_ref.sign() != g_fast.sign())[diff].all(), "fast and reference differ where the gradient signs agree"
    err = (g_ref - g64).abs().flatten(1).amax(1)
    band = err.view(-1, 1, 1, 1).expand_as(g64)
    worst = (g64.abs()[diff] / band[diff]).max()
    assert worst <= 1.0, f"a sign differs where |grad| is {worst:.3g} x the fp32 rounding error"


def _lockstep(model, x, y, eps, alpha, steps, loss, seed=1, noise=None):
    """Run both attacks for k = 1..steps steps from the same start; at the first k where they
    differ, check the difference is rounding only (_check_rounding_only) at the common point
    reached after k-1 steps. Returns the final (fast, ref) and the first diverging step or None.
    Both attack the same unfolded model (fold_bn=False): this pins the attack's arithmetic; the
    folded copy is pinned against the model in test_models and test_attack_copy."""
    prev = ref_pgd(model, x, y, eps, alpha, 0, loss=loss, generator=_gen(seed), noise=noise)
    first = None
    for k in range(1, steps + 1):
        f = pgd(model, x, y, eps, alpha, k, loss=loss, generator=_gen(seed), noise=noise, fold_bn=False)
        r = ref_pgd(model, x, y, eps, alpha, k, loss=loss, generator=_gen(seed), noise=noise)
        diff = f != r
        if first is None and diff.any():
            first = k
            _check_rounding_only(model, prev, x, y, loss, diff)
        prev = r
    return f, r, first


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_fast_equals_reference(loss, layout, arch):
    model = _model(arch)
    x, y = _batch(n=16 if arch == "cnn" else 8, size=16 if arch == "cnn" else 8)
    xin = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    steps = 10 if arch == "cnn" else 5
    f, r, _ = _lockstep(model, xin, y, EPS, ALPHA, steps, loss)
    assert (f == r).float().mean() >= 0.999


def test_fast_equals_reference_on_trained_model(trained):
    model, x, y = trained
    eps = 16 / 255
    x, y = x[:32], y[:32]
    for loss in ("ce", "cw"):
        f, r, _ = _lockstep(model, x, y, eps, eps / 4, 5, loss)
        assert (f == r).float().mean() >= 0.999


def test_fast_equals_reference_without_random_start():
    """Whole attacks, bit for bit, in float64: in fp32 the split over workers changes the batch
    shapes oneDNN sees, which may round differently on another CPU (the lockstep tests above
    pin fp32 step by step)."""
    model = _model().double()
    x, y = _batch()
    x = x.double()
    for loss in ("ce", "cw"):
        f = pgd(model, x, y, EPS, ALPHA, 5, random_start=False, loss=loss)
        r = ref_pgd(model, x, y, EPS, ALPHA, 5, random_start=False, loss=loss)
        assert torch.equal(f, r)


def test_fgsm_and_cw_fast_equal_reference(device):
    """As above, in float64 (exact on every CPU)."""
    model = _model(device=device).double()
    x, y = _batch(device=device)
    x = x.double()
    g = lambda: _gen(device=device)
    assert torch.equal(fgsm(model, x, y, EPS, generator=g()), ref_fgsm(model, x, y, EPS, generator=g()))
    assert torch.equal(cw_inf(model, x, y, EPS, EPS / 4, 30, generator=g()),
                       ref_cw(model, x, y, EPS, generator=g()))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_kl_fast_equals_reference_from_a_wide_start(layout):
    """TRADES' KL attack, started 0.03 * N(0, 1) away (via `noise`) so that the KL gradient is
    well above rounding. Pinned: up to the first step where the trajectories part they are
    identical, and the parting is rounding only. (Not pinned in fp32: the fraction still equal
    after 8 steps. Once one pixel differs, KL's small gradients flip more signs step after step:
    with the Triton KL kernel, whose gradient is as accurate as the torch twin's, 2 elements
    differ after step 1 and 1.8% after step 8. test_fast_equals_reference_in_float64 pins the
    whole trajectory exactly.)"""
    model = _model()
    x, y = _batch()
    xin = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    noise = 30.0 * torch.randn(x.shape, generator=_gen(4))
    f, r, _ = _lockstep(model, xin, y, EPS, ALPHA, 8, "kl", noise=noise)
    assert (f - x).abs().max() <= EPS + 1e-6 and (r - x).abs().max() <= EPS + 1e-6


def test_kl_first_step_from_the_trades_start():
    """From TRADES' own start x + 0.001 N(0, 1), KL(nat || adv) is ~1e-7 and its gradient is
    ~1e-8, so the sign of a small fraction of elements is decided by rounding (the reference's
    KLDivLoss and the fast log-softmax form round differently). Pinned: the start is the same,
    and wherever the first step differs, the gradient is zero within fp32 rounding. (Later steps
    then follow different, equally valid, trajectories.)"""
    model = _model()
    x, y = _batch()
    assert torch.equal(pgd(model, x, y, EPS, ALPHA, 0, loss="kl", generator=_gen()),
                       ref_pgd(model, x, y, EPS, ALPHA, 0, loss="kl", generator=_gen()))
    f, r, _ = _lockstep(model, x, y, EPS, ALPHA, 1, "kl")
    assert (f == r).float().mean() >= 0.99
    assert f.min() >= 0 and f.max() <= 1 and (f - x).abs().max() <= EPS + 1e-6


def test_reference_computes_parameter_grads_and_restores_mode():
    """The reference keeps the authors' shape: loss.backward() in the attack fills parameter
    grads (the cost the fast path avoids); the model's mode comes back."""
    model = _model().train()
    x, y = _batch(n=8)
    ref_pgd(model, x, y, EPS, ALPHA, 2, generator=_gen())
    assert model.training
    assert all(p.grad is not None for p in model.parameters())


def test_attacks_module_exports():
    assert attacks.ATTACK_LOSSES == ("ce", "cw", "kl")


def test_rounding_check_is_not_vacuous():
    """_check_rounding_only rejects a difference where the gradient is large (as a bug would make)."""
    model = _model()
    x, y = _batch(n=8)
    point = ref_pgd(model, x, y, EPS, ALPHA, 0, generator=_gen())
    g = _objective_grad(model, point, x, y, "ce", "ref")
    diff = torch.zeros_like(x, dtype=torch.bool)
    diff.view(-1)[g.abs().argmax()] = True
    with pytest.raises(AssertionError):
        _check_rounding_only(model, point, x, y, "ce", diff)


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_fast_equals_reference_in_float64(loss, device):
    """float64 model and input (how the trainer is pinned): both keep the dtype, draw the same
    start, and agree; even TRADES' KL start is well above float64 rounding."""
    model = _model(device=device).double()
    x, y = _batch(device=device)
    x = x.double()
    f = pgd(model, x, y, EPS, ALPHA, 6, loss=loss, generator=_gen(device=device))
    r = ref_pgd(model, x, y, EPS, ALPHA, 6, loss=loss, generator=_gen(device=device))
    assert f.dtype == r.dtype == torch.float64
    assert torch.equal(f, r)


# ---------------------------------------------------------------------------------------------
# The CPU split (worker threads, cache-sized slices) and AMP

def _whole_and_split(monkeypatch, model, x, y, loss, amp):
    monkeypatch.setattr(runtime, "CHUNK_PIXELS", 10 ** 9)
    whole = pgd(model, x, y, EPS, ALPHA, 3, loss=loss, generator=_gen(), amp=amp, threads=1)
    monkeypatch.setattr(runtime, "CHUNK_PIXELS", 1)       # slices of MIN_SHARD samples
    assert runtime.chunk_size(x) == runtime.MIN_SHARD
    split = pgd(model, x, y, EPS, ALPHA, 3, loss=loss, generator=_gen(), amp=amp, threads=2)
    assert torch.get_num_threads() == 1                   # the workers left the caller's count alone
    return whole, split


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_split_and_sliced_attack_equals_one_piece_in_float64(monkeypatch, loss):
    """Two workers and 8-sample slices give the adversarial examples of one unsplit batch bit for
    bit in float64: eval-mode samples are independent and float64 convolutions reduce each
    sample in an order that does not depend on the batch size."""
    model = _model("resnet18").double()
    x, y = _batch(n=32)
    whole, split = _whole_and_split(monkeypatch, model, x.double(), y, loss, None)
    assert torch.equal(whole, split)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_split_and_sliced_attack_matches_one_piece(monkeypatch, amp, loss):
    """In fp32 and under bf16 autocast (each worker enters its own autocast) the split is the
    same attack, but not always the same bits: oneDNN picks its kernels by CPU and by shape, the
    batch size included, so a slice of 8 may round differently from the batch of 32 and a
    gradient entry near zero may change sign. Bound what that can do in 3 steps: the examples
    stay in the ball and the box, and the attack loss they reach is the same to within 2%."""
    model = _model("resnet18")
    x, y = _batch(n=32)
    whole, split = _whole_and_split(monkeypatch, model, x, y, loss, amp)
    assert split.dtype == whole.dtype == torch.float32 and split.shape == whole.shape
    assert (split - x).abs().max() <= EPS + 1e-6 and split.min() >= 0 and split.max() <= 1
    with torch.no_grad():
        lw, ls = (F.cross_entropy(model(a), y).item() for a in (whole, split))
    assert ls == pytest.approx(lw, rel=0.02)


def test_bf16_attack_is_as_strong_as_fp32(trained):
    """bf16 autocast changes the sign of some gradient entries, not the attack's strength: on a
    trained model its adversarial examples (scored in fp32) reach the fp32 attack's loss and
    accuracy (eps where the fp32 attack leaves 39 of 64 right: neither 0 nor all), stay in the
    ball and the box, and come back fp32."""
    model, x, y = trained
    eps = 6 / 255
    adv32 = pgd(model, x, y, eps, eps / 4, 10, generator=_gen())
    adv16 = pgd(model, x, y, eps, eps / 4, 10, generator=_gen(), amp=torch.bfloat16)
    assert adv16.dtype == torch.float32 and not torch.equal(adv16, adv32)
    assert (adv16 - x).abs().max() <= eps + 1e-6 and adv16.min() >= 0 and adv16.max() <= 1
    with torch.no_grad():
        l32, l16 = model(adv32), model(adv16)
        ce_clean = F.cross_entropy(model(x), y)
    ce32, ce16 = F.cross_entropy(l32, y), F.cross_entropy(l16, y)
    assert ce16 > ce_clean + 0.5 * (ce32 - ce_clean)
    assert abs(ce16 - ce32) <= 0.02 * ce32
    acc32 = (l32.argmax(1) == y).sum().item()
    acc16 = (l16.argmax(1) == y).sum().item()
    assert 0 < acc32 < len(y) and abs(acc16 - acc32) <= 2, (acc16, acc32)


def _confident_model(device):
    """The CNN with its head scaled up: on _batch's images every top logit leads by 25 or
    more, so softmax - onehot is ~1e-11 and below, under fp16's smallest subnormal (6e-8)."""
    model = _model().to(device)
    with torch.no_grad():
        model.linear.weight.mul_(4000.0)
    return model


def test_fp16_attack_is_loss_scaled_per_sample(device):
    """Under fp16 autocast an unscaled backward flushes a confident sample's logit gradient to
    zero, so its input gradient is 0 and PGD does not move it; the attack scales each sample's
    logit gradient to [0.5, 1) first, so every sample gets a gradient, with the fp32 gradient's
    signs (where those are not a rounding matter)."""
    model = _confident_model(device)
    x, y = (t.to(device) for t in _batch(n=16))
    y = model(x).argmax(1).detach()                       # the model's own (confident) labels
    p = x.clone().requires_grad_(True)
    with torch.autocast(device.type, dtype=torch.float16):
        logits = model(p)
    plain = torch.autograd.grad(attacks._objective("ce", logits, y, 50.0, None), p)[0]
    dead = plain.flatten(1).abs().amax(1) == 0
    assert dead.sum() >= 4, "the setup must have samples whose unscaled fp16 gradient is 0"
    for loss in ("ce", "cw"):
        p = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.float16):
            logits = model(p)
        g16 = attacks._input_grad(loss, logits, y, 0.0, None, p, torch.float16)
        p32 = x.clone().requires_grad_(True)
        g32 = torch.autograd.grad(attacks._objective(loss, model(p32), y, 0.0, None), p32)[0]
        live = g32.flatten(1).abs().amax(1) > 0
        assert (g16.flatten(1).abs().amax(1) > 0)[live].all(), loss
        big = g32.abs() > 1e-2 * g32.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
        assert (g16.sign() == g32.sign())[big].float().mean() > 0.95, loss
    x_adv = pgd(model, x, y, EPS, ALPHA, 1, random_start=False, amp=torch.float16)
    assert ((x_adv - x).flatten(1).abs().amax(1) > 0)[dead].all()


def test_fp32_and_bf16_attacks_take_the_plain_gradient(monkeypatch):
    """The per-sample scaling is fp16's only: fp32 and bf16 gradients are the plain ones, so
    their numbers do not move."""
    model = _model()
    x, y = _batch(n=8)
    for amp in (None, torch.bfloat16):
        p = x.clone().requires_grad_(True)
        with runtime.autocast("cpu", amp):
            logits = model(p)
        want = torch.autograd.grad(attacks._objective("ce", logits, y, 50.0, None), p, retain_graph=True)[0]
        assert torch.equal(attacks._input_grad("ce", logits, y, 50.0, None, p, amp), want)


def test_gradient_reaches_the_update_in_x_adv_layout(monkeypatch, device):
    """A channels_last model attacked with NCHW inputs returns channels_last input gradients;
    pgd_step gets them in x_adv's layout (else the Triton kernel falls back to the twin), and the
    result is the same (float64: the same numbers whatever the layout)."""
    model = _model(device=device).double().to(memory_format=torch.channels_last)
    x, y = _batch(device=device)
    x = x.double()
    seen = []
    real = kernels.pgd_step
    monkeypatch.setattr(kernels, "pgd_step", lambda xa, xn, g, a, e: seen.append((xa.stride(), g.stride()))
                        or real(xa, xn, g, a, e))
    out = pgd(model, x, y, EPS, ALPHA, 3, generator=_gen(device=device))
    assert len(seen) == 3 and all(sa == sg for sa, sg in seen), seen
    monkeypatch.setattr(kernels, "pgd_step", real)
    want = pgd(model, x.contiguous(memory_format=torch.channels_last), y, EPS, ALPHA, 3,
               generator=_gen(device=device))
    assert out.is_contiguous() and torch.equal(out, want)


def test_pgd_options_object_equals_the_keywords():
    """pgd's optional arguments as one PGDOptions give the same x_adv as the keywords; keywords
    given with it override its fields; an unknown keyword and a clash are TypeErrors."""
    import fastfat
    model = _model()
    x, y = _batch(n=6)
    noise = torch.rand(x.shape, generator=_gen()) * 2 - 1
    by_kw = pgd(model, x, y, EPS, ALPHA, 3, loss="cw", kappa=5.0, noise=noise, threads=1, fold_bn=False)
    opts = fastfat.PGDOptions(loss="cw", kappa=5.0, threads=1)
    assert torch.equal(pgd(model, x, y, EPS, ALPHA, 3, noise=noise, options=opts, fold_bn=False), by_kw)
    assert torch.equal(pgd(model, x, y, EPS, ALPHA, 3, noise=noise,
                           options=fastfat.PGDOptions(loss="cw", kappa=5.0, threads=1, fold_bn=False)), by_kw)
    with pytest.raises(TypeError):
        pgd(model, x, y, EPS, ALPHA, 1, bogus=1)
    with pytest.raises(TypeError):
        pgd(model, x, y, EPS, ALPHA, 1, loss="kl", options=opts)
