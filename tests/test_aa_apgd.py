"""fastfat's APGD-CE and APGD-T: pyautoattack's iterates exactly in float64 from the same start,
its verdicts in fp32, and results that do not depend on batching, sharding or the other eps."""
import copy

import pytest
import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

from fastfat.autoattack import apgd, run_batch
from fastfat.autoattack.common import Logits, Rng, ce_loss, dlr_loss, dlr_loss_targeted
from fastfat.data import MemoryLoader
from fastfat.data.datasets import load_dataset
from fastfat.config import make_train_config
from fastfat.train import train

EPS = 0.1


@pytest.fixture(scope="module")
def digits():
    test = load_dataset("digits")[1].subset(48)
    return next(iter(MemoryLoader(test, 48, False)))


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    """A small digits CNN, Madry-trained for a few seconds (so that the attack has work), float64."""
    cfg = make_train_config("demo", method="madry", width=8, epochs=3, train_limit=1024, eps_train=0.1,
                            device="cpu", loader="memory")
    model, _ = train(cfg, str(tmp_path_factory.mktemp("aa_apgd")), progress=False)
    return model.eval().double()


def _start(x, eps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return apgd.start_point(x, torch.full((x.shape[0],), eps, dtype=x.dtype), 2 * torch.rand(x.shape, generator=g) - 1)


def _ref_run(ref, x, y, start):
    ref.init_hyperparam(x)
    return ref.attack_single_run(x, y, x_init=start)


@pytest.mark.parametrize("n_iter", [100, 17])
def test_apgd_ce_float64_iterates_equal_pyautoattack(digits, model64, n_iter):
    """Same start, float64: the best point, its loss, the verdicts and the fooling iterates are
    pyautoattack's attack_single_run's bit for bit (same ops in the same order; fp32 step size and
    loss history as there), over its step-size checkpoints (n_iter 100 and an odd 17)."""
    x, y = digits[0].double(), digits[1]
    start = _start(x, EPS)
    ref = APGDAttack(model64, n_iter=n_iter, eps=EPS, loss="ce", device="cpu")
    x_best, acc, loss_best, x_best_adv = _ref_run(ref, x, y, start)
    ours = apgd.run(Logits(model64, threads=1, keep_float64=True), x, y, torch.full((48,), EPS, dtype=torch.float64),
                    start, ce_loss, n_iter=n_iter, rho=0.75, drop=False)
    assert 0 < (~acc).sum() < 48                       # the attack had something to do
    assert torch.equal(ours["x_best"], x_best) and torch.equal(ours["loss_best"], loss_best)
    assert torch.equal(ours["fooled"], ~acc) and torch.equal(ours["x_adv"], x_best_adv)
    # dropping fooled samples at once changes no verdict
    dropped = apgd.run(Logits(model64, threads=1, keep_float64=True), x, y, torch.full((48,), EPS, dtype=torch.float64),
                       start, ce_loss, n_iter=n_iter, rho=0.75, drop=True)
    assert torch.equal(dropped["fooled"], ~acc)


def test_apgd_t_float64_iterates_equal_pyautoattack(digits, model64):
    """Targeted DLR towards the 2nd .. 4th most likely class, each target from its own start: every
    (sample, target) run equals pyautoattack's with that y_target, bit for bit; the fastfat runs
    are all in one working batch."""
    x, y = digits[0].double()[:24], digits[1][:24]
    targets = apgd.targets_of(model64(x), 3)
    n_iter, logits_fn = 30, Logits(model64, threads=1, keep_float64=True)
    starts = [_start(x, EPS, seed=k) for k in range(3)]
    xr, yr = x.repeat(3, 1, 1, 1), y.repeat(3)
    ours = apgd.run(logits_fn, xr, yr, torch.full((72,), EPS, dtype=torch.float64), torch.cat(starts),
                    dlr_loss_targeted, (targets.T.reshape(-1),), n_iter=n_iter, rho=0.75, drop=False)
    fooled_any = torch.zeros(24, dtype=torch.bool)
    for k in range(3):
        ref = APGDAttack_targeted(model64, n_iter=n_iter, eps=EPS, device="cpu", n_target_classes=3)
        ref.y_target = targets[:, k]
        x_best, acc, loss_best, _ = _ref_run(ref, x, y, starts[k])
        rows = slice(24 * k, 24 * (k + 1))
        assert torch.equal(ours["x_best"][rows], x_best) and torch.equal(ours["loss_best"][rows], loss_best)
        assert torch.equal(ours["fooled"][rows], ~acc)
        fooled_any |= ~acc
    assert 0 < fooled_any.sum() < 24


def test_dlr_losses_equal_pyautoattacks():
    torch.manual_seed(1)
    z, y, t = torch.randn(32, 10, dtype=torch.float64), torch.randint(0, 10, (32,)), torch.randint(0, 10, (32,))
    z[:8] = z[:8].index_put((torch.arange(8), y[:8]), torch.tensor(9.0, dtype=torch.float64))  # y on top
    ref = APGDAttack_targeted(lambda v: v, eps=EPS)
    assert torch.equal(dlr_loss(z, y), ref.dlr_loss(z, y))
    ref.y_target = t
    assert torch.equal(dlr_loss_targeted(z, y, t), ref.dlr_loss_targeted(z, y))


def test_independent_of_batching_sharding_and_other_eps(digits, model64):
    """A sample's verdict and example at one eps do not depend on the other samples of the batch
    (dropping fooled ones), on the split over shard workers, or on which other eps share the
    working batch: float64, so bit for bit."""
    x, y = digits[0].double(), digits[1]
    kw = dict(n_iter=10)
    both, pb = run_batch(model64, x, y, "apgd", [0.05, EPS], [7, 8], 10, threads=1, **kw)
    with pytest.MonkeyPatch.context() as mp:
        import fastfat.autoattack.common as common
        mp.setattr(common, "chunk_size", lambda v: 8)
        split, ps = run_batch(model64, x, y, "apgd", [0.05, EPS], [7, 8], 10, threads=2, **kw)
    one, po = run_batch(model64, x, y, "apgd", [EPS], [8], 10, threads=1, **kw)
    assert torch.equal(both, split) and torch.equal(pb, ps)
    assert torch.equal(both[48:], one) and torch.equal(pb[48:], po)
    assert 0 < (po != y).sum() < 48
    assert ((both - x.repeat(2, 1, 1, 1)).abs().amax((1, 2, 3)) <= torch.tensor([0.05] * 48 + [EPS] * 48) + 1e-12).all()


def _rng(seed, n, device="cpu"):
    return Rng([seed], torch.zeros(n, dtype=torch.long), torch.arange(n), n, device)


@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-t"])
def test_whole_attack_equals_pyautoattacks_perturb(digits, model64, attack):
    """The whole attack from the same seed: pyautoattack's perturb (its reseeded global generator,
    its fp32 iterates) and fastfat's (its keyed stream, dropping fooled samples) fool exactly the
    same samples, the model computing in float64 on both sides so that nothing rounds differently.
    APGD-T with one target: its first target's starts are pyautoattack's numbers (later targets'
    depend, in pyautoattack, on whom the earlier ones fooled)."""
    x = digits[0]
    logits_fn = Logits(model64, threads=1, keep_float64=True)
    with torch.no_grad():
        y = logits_fn(x).argmax(1)                   # labels: the model's own (every sample attacked)
    e = 0.15
    n, seed, kw = len(y), 1234, dict(n_iter=20, eps=e, seed=1234, device="cpu")
    eps = torch.full((n,), e)
    if attack == "apgd-ce":
        ref = APGDAttack(logits_fn, loss="ce", **kw)
        ours = apgd.apgd_ce(logits_fn, x, y, eps, rng=_rng(seed, n), n_iter=20)
    else:
        ref = APGDAttack_targeted(logits_fn, n_target_classes=1, **kw)
        ours = apgd.apgd_t(logits_fn, x, y, eps, rng=_rng(seed, n), n_iter=20, n_target_classes=1)
    with torch.random.fork_rng():
        theirs = ref.perturb(x, y)
    with torch.no_grad():
        fooled_ours, fooled_theirs = logits_fn(ours).argmax(1) != y, logits_fn(theirs).argmax(1) != y
    assert 0 < fooled_theirs.sum() < n
    assert torch.equal(fooled_ours, fooled_theirs)
    assert (ours - x).abs().max() <= e + 1e-6 and 0 <= ours.min() and ours.max() <= 1


def test_fp32_apgd_verdicts_equal_pyautoattacks(digits, model64):
    """fp32, standard settings, as `fastfat eval` runs both (folded copy, keyed seeds, every eps in
    one working batch for fastfat): the same robust samples up to fp32 rounding (the starts of
    APGD-CE and of APGD-T's first target are the same numbers): class counts within one sample,
    verdicts agreeing on >= 99.5% of the (sample, eps) pairs."""
    from fastfat.autoattack import run
    from fastfat.models.fold import fold_bn
    from fastfat.seeding import eval_noise_seed
    x, y = digits
    attacked = fold_bn(copy.deepcopy(model64).float())
    eps, seeds = [0.1, 0.15], [eval_noise_seed(0, 0, "aa", i) for i in range(2)]
    ours = run_batch(attacked, x, y, "apgd", eps, seeds, 10)[1].view(2, -1) == y
    theirs = torch.stack([run(attacked, x, y, "apgd", e, s, 10, impl="pyautoattack")[1] for e, s in zip(eps, seeds)]) == y
    clean = (attacked(x).argmax(1) == y).sum()
    assert (0 < theirs.sum(1)).all() and (theirs.sum(1) < clean).all()   # the attacks had work at both eps
    for a, b in zip(ours, theirs):
        assert (torch.bincount(y[a], minlength=10) - torch.bincount(y[b], minlength=10)).abs().max() <= 1
    assert (ours == theirs).double().mean() >= 0.995


def test_aa_goes_on_from_apgd_exactly(digits, model64):
    """`aa` started from `apgd`'s result (what evaluate does when both are asked for) equals `aa`
    from scratch: its first two attacks are that very run (float64, bit for bit)."""
    x, y = digits
    kw = dict(n_iter=5, square_n_queries=20)
    first = run_batch(model64, x, y, "apgd", [EPS, 0.15], [3, 4], 10, **kw)
    went_on = run_batch(model64, x, y, "aa", [EPS, 0.15], [3, 4], 10, after_apgd=first, **kw)
    scratch = run_batch(model64, x, y, "aa", [EPS, 0.15], [3, 4], 10, **kw)
    assert torch.equal(went_on[0], scratch[0]) and torch.equal(went_on[1], scratch[1])
    assert ((went_on[1] == y.repeat(2)) <= (first[1] == y.repeat(2))).all()


def test_aa_impl_is_checked_at_the_edge():
    from fastfat.config import make_eval_config
    from fastfat.errors import UserError
    assert make_eval_config(None).aa_impl == "fastfat"
    assert make_eval_config(None, aa_impl="pyautoattack").aa_impl == "pyautoattack"
    with pytest.raises(UserError, match="aa_impl"):
        make_eval_config(None, aa_impl="foolbox")
