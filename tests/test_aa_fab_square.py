"""fastfat's FAB-T and Square: pyautoattack's l_inf projection exactly in float64, the verdicts of
pyautoattack's FABAttack_targeted and SquareAttack on a trained digits CNN, the eps-ball and the
box, and answers that do not depend on the other rows of the working batch."""
import copy
import pyautoattack

import pytest
import torch
from pyautoattack.fab_projections import projection_linf as pyaa_projection_linf
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

from fastfat.autoattack.common import Logits, Rng
from fastfat.autoattack import fab as fab_module
from fastfat.autoattack import square as square_module
from fastfat.autoattack.fab import fab_t, projection_linf
from fastfat.autoattack.square import p_schedule, square
from fastfat.config import make_train_config
from fastfat.data import MemoryLoader
from fastfat.data.datasets import load_dataset
from fastfat.train import train

EPS = 0.1   # on this model FAB-T and Square each fool about half of the clean-correct digits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small digits CNN, Madry-trained for a few seconds, in eval mode, and the test digits it
    classifies correctly (the rows an attack of the ensemble gets)."""
    cfg = make_train_config("demo", method="madry", width=8, epochs=4, train_limit=1024,
                            eps_train=0.1, device="cpu", loader="memory")
    model, _ = train(cfg, str(tmp_path_factory.mktemp("fab_sq")), progress=False)
    model.eval().requires_grad_(False)
    x, y = next(iter(MemoryLoader(load_dataset("digits")[1], 497, False)))
    ok = Logits(model)(x).argmax(1) == y
    return model, x[ok], y[ok]


def _rng(seeds, group, n=None, pos=None):
    n = group.shape[0] if n is None else n
    pos = torch.arange(group.shape[0]) if pos is None else pos
    return Rng(seeds, group, pos, n, "cpu")


def _in_ball_and_box(x_adv, x, eps, slack=0.0):
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((x_adv - x).abs().flatten(1).amax(1) <= eps + slack).all()


def _agree(robust_a, robust_b, y):
    """The per-sample verdicts agree on >= 99.5% and class-wise robust counts within one."""
    assert (robust_a == robust_b).double().mean() >= 0.995
    diff = torch.bincount(y[robust_a], minlength=10) - torch.bincount(y[robust_b], minlength=10)
    assert diff.abs().max() <= 1


def test_projection_linf_equals_pyautoattack_in_float64():
    """Same arithmetic in the same order: equal bits, in each of the projection's cases (the
    hyperplane reached inside the box, or out of its reach), with ties and zero weights."""
    g = torch.Generator().manual_seed(0)
    reached = missed = 0
    for trial in range(40):
        r, d = 16, [3, 64, 257][trial % 3]
        t = torch.rand(r, d, generator=g, dtype=torch.float64)
        if trial % 2:
            t = (t * 4).round() / 4                         # ties and box corners
        w = torch.randn(r, d, generator=g, dtype=torch.float64)
        w[torch.rand(r, d, generator=g) < 0.2] = 0
        b = torch.randn(r, generator=g, dtype=torch.float64) * (trial % 7)
        ours, theirs = projection_linf(t, w, b), pyaa_projection_linf(t, w, b)
        assert torch.equal(ours, theirs)
        on_plane = ((w * (t + ours)).sum(1) - b).abs() < 1e-9
        reached += int(on_plane.sum())
        missed += int((~on_plane).sum())
        assert ((t + ours) >= -1e-12).all() and ((t + ours) <= 1 + 1e-12).all()
    assert reached > 50 and missed > 50


def test_fab_t_verdicts_equal_pyautoattack(trained):
    """FAB-T has no randomness (one restart, started at x), so the verdicts differ only where the
    model's fp32 logits round differently in other batch shapes (9 targets side by side, rows
    leaving when fooled). Checked two ways, with 25 iterations instead of 100 to keep
    pyautoattack's side fast: against FABAttack_targeted.perturb at EPS, and, with three eps in one
    working batch, against the smallest perturbation pyautoattack's runs find over the 9 targets
    (fooled at eps iff that norm <= eps), which also tests the per-sample eps."""
    model, x, y = trained
    x, y = x[:240], y[:240]
    n = len(y)
    logits = Logits(model, threads=1)
    fab = FABAttack_PT(logits, norm="Linf", n_restarts=1, n_iter=25, eps=EPS, targeted=True,
                       n_target_classes=9, device="cpu")
    ref = fab.perturb(x, y)
    ours = fab_t(logits, x, y, torch.full((n,), EPS), rng=None, n_iter=25, n_target_classes=9)
    robust, robust_ref = logits(ours).argmax(1) == y, logits(ref).argmax(1) == y
    assert 0.2 < robust.double().mean() < 0.8          # the attack matters on these samples
    _agree(robust, robust_ref, y)
    _in_ball_and_box(ours, x, EPS)
    assert torch.equal(ours[robust], x[robust])

    smallest = torch.full((n,), float("inf"))
    for k in range(2, 11):
        fab.target_class = k
        adv = fab.attack_single_run(x, y, use_rand_start=False, is_targeted=True)
        norm = (adv - x).flatten(1).abs().amax(1)
        smallest = torch.min(smallest, torch.where(logits(adv).argmax(1) != y, norm, float("inf")))
    radii = torch.tensor([0.05, EPS, 0.15])
    ee = radii.repeat_interleave(n)
    xx, yy = x.repeat(3, 1, 1, 1), y.repeat(3)
    ours = fab_t(logits, xx, yy, ee, rng=None, n_iter=25, n_target_classes=9)
    for j, e in enumerate(radii):
        rows = slice(j * n, (j + 1) * n)
        _agree(logits(ours[rows]).argmax(1) == y, smallest > e, y)
        _in_ball_and_box(ours[rows], x, e)


def test_square_verdicts_equal_pyautoattack(trained):
    """One eps group draws pyautoattack's numbers (same seed, CPU generator, same order, the start
    for the correctly classified rows only), so the queries are the same and the examples differ
    only where the model's logits round differently (none here: both run the same batch shapes
    on one CPU; bounded rather than exact, as the rounding is not ours to promise). 400 queries
    (the p schedule rescaled to them) keep it fast."""
    model, x, y = trained
    x, y = x[:240], y[:240].clone()
    y[:3] = (y[:3] + 1) % 10                               # misclassified: left alone, draw nothing
    logits = Logits(model, threads=1)
    ours = square(logits, x, y, torch.full((len(y),), EPS), rng=_rng([7], torch.zeros_like(y)),
                  n_queries=400, p_init=0.8, rescale=True)
    ref = SquareAttack(logits, norm="Linf", n_queries=400, eps=EPS, p_init=0.8, n_restarts=1,
                       seed=7, device="cpu").perturb(x, y)
    robust, robust_ref = logits(ours).argmax(1) == y, logits(ref).argmax(1) == y
    assert 0.2 < robust.double().mean() < 0.8
    _agree(robust, robust_ref, y)
    assert (ours == ref).flatten(1).all(1).double().mean() >= 0.99
    assert torch.equal(ours[:3], x[:3])
    # x + eps rounds in fp32, as in pyautoattack: the ball holds up to one ulp of 1.0
    _in_ball_and_box(ours, x, EPS, slack=1.2e-7)
    assert torch.equal(ours[robust], x[robust])


def test_square_p_schedule_is_pyautoattacks():
    ref = SquareAttack(None, n_queries=5000, eps=EPS, p_init=0.8)
    for n_queries in (5000, 400):
        ref.n_queries = n_queries
        assert all(p_schedule(i, n_queries, 0.8, rescale=True) == ref.p_selection(i) for i in range(n_queries))
    # the standard AutoAttack's Square does not rescale (resc_schedule=False): the default here
    std = pyautoattack.AutoAttack(torch.nn.Identity(), eps=EPS).square
    assert not std.rescale_schedule and std.n_queries == 5000
    assert all(p_schedule(i, 5000, 0.8) == std.p_selection(i) for i in range(5000))
    assert p_schedule(30, 5000, 0.8) != p_schedule(30, 5000, 0.8, rescale=True)


def _per_sample(trained):
    """The model in float64, called one sample at a time: a batched forward rounds a sample's
    logits differently in batches of other sizes (oneDNN and BLAS pick kernels by shape; 3e-17
    here between 1 and 48 samples), so to test that the attacks themselves do not mix rows, the
    model's arithmetic must not depend on the batch either."""
    model, x, y = trained
    one = Logits(copy.deepcopy(model).double(), threads=1, keep_float64=True)

    def logits(z):
        return torch.cat([one(z[i:i + 1]) for i in range(z.shape[0])])
    return logits, x.double(), y


def test_square_does_not_depend_on_the_other_eps(trained, monkeypatch):
    """A row's answer depends on its group's seed and the group's rows only: alone, or after the
    rows of another eps group (other seed and eps) in one working batch, it is the same; a
    misclassified sample comes back unchanged and draws nothing (pyautoattack attacks only the
    correctly classified rows, so the others' answers do not depend on it either)."""
    logits, x, y = _per_sample(trained)
    x, y = x[:24], y[:24].clone()
    n = len(y)
    eps = torch.full((n,), EPS, dtype=torch.float64)
    zeros = torch.zeros(n, dtype=torch.long)
    alone = square(logits, x[1:], y[1:], eps[1:], rng=_rng([11], zeros[1:]), n_queries=150)
    y[0] = (y[0] + 1) % 10                                 # misclassified from the start
    with_wrong = square(logits, x, y, eps, rng=_rng([11], zeros), n_queries=150)
    assert torch.equal(with_wrong[0], x[0]) and torch.equal(with_wrong[1:], alone)
    assert (logits(alone).argmax(1) != y[1:]).any()        # the check had fooled rows to keep
    # another group first, at another seed and eps
    xx, yy = torch.cat([x, x]), torch.cat([y, y])
    group = torch.cat([zeros, zeros + 1])
    ee = torch.cat([torch.full((n,), 0.15, dtype=torch.float64), eps])
    mixed = square(logits, xx, yy, ee, rng=_rng([12, 11], group, n, torch.arange(n).repeat(2)),
                   n_queries=150)
    assert torch.equal(mixed[n:], with_wrong)
    _in_ball_and_box(mixed[:n], x, 0.15, slack=1e-15)
    # fooled rows dropped only every 7 queries (CUDA's way, to spare host syncs): same answers
    monkeypatch.setattr(square_module, "compact_every", lambda device: 7)
    assert torch.equal(square(logits, xx, yy, ee, rng=_rng([12, 11], group, n,
                                                             torch.arange(n).repeat(2)),
                              n_queries=150), mixed)


def test_square_speculation_makes_the_sequential_attacks_queries(trained, monkeypatch):
    """Evaluating K queries of a sample in one forward and taking the first accepted one is the
    sequential attack query for query: with a per-sample float64 model the examples are the same
    bits for K = 1, 3 and 32 and with CUDA's way (every candidate evaluated, rows dropped every 7
    rounds); they are pyautoattack's own examples up to its fp32 rounding of 2 * eps (< 1e-8), and
    the default CPU run makes under a fifth of the sequential attack's forwards; skipping the
    queries that repeat the best point spares more than a tenth of the rows."""
    logits, x, y = _per_sample(trained)
    x, y = x[:40], y[:40]
    eps = torch.full((len(y),), EPS, dtype=torch.float64)
    calls = []

    def counted(z):
        calls.append(z.shape[0])
        return logits(z)

    def run(k=None, every=None):
        calls.clear()
        if k is not None:
            monkeypatch.setattr(square_module, "queries_ahead", lambda r, device: k)
        if every is not None:
            monkeypatch.setattr(square_module, "compact_every", lambda device: every)
        return square(counted, x, y, eps, rng=_rng([7], torch.zeros_like(y)), n_queries=300, rescale=True)

    default = run()
    forwards = len(calls)
    ref = SquareAttack(logits, norm="Linf", n_queries=300, eps=EPS, p_init=0.8, n_restarts=1,
                       seed=7, device="cpu").perturb(x, y)
    fooled = logits(default).argmax(1) != y
    assert 0.2 < fooled.double().mean() < 0.9
    assert torch.equal(fooled, logits(ref).argmax(1) != y)
    assert (default - ref).abs().max() < 1e-8
    seen = {}
    for k, every in ((1, None), (3, None), (32, None), (3, 7), (1, 1)):   # patches stay set
        assert torch.equal(run(k, every), default), (k, every)
        seen[k, every] = len(calls), sum(calls)
    # (1, 1) is the sequential attack: a forward per query, every row's query evaluated
    assert forwards < seen[1, 1][0] / 5
    assert seen[1, None][1] < 0.9 * seen[1, 1][1]          # the repeats it did not evaluate


def test_fab_t_does_not_depend_on_the_other_rows(trained, monkeypatch):
    """FAB-T per sample: the same x_adv alone, in a batch with other samples at another eps, and
    in another order; a misclassified sample comes back unchanged."""
    logits, x, y = _per_sample(trained)
    x, y = x[:12], y[:12].clone()
    y[0] = (y[0] + 1) % 10
    n = len(y)
    eps = torch.full((n,), EPS, dtype=torch.float64)
    full = fab_t(logits, x, y, eps, n_iter=15)
    assert torch.equal(full[0], x[0])
    assert (logits(full).argmax(1) != y).sum() >= 2         # fooled rows to compare
    xx, yy = torch.cat([x, x]).flip(0), torch.cat([y, y]).flip(0)
    ee = torch.cat([eps, torch.full((n,), 0.15, dtype=torch.float64)]).flip(0)
    mixed = fab_t(logits, xx, yy, ee, n_iter=15)
    assert torch.equal(mixed[n:], full.flip(0))
    _in_ball_and_box(mixed[:n], xx[:n], 0.15)
    for i in (1, 5):
        assert torch.equal(fab_t(logits, x[i:i + 1], y[i:i + 1], eps[i:i + 1], n_iter=15), full[i:i + 1])
    # fooled samples dropped only every 4 iterations (CUDA's way, to spare host syncs): same answers
    monkeypatch.setattr(fab_module, "compact_every", lambda device: 4)
    assert torch.equal(fab_t(logits, xx, yy, ee, n_iter=15), mixed)


def _count_syncing(fn, *args, **kwargs):
    """How many times fn calls each aten op that makes the host wait for a CUDA device
    (conftest.SYNCING_OPS): a CPU run cannot see a sync, but it can count these calls."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from conftest import SYNCING_OPS

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._overloadpacket.__name__
            if name in SYNCING_OPS:
                seen[name] = seen.get(name, 0) + 1
            return func(*args, **(kwargs or {}))
    seen = {}
    with Count():
        fn(*args, **kwargs)
    return seen


def test_the_only_host_syncs_in_the_loop_are_the_periodic_compactions(monkeypatch):
    """With CUDA's compaction interval, running more iterations adds no op that makes the host
    wait but the one nonzero per extra compaction (rows that stay robust, so every iteration runs;
    the setup before the loop may sync)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = torch.rand(6, 1, 8, 8)
    y = net(x).argmax(1)
    eps = torch.full((6,), 1e-4)                          # too small to fool anything
    monkeypatch.setattr(fab_module, "compact_every", lambda device: 5)
    short, longer = (_count_syncing(fab_t, net, x, y, eps, n_iter=k) for k in (12, 17))
    assert short["nonzero"] == 3 and longer == {**short, "nonzero": 4}
    monkeypatch.setattr(square_module, "compact_every", lambda device: 50)
    monkeypatch.setattr(square_module, "queries_ahead", lambda rows, device: 1)   # round = query
    short, longer = (_count_syncing(square, net, x, y, eps, n_queries=q,
                                    rng=_rng([3], torch.zeros(6, dtype=torch.long)))
                     for q in (120, 170))
    assert longer == {**short, "nonzero": short["nonzero"] + 1}
